"""Sparsifiner as released: the pruned predictor against a loop reference, earlier checkpoints, the training
phases and loss terms, the stages (schedule, errors, presets) and an exact resume across the stage boundary."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F

import mait  # noqa: F401
from mait.cost import count_macs, predictor_macs
from mait.errors import UserError
from mait.learned import ConnectivityPredictor, kept_keys, predictors, reconstruction_loss, set_phase
from mait.train import TrainConfig, build_loaders, build_model, load_config, load_weights, train
from mait.train.data import DataInfo
from mait.train.objectives import Objective, build_teacher
from mait.train.stages import enter_stage, plan_stages

DATA = Path(__file__).parent / "data"


def _reference_masks(predictor: ConnectivityPredictor, q: torch.Tensor, k: torch.Tensor, heads: int,
                     threshold: float = 0.02, top: int = 8) -> tuple[torch.Tensor, list]:
    """The released mask rule, one query row at a time (float64): channels d -> d/2 for q and k, the keys mixed
    into n basis tokens, softmax(q_c · k_basis / sqrt(heads)) over the basis, the top ``top`` coefficients kept,
    the basis |W| where |W| > ``threshold`` (else 0), and the k largest entries of the resulting row kept.
    Returns the pruned map (B, h, T-P, T) and, per row, the kept keys as a set."""
    w_q, b_q = predictor.proj_c_q.weight.double(), predictor.proj_c_q.bias.double()
    w_k, b_k = predictor.proj_c_k.weight.double(), predictor.proj_c_k.bias.double()
    mix, back = predictor.proj_n.double(), predictor.proj_back_n.double()
    batch, _, tokens, _ = q.shape
    prefix, basis, kept = predictor.num_prefix_tokens, mix.shape[1], predictor.kept
    approx = torch.zeros(batch, q.shape[1], tokens - prefix, tokens, dtype=torch.float64)
    keys = []
    for b in range(batch):
        for h in range(q.shape[1]):
            k_c = [w_k @ k[b, h, t].double() + b_k for t in range(tokens)]
            k_basis = [sum(k_c[t] * mix[t, j] for t in range(tokens)) for j in range(basis)]
            for row in range(tokens - prefix):
                q_c = w_q @ q[b, h, prefix + row].double() + b_q
                logits = torch.stack([q_c @ k_basis[j] for j in range(basis)]) / math.sqrt(heads)
                coef = logits.softmax(dim=0)
                chosen = sorted(range(basis), key=lambda j: -coef[j].item())[:top]
                for t in range(tokens):
                    approx[b, h, row, t] = sum(coef[j] * (abs(back[t, j]) if abs(back[t, j]) > threshold else 0.0)
                                               for j in chosen)
                order = sorted(range(tokens), key=lambda t: -approx[b, h, row, t].item())
                gap = approx[b, h, row, order[kept - 1]] - approx[b, h, row, order[kept]]
                assert gap > 1e-9, "the test input must decide the k-th key without a tie"
                keys.append(set(order[:kept]))
    return approx, keys


def _trained_scale(predictor: ConnectivityPredictor, seed: int) -> None:
    """Weights of a trained predictor's size, so that masks depend on the input and the threshold matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in (predictor.proj_n, predictor.proj_back_n):
            weight.copy_(torch.randn(weight.shape, generator=g) * 0.05)
        for linear in (predictor.proj_c_q, predictor.proj_c_k):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=g))
            linear.bias.copy_(torch.randn(linear.bias.shape, generator=g) * 0.1)


@pytest.mark.parametrize("tokens, prefix, heads, dim, keep", [(65, 1, 2, 16, 0.25), (50, 2, 3, 8, 0.13),
                                                               (37, 1, 1, 12, 0.5)])
