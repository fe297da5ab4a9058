"""The sparsity head-to-head of docs/sparsity.md: MaiT's fixed local masks against Sparsifiner's learned masks.

    python experiments/sparsity/study.py run                    # every run not finished yet (digits, then CIFAR-10)
    python experiments/sparsity/study.py run 'sp25*' --shard 0/2  # a subset, half of it (two processes)
    python experiments/sparsity/study.py run 'c10*' --device cuda  # the CIFAR-10 runs on a GPU
    python experiments/sparsity/study.py report                 # table + ALS figure from the saved runs

Each digits run is ``mait train --config src/mait/configs/small/digits.yaml`` (60 epochs) plus the
keys of its variant below, at one thread, written to
``runs/sparsity-study/<variant>-s<seed>`` (a finished run is skipped).  The fine-tuned
Sparsifiner variants (``*ft``) follow the published recipe: start from the dense run of the
same seed (``--init-from``), train with the reconstruction loss and DeiT hard distillation
from that dense model, ``FT_EPOCHS`` epochs.  ``report`` writes ``experiments/sparsity/results/``.
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
BASE = ROOT / "src" / "mait" / "configs" / "small" / "digits.yaml"
SEEDS = (0, 1, 2)
# CIFAR-10: the CPU recipe of the CIFAR-10 study (docs/reproduction.md: 2 epochs of mait_mini6_32); three seeds.
CIFAR_BASE = ROOT / "experiments" / "cifar10" / "base.yaml"
CIFAR_SEEDS = (0, 1, 2)
FT_EPOCHS = 10          # the fine-tuning stage of the published recipe, after the 60-epoch dense run
R3_KEEP = 0.13          # kept fraction of a 3x3 window on the 8x8 grid + class token: 8.56 of 65 keys

# variant -> (label, config keys); the order is the table's.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dense": ("dense (no mask)", dict(model="mait_nano4_8", scheme="none")),
    "all": ("MaiT, every head hard (`all`)", dict(model="mait_nano4_8", scheme="all")),
    "sch1": ("MaiT Sch.1 (one hard head)", dict(model="mait_nano4_8", scheme="sch1")),
    "random": ("random masks, every head (`*:rrrr`)", dict(model="mait_nano4_8", scheme="*:rrrr")),
    "sp13": ("Sparsifiner keep 0.13 (= 3x3 kept fraction)",
             dict(model="sparsifiner_nano4_8", model_kwargs={"keep_rate": R3_KEEP})),
    "sp25": ("Sparsifiner keep 0.25", dict(model="sparsifiner_nano4_8", model_kwargs={"keep_rate": 0.25})),
    "sp25zero": ("Sparsifiner keep 0.25, `mode=\"zero\"` (MaiT's semantics on the learned mask)",
                 dict(model="sparsifiner_nano4_8", model_kwargs={"keep_rate": 0.25, "mode": "zero"})),
    "sp50": ("Sparsifiner keep 0.5", dict(model="sparsifiner_nano4_8", model_kwargs={"keep_rate": 0.5})),
    "hybrid": ("hybrid `*:hllu` (1 local, 2 learned at 0.25, 1 unmasked)",
               dict(model="mait_nano4_8", scheme="*:hllu", model_kwargs={"keep_rate": 0.25})),
    "sp25ft": ("Sparsifiner keep 0.25, fine-tuned from dense + distillation",
               dict(model="sparsifiner_nano4_8", model_kwargs={"keep_rate": 0.25}, finetune=True)),
    "denseft": ("control: dense, fine-tuned from dense + distillation (same extra epochs)",
                dict(model="mait_nano4_8", scheme="none", finetune=True)),
    "c10dense": ("CIFAR-10: dense (no mask)", dict(model="mait_mini6_32", scheme="none", cifar=True)),
    "c10all": ("CIFAR-10: MaiT, every head hard (`all`)", dict(model="mait_mini6_32", scheme="all", cifar=True)),
    "c10sch1": ("CIFAR-10: MaiT Sch.1", dict(model="mait_mini6_32", scheme="sch1", cifar=True)),
    "c10random": ("CIFAR-10: random masks, every head (`*:rrr`)",
                  dict(model="mait_mini6_32", scheme="*:rrr", cifar=True)),
    "c10sp13": ("CIFAR-10: Sparsifiner keep 0.13",
                dict(model="sparsifiner_mini6_32", model_kwargs={"keep_rate": R3_KEEP}, cifar=True)),
    "c10sp25": ("CIFAR-10: Sparsifiner keep 0.25",
                dict(model="sparsifiner_mini6_32", model_kwargs={"keep_rate": 0.25}, cifar=True)),
    "c10sp50": ("CIFAR-10: Sparsifiner keep 0.5",
                dict(model="sparsifiner_mini6_32", model_kwargs={"keep_rate": 0.5}, cifar=True)),
    "c10hybrid": ("CIFAR-10: hybrid `*:hlu` (keep 0.25)",
                  dict(model="mait_mini6_32", scheme="*:hlu", model_kwargs={"keep_rate": 0.25}, cifar=True)),
}


def run_names() -> list[str]:
    # Seed-major, dense first: fine-tuned runs need the dense run of their seed.
    digits = [v for v in VARIANTS if not VARIANTS[v][1].get("cifar")]
    cifar = [v for v in VARIANTS if VARIANTS[v][1].get("cifar")]
    return [f"{v}-s{seed}" for seed in SEEDS for v in digits] + [f"{v}-s{seed}" for seed in CIFAR_SEEDS for v in cifar]


def config_of(name: str) -> dict[str, Any]:
    variant, seed = name.rsplit("-s", 1)
    keys = dict(VARIANTS[variant][1])
    if keys.pop("cifar", False):
        return dict(yaml.safe_load(CIFAR_BASE.read_text()), **keys, seed=int(seed),
                    output=str(RUN_DIR / name), progress=False)
    config = dict(yaml.safe_load(BASE.read_text()), seed=int(seed), output=str(RUN_DIR / name), progress=False)
    if keys.pop("finetune", False):
        dense = RUN_DIR / f"dense-s{seed}" / "last.safetensors"
        config.update(init_from=str(dense), teacher="mait_nano4_8", teacher_checkpoint=str(dense),
                      teacher_kwargs={"scheme": "none"}, epochs=FT_EPOCHS, warmup_epochs=1, lr=5e-4)
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
        result = train(config)
        loaders = build_loaders(config)
        model = build_model(config, loaders.info).cpu()
        load_weights(model, result.last_checkpoint)
        images = torch.cat([batch.cpu() for batch, _ in loaders.val])[:512]
        record = {"name": name, "acc1": result.final_acc1, "best_acc1": result.best_acc1,
                  "img_s": throughput(model, images), "wall_s": result.wall_time,
                  "recon_first": result.history[0].get("train_recon_loss"),
                  "recon_last": result.history[-1].get("train_recon_loss")}
        (RUN_DIR / name / "result.json").write_text(json.dumps(record, indent=1))
        print(f"done {name}: {record}", flush=True)


def mhsa_mmacs(config: dict[str, Any]) -> float:
    """MHSA MACs per image (attention maps + connectivity predictor), in millions."""
    import timm
    from mait.cost import count_macs
    model = timm.create_model(config["model"], **({"scheme": config["scheme"]} if "scheme" in config else {}),
                              **config.get("model_kwargs", {}))
    report = count_macs(model)
    return (report.attention_map + report.predictor) / 1e6


def side_by_side_speed(variants: list[str], shape: tuple[int, ...], rounds: int = 15,
                       batch: int = 256) -> dict[str, float]:
    """Inference images/s of every variant's model, timed in interleaved rounds in one process (best round:
    on a shared machine the fastest round is the one least disturbed by other jobs).

    Weights do not change the cost (the learned masks are predicted either way), so fresh models are
    timed; one thread, one batch of digits-shaped inputs.
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
    """The variant a paired difference is taken against: the dense model of the same data, or for the
    fine-tuned Sparsifiner the dense model fine-tuned the same way."""
    if variant == "sp25ft":
        return "denseft"
    return "c10dense" if VARIANTS[variant][1].get("cifar") else "dense"


