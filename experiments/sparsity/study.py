"""The sparsity head-to-head of docs/sparsity.md: MaiT's fixed local masks against Sparsifiner's learned masks,
the published (released) Sparsifiner recipe against mait's variants.

    python experiments/sparsity/study.py run                    # every run not finished yet (digits, then CIFAR-10)
    python experiments/sparsity/study.py run 'rel*' --shard 0/2  # a subset, half of it (two processes)
    python experiments/sparsity/study.py run 'c10*' --device cuda  # the CIFAR-10 runs on a GPU
    python experiments/sparsity/study.py list                   # every run and whether it has finished
    python experiments/sparsity/study.py report                 # tables, ALS figure and learned-mask pictures
    python experiments/sparsity/study.py report tokens          # only the token-sparsity table

Digits runs from scratch are ``mait train --config src/mait/configs/small/digits.yaml`` (60 epochs)
plus the keys of their variant.  Fine-tuned variants start from the dense run of the same seed
(``--init-from``) and distil from it: the released recipe is the ``sparsifiner_digits`` preset (two
stages, 1 + 9 epochs), mait's joint fine-tune is one 10-epoch stage.  CIFAR-10 runs use the recipe of
the CIFAR-10 study (``experiments/cifar10/base.yaml``, 2 epochs) and the ``sparsifiner_cifar10``
preset's stages (1 + 2 epochs) for the fine-tunes.  The token-sparsity rows fine-tune the same dense
run through the same second stage with tokens pruned (``sparsifiner_tokens_*`` presets: pruning only
in the second stage, as released), each against the control without sparsity.  Each run trains at one thread into
``runs/sparsity-study/<variant>-s<seed>`` (a finished run is skipped); ``report`` writes
``experiments/sparsity/results/``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RUN_DIR = ROOT / "runs" / "sparsity-study"
RESULTS = HERE / "results"
CONFIGS = ROOT / "src" / "mait" / "configs"
BASE = CONFIGS / "small" / "digits.yaml"
RELEASED = CONFIGS / "small" / "sparsifiner_digits.yaml"
CIFAR_BASE = ROOT / "experiments" / "cifar10" / "base.yaml"
CIFAR_RELEASED = CONFIGS / "small" / "sparsifiner_cifar10.yaml"
TOKENS = {False: CONFIGS / "small" / "sparsifiner_tokens_digits.yaml",        # the released recipe + token pruning
          True: CONFIGS / "small" / "sparsifiner_tokens_cifar10.yaml"}
SEEDS = (0, 1, 2)
R3_KEEP = 0.13          # kept fraction of a 3x3 window on the 8x8 grid + class token: 8.56 of 65 keys
TOKEN_KEEP = 0.7        # the token presets' ρ: 45, 32, 22 of the 64 patches stay after blocks 1, 2, 3 (digits)
# mait's variant of the learned heads (before it followed the release): one joint stage, each layer's own
# attention as the reconstruction target, the per-row loss at weight 1, masks from the unpruned map.
MAIT_JOINT = dict(reconstruction_target="self", reconstruction_reduction="row_mean", reconstruction_weight=1.0)
UNPRUNED = {"sparse_basis": False}
JOINT_FT = dict(epochs=10, warmup_epochs=1, lr=5e-4)     # mait's fine-tune: one stage, DeiT hard distillation
# Scaled by epochs, the digits' first stage is 45 steps, too few for the predictor to learn (its reconstruction
# error falls by 6 %); the long variants give it 20 epochs (900 steps, a fifth of the release's 4,765).
LONG_FIRST_STAGE = 20
# What a fine-tune takes from a released preset (the rest, data and augmentation, stays the study's).
RECIPE_KEYS = ("model", "model_kwargs", "teacher", "teacher_kwargs", "reconstruction_target",
               "reconstruction_reduction", "epochs", "stages", "drop_path", "opt", "weight_decay", "smoothing")

# variant -> (label, keys); ``start``: "scratch", "released" (the preset's two stages from dense; ``recipe``: the
# token preset instead), "joint" (mait's one-stage fine-tune from dense) or "control" (the dense model through the
# released second stage; with ``scheme`` and ``model_kwargs``, a mait_* model with fixed masks or token pruning).
# ``table``: "tokens" for the token-sparsity head-to-head (its own table, each row against the control).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("dense (no mask)", dict(model="mait_nano4_8", scheme="none")),
    "all": ("MaiT, every head hard (`all`)", dict(model="mait_nano4_8", scheme="all")),
    "sch1": ("MaiT Sch.1 (one hard head)", dict(model="mait_nano4_8", scheme="sch1")),
    "random": ("random masks, every head (`*:rrrr`)", dict(model="mait_nano4_8", scheme="*:rrrr")),
    "rel25": ("Sparsifiner, published recipe, keep 0.25", dict(start="released")),
    "rel13": ("Sparsifiner, published recipe, keep 0.13 (= 3x3 kept fraction)",
              dict(start="released", model_kwargs={"keep_rate": R3_KEEP})),
    "rel25np": ("Sparsifiner, published recipe, keep 0.25, masks from the unpruned map (mait's)",
                dict(start="released", model_kwargs={"keep_rate": 0.25, **UNPRUNED})),
    "rel25zero": ("Sparsifiner, published recipe, keep 0.25, `mode=\"zero\"` (mait's)",
                  dict(start="released", model_kwargs={"keep_rate": 0.25, "mode": "zero"})),
    "rel25long": ("Sparsifiner, published recipe, keep 0.25, first stage 20 epochs instead of 1",
                  dict(start="released", first_stage_epochs=LONG_FIRST_STAGE)),
    "rel13long": ("Sparsifiner, published recipe, keep 0.13, first stage 20 epochs instead of 1",
                  dict(start="released", model_kwargs={"keep_rate": R3_KEEP}, first_stage_epochs=LONG_FIRST_STAGE)),
    "denseft": ("control: dense through the published second stage (9 epochs, same losses)", dict(start="control")),
    "joint25ft": ("Sparsifiner keep 0.25, mait's joint fine-tune (self target, unpruned, hard distillation)",
                  dict(start="joint", model="sparsifiner_nano4_8", model_kwargs={"keep_rate": 0.25, **UNPRUNED},
                       **MAIT_JOINT)),
    "densejft": ("control: dense, mait's joint fine-tune (same 10 epochs)",
                 dict(start="joint", model="mait_nano4_8", scheme="none")),
    "joint13": ("Sparsifiner keep 0.13 from scratch, mait's joint training (self target, unpruned)",
                dict(model="sparsifiner_nano4_8", model_kwargs={"keep_rate": R3_KEEP, **UNPRUNED}, **MAIT_JOINT)),
    "joint25": ("Sparsifiner keep 0.25 from scratch, mait's joint training (self target, unpruned)",
                dict(model="sparsifiner_nano4_8", model_kwargs={"keep_rate": 0.25, **UNPRUNED}, **MAIT_JOINT)),
    "tok70": ("token sparsity alone: dense, tokens pruned (ρ 0.7) through the published second stage",
              dict(start="control", model_kwargs={"token_keep_rate": TOKEN_KEEP}, table="tokens")),
    "reltok70": ("both: Sparsifiner's published recipe, keep 0.25, tokens pruned (ρ 0.7) in its second stage",
                 dict(start="released", recipe="tokens", table="tokens")),
    "allft": ("MaiT's fixed masks (every head hard) through the published second stage",
              dict(start="control", scheme="all", table="tokens")),
    "alltok70": ("MaiT's fixed masks (every head hard) + tokens pruned (ρ 0.7) through the published second stage",
                 dict(start="control", scheme="all", model_kwargs={"token_keep_rate": TOKEN_KEEP}, table="tokens")),
    "c10dense": ("CIFAR-10: dense (no mask)", dict(model="mait_mini6_32", scheme="none", cifar=True)),
    "c10all": ("CIFAR-10: MaiT, every head hard (`all`)", dict(model="mait_mini6_32", scheme="all", cifar=True)),
    "c10rel25": ("CIFAR-10: Sparsifiner, published recipe, keep 0.25", dict(start="released", cifar=True)),
    "c10rel13": ("CIFAR-10: Sparsifiner, published recipe, keep 0.13",
                 dict(start="released", model_kwargs={"keep_rate": R3_KEEP}, cifar=True)),
    "c10denseft": ("CIFAR-10: control: dense through the published second stage (2 epochs)",
                   dict(start="control", cifar=True)),
    "c10tok70": ("CIFAR-10: token sparsity alone: dense, tokens pruned (ρ 0.7) through the published second stage",
                 dict(start="control", model_kwargs={"token_keep_rate": TOKEN_KEEP}, cifar=True, table="tokens")),
    "c10reltok70": ("CIFAR-10: both: published recipe, keep 0.25, tokens pruned (ρ 0.7) in its second stage",
                    dict(start="released", recipe="tokens", cifar=True, table="tokens")),
    "c10allft": ("CIFAR-10: MaiT's fixed masks (every head hard) through the published second stage",
                 dict(start="control", scheme="all", cifar=True, table="tokens")),
    "c10alltok70": ("CIFAR-10: MaiT's fixed masks (every head hard) + tokens pruned (ρ 0.7), published second stage",
                    dict(start="control", scheme="all", model_kwargs={"token_keep_rate": TOKEN_KEEP}, cifar=True,
                         table="tokens")),
}
# The token-sparsity head-to-head: its rows, each against the control (the dense model through the same second
# stage), beside the attention-only recipe and the control themselves.
TOKEN_ROWS = {False: ("denseft", "rel25", "tok70", "reltok70", "allft", "alltok70"),
              True: ("c10denseft", "c10rel25", "c10tok70", "c10reltok70", "c10allft", "c10alltok70")}
DENSE_OF = {False: "dense", True: "c10dense"}
CONTROL_OF = {False: "denseft", True: "c10denseft"}


def run_names() -> list[str]:
    """Seed-major, dense first (fine-tunes need the dense run of their seed); digits, then CIFAR-10."""
    digits = [v for v in VARIANTS if not VARIANTS[v][1].get("cifar")]
    cifar = [v for v in VARIANTS if VARIANTS[v][1].get("cifar")]
    return [f"{v}-s{seed}" for seed in SEEDS for v in digits] + [f"{v}-s{seed}" for seed in SEEDS for v in cifar]


def _released(cifar: bool, recipe: str = "released") -> dict[str, Any]:
    path = TOKENS[cifar] if recipe == "tokens" else CIFAR_RELEASED if cifar else RELEASED
    preset = yaml.safe_load(path.read_text())
    return {key: preset[key] for key in RECIPE_KEYS if key in preset}


def config_of(name: str) -> dict[str, Any]:
    """The training keys of run ``name`` (``<variant>-s<seed>``)."""
    variant, seed = name.rsplit("-s", 1)
    keys = dict(VARIANTS[variant][1])
    cifar, start, recipe = keys.pop("cifar", False), keys.pop("start", "scratch"), keys.pop("recipe", "released")
    keys.pop("table", None)
    config = dict(yaml.safe_load((CIFAR_BASE if cifar else BASE).read_text()), seed=int(seed),
                  output=str(RUN_DIR / name), progress=False)
    dense = RUN_DIR / f"{DENSE_OF[cifar]}-s{seed}" / "last.safetensors"
    teacher = dict(init_from=str(dense), teacher_checkpoint=str(dense))
    if start in ("released", "control"):
        config.update(_released(cifar, recipe), **teacher)
        if "model_kwargs" in keys and start == "released":
            config["model_kwargs"] = dict(config["model_kwargs"], **keys.pop("model_kwargs"))
        if "first_stage_epochs" in keys:
            first = dict(config["stages"][0], epochs=keys.pop("first_stage_epochs"))
            config["stages"] = [first, *config["stages"][1:]]
            config["epochs"] = sum(stage["epochs"] for stage in config["stages"])
    if start == "control":       # the dense model: the second stage alone, as long as the released one
        second = config["stages"][-1]
        config.update(model=config["teacher"], scheme="none", model_kwargs={}, stages=[second],
                      epochs=second["epochs"])
    if start == "joint":
        config.update(teacher=keys["model"].replace("sparsifiner", "mait"), teacher_kwargs={"scheme": "none"},
                      **teacher, **JOINT_FT)
    config.update(keys)
    return config


def throughput(model: Any, images: Any, rounds: int = 3) -> float:
    """Best-of-``rounds`` inference images/s over ``images`` (one batch), one thread (recorded per run; the
    table uses :func:`side_by_side_speed`, which is comparable across variants)."""
    import torch
    model.eval()
    best = 0.0
    with torch.inference_mode():
        model(images[:8])
        for _ in range(rounds):
            start = time.perf_counter()
            model(images)
            best = max(best, len(images) / (time.perf_counter() - start))
    return best


def run(patterns: list[str], shard: str, device: str = "cpu") -> None:
    import torch
    torch.set_num_threads(1)
    from mait.train import TrainConfig, train
    from mait.train.checkpoint import load_weights
    from mait.train.data import build_loaders
    from mait.train.models import build_model
    index, count = (int(x) for x in shard.split("/"))
    names = [n for n in run_names() if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    for position, name in enumerate(names):
        if position % count != index or (RUN_DIR / name / "result.json").is_file():
            continue
        config = TrainConfig.from_dict(dict(config_of(name), device=device))
        if config.init_from and not Path(config.init_from).is_file():
            print(f"skip {name}: its dense run is not finished", flush=True)
            continue
        print(f"run {name}", flush=True)
        result = train(config, resume=(RUN_DIR / name / "last.state.pt").is_file())
        loaders = build_loaders(config)
        model = build_model(config, loaders.info).cpu()
        load_weights(model, result.last_checkpoint)
        images = torch.cat([batch.cpu() for batch, _ in loaders.val])[:512]
        record = {"name": name, "acc1": result.final_acc1, "best_acc1": result.best_acc1,
                  "img_s": throughput(model, images), "wall_s": result.wall_time,
                  "epoch_s": [row["epoch_time"] for row in result.history],
                  "recon_first": result.history[0].get("train_recon_loss"),
                  "recon_last": max((row for row in result.history if "train_recon_loss" in row),
                                    key=lambda row: row["epoch"], default={}).get("train_recon_loss")}
        (RUN_DIR / name / "result.json").write_text(json.dumps(record, indent=1))
        print(f"done {name}: {record}", flush=True)


def cost_of(variant: str) -> Any:
    """The :class:`mait.cost.CostReport` of the variant's model per image, its predictors counted both densely
    and with the sparse basis's actual nonzeros (the seed-0 run's trained predictor on 256 held-out images, when
    it has finished)."""
    import timm
    import torch
    from mait.cost import count_macs
    from mait.train.runs import held_out_images, open_run
    config = config_of(variant + "-s0")
    checkpoint = RUN_DIR / f"{variant}-s0" / "last.safetensors"
    if checkpoint.is_file():
        run = open_run(checkpoint)
        loader, info = held_out_images(run.config, 256, batch_size=256)
        model = run.model(info)
        images = next(iter(loader))[0]
    else:
        model = timm.create_model(config["model"], **({"scheme": config["scheme"]} if "scheme" in config else {}),
                                  **config.get("model_kwargs", {}))
        images = None
    with torch.inference_mode():
        return count_macs(model.eval(), images=images)


def mhsa_mmacs(variant: str) -> tuple[float, float]:
    """MHSA MACs per image in millions: attention maps + predictor counted densely, and by its nonzeros."""
    report = cost_of(variant)
    return report.mhsa / 1e6, report.mhsa_sparse / 1e6


def side_by_side_speed(variants: list[str], shape: tuple[int, ...], rounds: int = 15,
                       batch: int = 256) -> dict[str, float]:
    """Inference images/s of every variant's model, timed in interleaved rounds in one process (best round:
    on a shared machine the fastest round is the one least disturbed by other jobs).

    Weights do not change the cost (the learned masks are predicted either way), so fresh models are
    timed; one thread, one batch of inputs of ``shape``.
    """
    import random
    import timm
    import torch
    import mait  # noqa: F401  (registers the models)
    torch.set_num_threads(1)
    models = {}
    for variant in variants:
        config = config_of(variant + "-s0")
        kwargs = dict(config.get("model_kwargs", {}), **({"scheme": config["scheme"]} if "scheme" in config else {}))
        models[variant] = timm.create_model(config["model"], **kwargs).eval()
    images = torch.randn(batch, *shape)
    times: dict[str, list[float]] = {v: [] for v in models}
    with torch.inference_mode():
        for _ in range(rounds):
            order = list(models)
            random.shuffle(order)
            for variant in order:
                models[variant](images)
                start = time.perf_counter()
                models[variant](images)
                times[variant].append(time.perf_counter() - start)
    return {v: batch / min(t) for v, t in times.items()}


def baseline(variant: str) -> str:
    """The variant a paired difference is taken against: the dense model fine-tuned the same way (released
    recipe and the variants through its second stage: that stage; mait's joint fine-tune: the same stage), else
    the dense model of the same data."""
    start, cifar = VARIANTS[variant][1].get("start"), VARIANTS[variant][1].get("cifar", False)
    if start == "released" or (start == "control" and variant != CONTROL_OF[cifar]):
        return CONTROL_OF[cifar]
    if start == "joint" and variant != "densejft":
        return "densejft"
    return DENSE_OF[cifar]


def mean_std(values: list[float], empty: str, signed: bool = False) -> str:
    """``mean ± std`` (one value: the value; none: ``empty``)."""
    sign = "+" if signed else ""
    if not values:
        return empty
    if len(values) == 1:
        return f"{values[0]:{sign}.2f}"
    return f"{statistics.mean(values):{sign}.2f} ± {statistics.stdev(values):.2f}"


def results() -> dict[str, dict[int, dict[str, Any]]]:
    """variant -> seed -> the run's result.json, for the finished runs."""
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for name in run_names():
        path = RUN_DIR / name / "result.json"
        if path.is_file():
            variant, seed = name.rsplit("-s", 1)
            found.setdefault(variant, {})[int(seed)] = json.loads(path.read_text())
    return found


def head_to_head() -> str:
    """The table: top-1 per variant, paired differences, per-seed values, MHSA MACs and speed."""
    done = results()
    variants = [v for v in VARIANTS if VARIANTS[v][1].get("table") != "tokens"]
    cifar = [v for v in variants if VARIANTS[v][1].get("cifar")]
    speed = side_by_side_speed([v for v in variants if v not in cifar], (1, 8, 8))
    speed |= side_by_side_speed(cifar, (3, 32, 32), batch=64)
    rows = ["| variant | runs | top-1 % (mean ± std) | per seed (0 / 1 / 2) | Δ top-1 vs its baseline, same seed "
            "(mean ± std) | MHSA MMACs: dense predictor / pruned | img/s (1 thread) | vs dense |",
            "|---|---|---|---|---|---|---|---|"]
    for variant in variants:
        label = VARIANTS[variant][0]
        accs = {seed: record["acc1"] for seed, record in done.get(variant, {}).items()}
        base = baseline(variant)
        base_accs = {seed: record["acc1"] for seed, record in done.get(base, {}).items()}
        deltas = [acc - base_accs[seed] for seed, acc in accs.items() if seed in base_accs]
        per_seed = " / ".join(f"{accs[seed]:.2f}" if seed in accs else "-" for seed in SEEDS)
        dense_macs, pruned_macs = mhsa_mmacs(variant)
        dense_speed = speed[DENSE_OF[variant in cifar]]
        delta = f"{mean_std(deltas, '', signed=True)} (vs {base})" if deltas and variant != base else ""
        rows.append(f"| {label} | {len(accs)} | {mean_std(list(accs.values()), 'not run yet')} | {per_seed} | "
                    f"{delta} | {dense_macs:.3f} / {pruned_macs:.3f} | {speed[variant]:.0f} | "
                    f"{speed[variant] / dense_speed:.2f}x |")
    return "\n".join(rows)


def token_head_to_head(cifar: bool = False) -> str:
    """The token-sparsity table: token pruning alone, Sparsifiner's attention sparsity alone (as released), both,
    and MaiT's fixed masks with token pruning, each against the control (the dense model through the same second
    stage): top-1, paired differences, whole-model MACs and speed (interleaved, against the control's model)."""
    variants = TOKEN_ROWS[cifar]
    control = CONTROL_OF[cifar]
    speed = side_by_side_speed(list(variants), (3, 32, 32) if cifar else (1, 8, 8), rounds=5,
                               batch=64 if cifar else 256)
    costs = {variant: cost_of(variant) for variant in variants}
    done = results()
    rows = ["| variant | runs | top-1 % (mean ± std) | per seed (0 / 1 / 2) | Δ top-1 vs control, same seed "
            "(mean ± std; per seed) | whole-model MMACs: dense predictor / pruned | vs control | img/s (1 thread) "
            "| vs control |", "|---|---|---|---|---|---|---|---|---|"]
    for variant in variants:
        accs = {seed: record["acc1"] for seed, record in done.get(variant, {}).items()}
        base = {seed: record["acc1"] for seed, record in done.get(control, {}).items()}
        deltas = {seed: acc - base[seed] for seed, acc in accs.items() if seed in base}
        delta = "" if variant == control or not deltas else \
            f"{mean_std(list(deltas.values()), '', signed=True)} ({' / '.join(f'{d:+.2f}' for d in deltas.values())})"
        per_seed = " / ".join(f"{accs[seed]:.2f}" if seed in accs else "-" for seed in SEEDS)
        report, reference = costs[variant], costs[control]
        rows.append(f"| {VARIANTS[variant][0]} | {len(accs)} | {mean_std(list(accs.values()), 'not run yet')} | "
                    f"{per_seed} | {delta} | {report.macs / 1e6:.2f} / {report.macs_sparse / 1e6:.2f} | "
                    f"{report.macs_sparse / reference.macs - 1:+.1%} | {speed[variant]:.0f} | "
                    f"{speed[variant] / speed[control]:.2f}x |")
    return "\n".join(rows)


ALS_VARIANTS = ("dense", "rel25", "rel25long", "rel13long", "rel25np", "joint25ft", "joint25")


def locality() -> str:
    """Learned-mask ALS by layer of the seed-0 runs against the dense model's attention ALS; writes the figure."""
    import torch
    from mait.analysis import measure_als
    from mait.analysis.learned_masks import measure_mask_locality
    from mait.train.runs import held_out_images, open_run
    als: dict[str, list[float]] = {}
    for variant in ALS_VARIANTS:
        checkpoint = RUN_DIR / f"{variant}-s0" / "last.safetensors"
        if not checkpoint.is_file():
            continue
        run = open_run(checkpoint)
        loader, info = held_out_images(run.config, 360, batch_size=120)
        model = run.model(info)
        with torch.inference_mode():
            if variant == "dense":
                als["dense attention ALS"] = [float(a.mean()) for a in measure_als(model, loader)]
            else:
                als[f"{variant} mask ALS"] = [float(a.mean()) for a in measure_mask_locality(model, loader)]
    (RESULTS / "als_by_layer.json").write_text(json.dumps(als, indent=1))
    lines = ["| layer | " + " | ".join(als) + " |", "|---" * (len(als) + 1) + "|"]
    depth = max((len(v) for v in als.values()), default=0)
    for layer in range(depth):
        lines.append(f"| {layer} | " + " | ".join(f"{v[layer]:.3f}" for v in als.values()) + " |")
    if als:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        figure, axis = plt.subplots(figsize=(6, 4))
        for label, values in als.items():
            axis.plot(range(len(values)), values, marker="o", label=label)
        axis.axhline(7.5625 / 65, color="grey", linestyle=":", label="no locality (window share of all keys)")
        axis.set(xlabel="layer", ylabel="ALS (R = 3), mean over heads", title="Do learned masks become local? (digits)")
        axis.set_xticks(range(depth))
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(RESULTS / "als_by_layer.png", dpi=100)
    return "\n".join(lines)


QUALITY_VARIANTS = ("rel25", "rel25long", "rel13", "rel13long", "rel25np", "joint25ft")


def predictor_quality() -> str:
    """How well each seed-0 predictor learned: the reconstruction error of its dense map against the dense
    model's attention (per query row, on 360 held-out images, with the dense model's backbone), next to a
    freshly initialised predictor's, and how much the kept keys of two patch queries (0 and 40) overlap."""
    import torch
    import timm
    from mait.learned import predictors, reconstruction_loss, set_phase
    from mait.train.checkpoint import load_weights
    from mait.train.runs import held_out_images, open_run
    lines = ["| predictor | reconstruction error (row mean, vs the dense model's attention) | "
             "kept keys shared by queries 0 and 40 |", "|---|---|---|"]
    for variant in ("init", *QUALITY_VARIANTS):
        source = "rel25" if variant == "init" else variant
        checkpoint = RUN_DIR / f"{source}-s0" / "last.safetensors"
        if not checkpoint.is_file():
            continue
        run = open_run(checkpoint)
        config = run.config
        loader, info = held_out_images(config, 360, batch_size=360)
        images = next(iter(loader))[0]
        model = run.model(info)
        if variant == "init":
            torch.manual_seed(0)
            fresh = timm.create_model(config.model, **config.model_kwargs)
            model.load_state_dict({k: v for k, v in fresh.state_dict().items() if ".predictor." in k}, strict=False)
        dense = timm.create_model("mait_nano4_8", scheme="none")
        load_weights(dense, RUN_DIR / "dense-s0" / "last.safetensors")
        model.load_state_dict(dense.state_dict(), strict=False)          # the backbone the predictor was fitted to
        for block in dense.blocks:
            block.attn.capture_attention = True
        with torch.no_grad():
            dense.eval()(images)
        targets = [block.attn.last_attention[:, :, 1:] for block in dense.blocks]
        model.train()
        set_phase(model, "reconstruct")
        model(images)
        error = reconstruction_loss(model, targets, "row_mean").item()
        model.eval()
        for block in model.blocks:
            block.attn.capture_attention = True
        with torch.no_grad():
            model(images)
        keeps = [p.last_keep[:, :, 1:] for p in predictors(model)]
        shared = statistics.mean(float(((k[:, :, 0] & k[:, :, 40]).sum(-1).float() / k[:, :, 0].sum(-1)).mean())
                                 for k in keeps)
        label = "fresh predictor (initialisation)" if variant == "init" else VARIANTS[variant][0]
        lines.append(f"| {label} | {error:.3f} | {shared:.2f} |")
    return "\n".join(lines)


def report(tables: list[str]) -> None:
    RESULTS.mkdir(exist_ok=True)
    if "tokens" in tables:
        for cifar, name in ((False, "token_head_to_head.md"), (True, "token_head_to_head_cifar10.md")):
            if not results().get(CONTROL_OF[cifar]):
                continue                # a table only once its control has run here (runs/ is not kept)
            table = token_head_to_head(cifar)
            (RESULTS / name).write_text(table + "\n")
            print(table)
    if "attention" in tables:
        attention_report()


def attention_report() -> None:
    """The attention-sparsity head-to-head, the learned masks' locality and predictor quality, mask pictures."""
    from mait.cli import main as mait
    table = head_to_head()
    (RESULTS / "head_to_head.md").write_text(table + "\n")
    print(table)
    lines = locality()
    (RESULTS / "als_by_layer.md").write_text(lines + "\n")
    print(lines)
    quality = predictor_quality()
    (RESULTS / "predictor_quality.md").write_text(quality + "\n")
    print(quality)
    for variant in ("rel25", "rel25long", "rel25np"):    # the kept keys of one patch, pruned and unpruned
        checkpoint = RUN_DIR / f"{variant}-s0" / "last.safetensors"
        if checkpoint.is_file():
            mait(["show-mask", "--checkpoint", str(checkpoint), "--layer", "3", "--query", "40",
                  "--output", str(RESULTS / f"show_mask_{variant}_l3_q40.png")])


def listing() -> None:
    for name in run_names():
        print(f"{name:<16} {'done' if (RUN_DIR / name / 'result.json').is_file() else 'pending'}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("patterns", nargs="*", help="run names or globs (default: all)")
    run_parser.add_argument("--shard", default="0/1", help="i/n: run every n-th pending run from the i-th")
    run_parser.add_argument("--device", default="cpu", help="training device (cpu, cuda); speed is always timed on the CPU")
    report_parser = sub.add_parser("report")
    report_parser.add_argument("tables", nargs="*", choices=["attention", "tokens"], default=["attention", "tokens"],
                               help="which tables (default: both): attention sparsity, token sparsity")
    sub.add_parser("list")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.patterns, args.shard, args.device)
    elif args.command == "list":
        listing()
    else:
        report(args.tables)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