def test_pruned_predictor_matches_the_loop_reference(tokens, prefix, heads, dim, keep):
    predictor = ConnectivityPredictor(dim, tokens, prefix, keep, num_heads=heads).double()
    _trained_scale(predictor, seed=tokens)
    assert predictor.num_basis == tokens // 6 and predictor.proj_c_q.out_features == dim // 2
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, heads, tokens, dim, generator=g, dtype=torch.float64) for _ in range(2))
    want, keys = _reference_masks(predictor, q, k, heads)
    _, index = predictor(q, k)
    coef = predictor.coefficients(q, k)
    torch.testing.assert_close(predictor.pruned_coefficients(coef) @ predictor.pruned_basis(), want,
                               rtol=1e-10, atol=1e-12)
    assert [set(row.tolist()) for row in index.flatten(0, 2)] == keys


def test_a_default_model_has_the_released_predictor_and_feeds_it_the_raw_queries():
    model = timm.create_model("sparsifiner_deit_small_224")
    predictor = model.blocks[0].attn.predictor
    assert (predictor.proj_c_q.in_features, predictor.proj_c_q.out_features) == (64, 32)
    assert predictor.proj_n.shape == predictor.proj_back_n.shape == (197, 32)          # n = 197 // 6
    assert predictor.scale == 6 ** -0.5 and predictor.kept == 50
    assert (predictor.basis_threshold, predictor.coef_topk, predictor.sparse_basis) == (0.02, 8, True)
    for weight in (predictor.proj_c_q.weight, predictor.proj_n, predictor.proj_back_n):   # trunc normal, std 0.02
        assert abs(weight.std().item() - 0.02) < 0.003
    assert not predictor.proj_c_q.bias.any() and not predictor.proj_c_k.bias.any()
    # In a small model, the masks the layer uses are the reference rule on the layer's raw q and k.
    torch.manual_seed(0)
    small = timm.create_model("sparsifiner_nano4_8", depth=1, embed_dim=16, num_heads=2, keep_rate=0.25).eval()
    layer = small.blocks[0].attn
    _trained_scale(layer.predictor, seed=3)
    seen = {}
    layer.predictor.register_forward_hook(lambda mod, inputs, output: seen.update(q=inputs[0], k=inputs[1]))
    layer.qkv.register_forward_hook(lambda mod, inputs, output: seen.update(qkv=output))
    layer.capture_attention = True
    with torch.no_grad():
        small(torch.randn(2, 1, 8, 8))
    q, k = seen["qkv"].reshape(2, 65, 3, 2, 8).permute(2, 0, 3, 1, 4)[:2]
    torch.testing.assert_close(seen["q"], q)                         # raw queries, not scaled by d ** -0.5
    _, keys = _reference_masks(layer.predictor, q, k, heads=2)
    kept = layer.predictor.last_keep[:, :, 1:]
    assert [set(row.nonzero().flatten().tolist()) for row in kept.flatten(0, 2)] == keys
    assert bool(layer.predictor.last_keep[:, :, 0].all())            # the class-token row stays dense


def test_earlier_checkpoints_convert_exactly_or_are_refused_in_one_line():
    """A checkpoint of mait's earlier predictor (n = T // 8, softmax over the scaled queries, unpruned), written
    by that code with its logits and masks, gives them again in a model built to hold it."""
    expected = safetensors.torch.load_file(str(DATA / "legacy_sparsifiner_expected.safetensors"))
    default = timm.create_model("sparsifiner_nano4_8", keep_rate=0.25, depth=2, embed_dim=32)
    with pytest.raises(UserError, match=r"mait's earlier ones \(n = 8 basis tokens for T = 65.*build it with "
                                        r"model_kwargs \{basis_reduction: 8, sparse_basis: false\}") as error:
        load_weights(default, DATA / "legacy_sparsifiner.safetensors")
    assert "\n" not in str(error.value)
    model = timm.create_model("sparsifiner_nano4_8", keep_rate=0.25, depth=2, embed_dim=32, basis_reduction=8,
                              sparse_basis=False).eval()
    load_weights(model, DATA / "legacy_sparsifiner.safetensors")
    for block in model.blocks:
        block.attn.capture_attention = True
    with torch.no_grad():
        logits = model(expected["images"])
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
    for index, block in enumerate(model.blocks):
        assert torch.equal(block.attn.predictor.last_keep, expected[f"keep{index}"].bool())