def mean_std(values: list[float], empty: str, signed: bool = False) -> str:
    """``mean ± std`` (one value: the value; none: ``empty``)."""
    sign = "+" if signed else ""
    if not values:
        return empty
    if len(values) == 1:
        return f"{values[0]:{sign}.2f}"
    return f"{statistics.mean(values):{sign}.2f} ± {statistics.stdev(values):.2f}"


def report() -> None:
    import torch
    from mait.analysis import measure_als
    from mait.train.runs import held_out_images, open_run
    from mait.analysis.learned_masks import measure_mask_locality
    RESULTS.mkdir(exist_ok=True)
    cifar = [v for v in VARIANTS if VARIANTS[v][1].get("cifar")]
    speed = side_by_side_speed([v for v in VARIANTS if v not in cifar], (1, 8, 8))
    speed |= side_by_side_speed(cifar, (3, 32, 32), batch=64)
    rows = ["| variant | runs | top-1 % (mean ± std) | Δ top-1 vs its baseline, same seed (mean ± std) | "
            "MHSA MMACs (incl. predictor) | img/s (1 thread) | vs dense |", "|---|---|---|---|---|---|---|"]
    results: dict[str, dict[int, float]] = {}
    for name in run_names():
        path = RUN_DIR / name / "result.json"
        if path.is_file():
            variant, seed = name.rsplit("-s", 1)
            results.setdefault(variant, {})[int(seed)] = json.loads(path.read_text())["acc1"]
    for variant, (label, _) in VARIANTS.items():
        accs = results.get(variant, {})
        base = baseline(variant)
        deltas = [acc - results[base][seed] for seed, acc in accs.items() if seed in results.get(base, {})]
        rows.append(f"| {label} | {len(accs)} | {mean_std(list(accs.values()), 'not run yet')} | "
                    f"{mean_std(deltas, '', signed=True) + f' (vs {base})' if deltas and variant != base else ''} | "
                    f"{mhsa_mmacs(config_of(variant + '-s0')):.3f} | {speed[variant]:.0f} | "
                    f"{speed[variant] / speed['c10dense' if variant in cifar else 'dense']:.2f}x |")
    table = "\n".join(rows)
    (RESULTS / "head_to_head.md").write_text(table + "\n")
    print(table)
    # Locality: learned-mask ALS by layer (Sparsifiner keep 0.13 / 0.25) against the dense model's attention ALS.
    als: dict[str, list[float]] = {}
    for variant in ("dense", "sp13", "sp25", "sp25zero", "sp25ft"):
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
    (RESULTS / "als_by_layer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
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
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(RESULTS / "als_by_layer.png", dpi=100)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("patterns", nargs="*", help="run names or globs (default: all)")
    run_parser.add_argument("--shard", default="0/1", help="i/n: run every n-th pending run from the i-th")
    run_parser.add_argument("--device", default="cpu", help="training device (cpu, cuda); speed is always timed on the CPU")
    sub.add_parser("report")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.patterns, args.shard, args.device)
    else:
        report()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