def test_phases_decide_what_a_training_forward_does():
    torch.manual_seed(0)
    model = timm.create_model("sparsifiner_nano4_8", keep_rate=0.25, drop_path_rate=0.0)
    dense = timm.create_model("mait_nano4_8", scheme="none")
    dense.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        sparse_eval = model.eval()(x)
    model.train()
    set_phase(model, "reconstruct")     # the release's first stage: dense attention, the map recorded
    torch.testing.assert_close(model(x), dense.eval()(x), rtol=1e-5, atol=1e-6)
    assert all(p.recorded is not None and p.recorded.approx.requires_grad for p in predictors(model))
    set_phase(model, "frozen")          # the second: the pruned predictor's masks, nothing recorded
    torch.testing.assert_close(model(x), sparse_eval)
    assert all(p.recorded is None for p in predictors(model))
    set_phase(model, "joint")           # mait's: both
    torch.testing.assert_close(model(x), sparse_eval)
    assert all(p.recorded is not None for p in predictors(model))
    with pytest.raises(ValueError, match="phase must be one of"):
        set_phase(model, "stage2")


def test_reconstruction_loss_reductions_and_targets():
    torch.manual_seed(0)
    model = timm.create_model("sparsifiner_nano4_8", keep_rate=0.25).train()
    model(torch.randn(3, 1, 8, 8))
    recorded = [p.recorded for p in predictors(model)]
    targets = [torch.rand_like(r.approx) for r in recorded]
    for p, r in zip(predictors(model), recorded):
        p.recorded = r
    got = reconstruction_loss(model, targets, "sum")
    want = torch.stack([(r.approx - t).pow(2).sum() for r, t in zip(recorded, targets)]).mean()
    torch.testing.assert_close(got, want)
    for p, r in zip(predictors(model), recorded):
        p.recorded = r
    own = [((r.q[:, :, 1:] * r.scale) @ r.k.transpose(-2, -1)).softmax(-1) for r in recorded]
    want = torch.stack([(r.approx - t).pow(2).sum(-1).mean() for r, t in zip(recorded, own)]).mean()
    torch.testing.assert_close(reconstruction_loss(model, None, "row_mean"), want)
    assert reconstruction_loss(model) is None
    with pytest.raises(ValueError, match="reduction must be one of"):
        reconstruction_loss(model, None, "mean")


@pytest.fixture(scope="module")
def dense_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dense digits model trained briefly: the starting point and teacher of the fine-tunes below."""
    output = tmp_path_factory.mktemp("dense") / "run"
    train(TrainConfig.from_dict(dict(scheme="none", epochs=2, warmup_epochs=0, train_subset=128, val_subset=32,
                                     progress=False, output=str(output))))
    return output / "last.safetensors"


def test_the_released_loss_terms_are_their_formulas(dense_digits: Path):
    config = load_config("sparsifiner_digits", dict(teacher_checkpoint=str(dense_digits)))
    info = build_loaders(TrainConfig.from_dict(dict(train_subset=32, val_subset=32))).info
    teacher = build_teacher(config, info, attention=True)
    torch.manual_seed(0)
    student = build_model(config, info)
    load_weights(student, dense_digits, strict=False)
    images, labels = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    objective = Objective({"ce": 1.0, "kl": 0.5, "tokens": 0.5}, torch.nn.CrossEntropyLoss(), teacher, student)
    set_phase(student, "frozen")
    outputs = student.train()(images)
    loss, recon = objective(student, images, outputs, labels)
    with torch.no_grad():
        features = teacher.forward_features(images)
        logits = teacher.forward_head(features)
        mine = student.norm(student.blocks(student._pos_embed(student.patch_embed(images))))   # drop path is 0
    kl = (F.softmax(logits, -1) * (F.log_softmax(logits, -1) - F.log_softmax(outputs, -1))).sum(-1).mean()
    want = F.cross_entropy(outputs, labels) + 0.5 * kl + 0.5 * (mine[:, 1:] - features[:, 1:]).pow(2).mean()
    torch.testing.assert_close(loss, want)
    assert recon is None
    objective.close()
    # The reconstruction target is the teacher's attention of the same layer, patch rows.
    objective = Objective({"reconstruction": 0.01}, torch.nn.CrossEntropyLoss(), teacher, student)
    set_phase(student, "reconstruct")
    outputs = student(images)
    recorded = [p.recorded for p in predictors(student)]
    loss, recon = objective(student, images, outputs, labels)
    for layer in teacher.blocks:
        layer.attn.capture_attention = True
    with torch.no_grad():
        teacher(images)
    want = torch.stack([(r.approx - block.attn.last_attention[:, :, 1:]).pow(2).sum()
                        for r, block in zip(recorded, teacher.blocks)]).mean()
    torch.testing.assert_close(recon, want)
    torch.testing.assert_close(loss, 0.01 * want)


@pytest.mark.parametrize("stage, message", [
    ({"epochs": 10, "lr": 1e-3, "trian": "all"}, "unknown key 'trian' \\(did you mean 'train'\\?\\)"),
    ({"epochs": 10, "train": "head"}, "train must be one of all, backbone, predictor"),
    ({"epochs": 10, "predictor": "dense"}, "predictor must be one of joint, reconstruct, frozen"),
    ({"epochs": 10, "predictor": "frozen", "train": "backbone", "losses": {"reconstruction": 1}},
     "predictor: frozen keeps still"),
    ({"epochs": 10, "predictor": "frozen", "train": "all", "losses": {"ce": 1}}, "use train: backbone"),
    ({"epochs": 10, "train": "predictor", "losses": {"ce": 1}}, "give losses a reconstruction weight"),
    ({"epochs": 10, "warmup_epochs": 10}, "must be shorter than the stage"),
    ({"epochs": 2.5}, "epochs must be an integer"),
    ({"epochs": 9}, "epochs is 10 but the stages add up to 9"),
])
def test_bad_stages_are_one_line_errors(stage, message):
    config = TrainConfig.from_dict(dict(epochs=10, stages=[stage]))
    with pytest.raises(UserError, match=message) as error:
        plan_stages(config)
    assert "\n" not in str(error.value)


def test_a_stage_schedule_is_the_releases():
    """Linear warm-up from warmup_lr, then the release's cosine from lr to min_lr over the rest of the stage."""
    config = load_config("sparsifiner_deit_s")
    model = timm.create_model("sparsifiner_nano4_8", depth=1)
    steps = 10
    for stage in plan_stages(config):
        optimizer, scheduler = enter_stage(config, model, stage, steps)
        warmup, total = round(stage.warmup_epochs * steps), stage.epochs * steps
        for t in range(total):
            scheduler.step_update(t)
            got = optimizer.param_groups[0]["lr"]
            i = t - warmup
            want = stage.warmup_lr + t * (stage.lr - stage.warmup_lr) / warmup if t < warmup else \
                stage.min_lr + 0.5 * (stage.lr - stage.min_lr) * (1 + math.cos(math.pi * i / (total - warmup)))
            assert got == pytest.approx(want, rel=1e-9), (stage.name, t)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert all((".predictor." in n) == (stage.train == "predictor") for n in trainable)
        assert {id(p) for g in optimizer.param_groups for p in g["params"]} == \
            {id(p) for p in model.parameters() if p.requires_grad}


def test_the_presets_build_coherent_runs():
    for name, epochs in (("sparsifiner_deit_s", (5, 45)), ("sparsifiner_digits", (1, 9)),
                         ("sparsifiner_cifar10", (1, 2)), ("sparsifiner_tokens_digits", (1, 9)),
                         ("sparsifiner_tokens_cifar10", (1, 2))):
        config = load_config(name)
        stages = plan_stages(config)
        assert [s.epochs for s in stages] == list(epochs) and [s.train for s in stages] == ["predictor", "backbone"]
        assert [s.predictor for s in stages] == ["reconstruct", "frozen"]
        assert stages[0].losses == {"reconstruction": 0.01} and stages[1].losses == {"ce": 1.0, "kl": 0.5,
                                                                                     "tokens": 0.5}
    # The token presets are the released ones with token pruning at ρ = 0.7, nothing else changed.
    for data in ("digits", "cifar10"):
        released = load_config(f"sparsifiner_{data}").to_dict()
        tokens = load_config(f"sparsifiner_tokens_{data}").to_dict()
        assert tokens.pop("model_kwargs") == dict(released.pop("model_kwargs"), token_keep_rate=0.7)
        assert tokens == released
    # The ImageNet teacher is timm's DeiT-S, paired layer by layer with the student for the attention target.
    config = load_config("sparsifiner_deit_s")
    student = timm.create_model(config.model, **config.model_kwargs)
    teacher = timm.create_model(config.teacher)
    mait.mask_model(teacher, scheme="none")
    objective = Objective(plan_stages(config)[0].losses, torch.nn.CrossEntropyLoss(), teacher, student)
    assert len(objective.pairs) == 12


@pytest.mark.parametrize("data, shape, seen", [("digits", (1, 8, 8), [64, 64, 45, 32]),          # prune after 1, 2, 3
                                               ("cifar10", (3, 32, 32), [64, 64, 45, 45, 32, 22])])  # after 1, 3, 4
def test_a_training_step_of_the_token_presets(dense_digits: Path, data: str, shape: tuple, seen: list):
    """One step of each stage of a token preset: the first keeps every token and moves only the predictors; the
    second prunes (45, 32, 22 of the 64 patches; ``seen``: the patches each attention layer gets), its loss is
    CE + 0.5 KL + 0.5 MSE against the teacher's final tokens at the kept positions, and it moves only the
    backbone."""
    config = load_config(f"sparsifiner_tokens_{data}")
    info = DataInfo(data, 10, shape[0], shape[1], 64, 64)
    torch.manual_seed(0)
    student = build_model(config, info)
    teacher = timm.create_model(config.teacher, num_classes=10, in_chans=shape[0], img_size=shape[1],
                                **config.teacher_kwargs)
    if data == "digits":
        load_weights(teacher, dense_digits)
        load_weights(student, dense_digits, strict=False)
    else:
        student.load_state_dict(teacher.state_dict(), strict=False)
    images, labels = torch.randn(6, *shape), torch.randint(0, 10, (6,))
    counts = []
    for block in student.blocks:
        block.attn.register_forward_pre_hook(lambda module, inputs: counts.append(inputs[0].shape[1] - 1))
    first, second = plan_stages(config)
    for stage in (first, second):
        optimizer, _ = enter_stage(config, student, stage, steps=10)
        for group in optimizer.param_groups:        # the stage's peak rate (its schedule starts at warmup_lr 0)
            group["lr"] = stage.lr
        objective = Objective(stage.losses, torch.nn.CrossEntropyLoss(), teacher.eval(), student)
        before = {name: param.detach().clone() for name, param in student.named_parameters()}
        counts.clear()
        outputs = student.train()(images)
        loss, _ = objective(student, images, outputs, labels)
        if stage is first:
            assert counts == [64] * len(seen) and student.token_index is None
        else:
            assert counts == seen and student.token_index.shape == (6, 22)
            index = student.token_index
            with torch.no_grad():               # no dropout or drop path: the eval forward is the training one
                features = teacher.forward_features(images)
                logits = teacher.forward_head(features)
                mine = student.eval().forward_features(images)[:, 1:]
            assert torch.equal(student.token_index, index)
            theirs = features[:, 1:].gather(1, index[..., None].expand(-1, -1, features.shape[-1]))
            kl = (F.softmax(logits, -1) * (F.log_softmax(logits, -1) - F.log_softmax(outputs, -1))).sum(-1).mean()
            want = F.cross_entropy(outputs, labels) + 0.5 * kl + 0.5 * (mine - theirs).pow(2).mean()
            torch.testing.assert_close(loss, want)
        loss.backward()
        optimizer.step()
        objective.close()
        moved = {name for name, param in student.named_parameters() if not torch.equal(param, before[name])}
        assert moved and all((".predictor." in name) == (stage.train == "predictor") for name in moved)


@pytest.mark.parametrize("preset", ["sparsifiner_digits", "sparsifiner_tokens_digits"])
def test_two_stage_run_resumes_exactly_across_the_stage_boundary(dense_digits: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, preset: str):
    """The digits presets on a subset: stage 1 moves only the predictors, stage 2 only the backbone, and a run
    interrupted at the stage boundary and resumed ends with the uninterrupted run's weights; with token
    pruning too (off while the predictors reconstruct, on in the second stage, the token loss over the kept
    tokens)."""
    from mait.errors import Interrupted
    from mait.models.mait import MaiT
    from mait.train import engine
    common = dict(init_from=str(dense_digits), teacher_checkpoint=str(dense_digits), train_subset=64,
                  val_subset=32, progress=False, deterministic=True, epochs=3,
                  stages=[{"name": "reconstruct", "epochs": 1, "lr": 6e-4, "min_lr": 4e-4, "warmup_epochs": 0.6,
                           "warmup_lr": 0.0, "train": "predictor", "predictor": "reconstruct",
                           "losses": {"reconstruction": 0.01}},
                          {"name": "sparse", "epochs": 2, "lr": 1.6e-4, "min_lr": 4e-6, "warmup_epochs": 0.6,
                           "warmup_lr": 0.0, "train": "backbone", "predictor": "frozen",
                           "losses": {"ce": 1.0, "kl": 0.5, "tokens": 0.5}}])
    pruned_in = []          # (training, the predictors' phase) of every forward that prunes tokens
    pruned_blocks = MaiT._pruned_blocks

    def watch(model, x):
        pruned_in.append((model.training, model.blocks[0].attn.predictor.phase))
        return pruned_blocks(model, x)

    monkeypatch.setattr(MaiT, "_pruned_blocks", watch)
    full = train(load_config(preset, dict(common, output=str(tmp_path / "full"))))
    assert [row["stage"] for row in full.history] == [1, 2, 2] and "train_recon_loss" in full.history[0]
    if preset == "sparsifiner_tokens_digits":   # pruned in evaluation and in the second stage's training only
        assert (True, "frozen") in pruned_in and (False, "frozen") in pruned_in
        assert all(phase == "frozen" for training, phase in pruned_in if training)
    else:
        assert not pruned_in
    end_epoch = engine._end_epoch

    def stop_after(epoch):
        def end_then_stop(run, log):
            end_epoch(run, log)
            if run.epoch == epoch:
                raise KeyboardInterrupt
        return end_then_stop

    monkeypatch.setattr(engine, "_end_epoch", stop_after(1))        # at the stage boundary
    config = load_config(preset, dict(common, output=str(tmp_path / "cut")))
    with pytest.raises(Interrupted):
        train(config)
    start = safetensors.torch.load_file(str(dense_digits))
    boundary = safetensors.torch.load_file(str(tmp_path / "cut" / "last.safetensors"))
    for key, value in boundary.items():
        if ".predictor." not in key:
            torch.testing.assert_close(value, start[key], rtol=0, atol=0, msg=key)
    monkeypatch.setattr(engine, "_end_epoch", stop_after(2))        # inside the second stage
    with pytest.raises(Interrupted):
        train(config, resume=True)
    monkeypatch.setattr(engine, "_end_epoch", end_epoch)
    resumed = train(config, resume=True)
    final = safetensors.torch.load_file(str(resumed.last_checkpoint))
    want = safetensors.torch.load_file(str(full.last_checkpoint))
    for key, value in final.items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)
        if ".predictor." in key:
            torch.testing.assert_close(value, boundary[key], rtol=0, atol=0, msg=key)
    assert [row["val_acc1"] for row in resumed.history] == [row["val_acc1"] for row in full.history]


def test_per_layer_keep_rates():
    model = timm.create_model("sparsifiner_nano4_8", keep_rate=[0.5, 0.25, 0.25, 0.13])
    assert [block.attn.predictor.kept for block in model.blocks] == [kept_keys(65, r) for r in (0.5, .25, .25, .13)]
    report = count_macs(model)
    assert [layer.attention_map for layer in report.layers if layer.name.startswith("blocks.")] == \
        [4 * 2 * 16 * (65 + 64 * kept) for kept in (33, 17, 17, 9)]
    with pytest.raises(ValueError, match="keep_rate lists 3 per-layer rates but the model has 4 layers"):
        timm.create_model("sparsifiner_nano4_8", keep_rate=[0.5, 0.25, 0.25])


def test_the_pruned_predictor_is_counted_by_its_nonzeros():
    torch.manual_seed(0)
    model = timm.create_model("sparsifiner_nano4_8", depth=1)
    predictor = model.blocks[0].attn.predictor
    _trained_scale(predictor, seed=5)
    images = torch.randn(3, 1, 8, 8)
    seen = {}
    predictor.register_forward_hook(lambda mod, inputs, output: seen.update(q=inputs[0], k=inputs[1]))
    report = count_macs(model, images=images)
    q, k = seen["q"], seen["k"]
    # By hand: the products before the map stay dense; the map multiplies, per patch query, the nonzeros of
    # the basis rows of its 8 kept coefficients.
    rows, tokens, c, n, d = 64, 65, 8, 10, 16
    before = (rows + tokens) * d * c + c * tokens * n + rows * c * n
    nonzeros = (predictor.proj_back_n.abs() > 0.02).sum(0)                  # per basis token
    chosen = predictor.coefficients(q, k).topk(8, dim=-1).indices           # (B, h, rows, 8)
    sparse_map = nonzeros[chosen].sum().item()
    assert report.predictor_sparse == pytest.approx((3 * 4 * before + sparse_map) / 3)
    assert report.predictor == 4 * predictor_macs(predictor, d) == 4 * (before + rows * n * tokens)
    assert report.predictor_sparse < report.predictor
    unpruned = timm.create_model("sparsifiner_nano4_8", depth=1, sparse_basis=False)
    assert count_macs(unpruned).predictor_sparse == count_macs(unpruned).predictor


def test_bad_losses_are_one_line_errors():
    student = timm.create_model("sparsifiner_nano4_8", depth=1)
    teacher = timm.create_model("mait_nano4_8", depth=1, scheme="none")
    criterion = torch.nn.CrossEntropyLoss()
    for weights, kwargs, message in [
            ({"ce": 1, "kld": 1}, {}, "unknown loss term 'kld'; the terms are ce, hard_distillation, kl, tokens"),
            ({"reconstruction": 1}, {"reconstruction_reduction": "mean"}, "reconstruction_reduction must be one of"),
            ({"reconstruction": 1}, {"reconstruction_target": "dense"}, "reconstruction_target must be one of"),
            ({"tokens": 1}, {"teacher": torch.nn.Linear(64, 10)}, "tokens loss term needs a ViT-like teacher"),
            ({"kl": 1}, {"teacher": None}, "the loss term kl needs a teacher"),
            ({"reconstruction": 1}, {"teacher": None}, "needs a teacher .* or set reconstruction_target: self"),
            ({"reconstruction": 1}, {"teacher": timm.create_model("mait_nano4_8", depth=2, scheme="none")},
             "needs a teacher with the student's attention layers; the teacher has 2 of 4 heads, the student 1")]:
        arguments = dict(dict(teacher=teacher), **kwargs)
        with pytest.raises(UserError, match=message) as error:
            Objective(weights, criterion, model=student, **arguments)
        assert "\n" not in str(error.value)
