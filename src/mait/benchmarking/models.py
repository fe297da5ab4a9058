"""Throughput of whole models: interleaved rounds of inference or training steps, ratios to a baseline, table, plot.

Models are measured the way Swin and timm do it: eval mode, ``torch.inference_mode()``, one
fixed random batch, warm-up passes, then the median of repeated timings, in images/s.  All
models run in the same process and *interleaved* (round r times every model once), so that
load from other processes hits them alike and the ratios to the baseline are fair.  With
``train`` a training step (forward, cross-entropy, backward) is timed instead.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mait.errors import UserError

from .measure import BenchSettings, environment, parse_spec, timed, where


def bench_models(specs: Sequence[str], settings: BenchSettings, device: torch.device,
                 baseline: Optional[str] = None) -> dict:
    """Images/s of every model spec (``name:key=value,...``) and its ratio to ``baseline`` (default: the first).

    A model that fails to run keeps its row, with the error, so that it does not hide the others' figures.
    """
    batch = settings.batch_size or 64
    autocast = settings.autocast(device)
    specs = list(dict.fromkeys(specs))
    baseline = baseline or specs[0]
    if baseline not in specs:
        raise UserError(f"--baseline {baseline!r} is not one of --models {specs}")
    runs = []
    generator = torch.Generator().manual_seed(0)
    for spec in specs:
        name, kwargs = parse_spec(spec)
        if settings.img_size:
            kwargs.setdefault("img_size", settings.img_size)
        try:
            model = timm.create_model(name, pretrained=False, **kwargs).to(device)
        except (TypeError, ValueError) as error:
            raise UserError(f"cannot build {spec!r}: {error}") from error
        built_for = getattr(getattr(model, "patch_embed", None), "img_size", None)
        size = tuple(built_for or model.pretrained_cfg["input_size"][1:])
        channels = getattr(getattr(model, "patch_embed", None), "proj", None)
        channels = channels.in_channels if isinstance(channels, torch.nn.Conv2d) else model.pretrained_cfg[
            "input_size"][0]
        images = torch.randn(batch, channels, *size, generator=generator).to(device)
        params_m = sum(p.numel() for p in model.parameters()) / 1e6
        forward = torch.compile(model) if settings.compile else model
        if settings.train:
            model.train()
            labels = torch.randint(0, model.num_classes, (batch,), generator=generator).to(device)

            def step(model=model, forward=forward, images=images, labels=labels) -> None:
                model.zero_grad(set_to_none=True)
                with autocast:
                    loss = F.cross_entropy(forward(images), labels)
                loss.backward()
        else:
            model.eval()

            def step(forward=forward, images=images) -> None:
                with torch.inference_mode(), autocast:
                    forward(images)
        runs.append({"spec": spec, "step": step, "times": [], "params_m": params_m})
    with tqdm(total=(settings.warmup + settings.repeats) * len(runs), desc="bench", unit="pass", leave=False,
              disable=None) as progress:
        for run in runs:
            for _ in range(settings.warmup):
                _attempt(run, lambda run=run: run["step"]())
                progress.update()
        for _ in range(settings.repeats):               # interleaved rounds: every model once per round
            for run in runs:
                _attempt(run, lambda run=run: run["times"].append(timed(run["step"], device)))
                progress.update()
    rows = []
    for run in runs:
        row = {"model": run["spec"], "params_m": round(run["params_m"], 2), "batch": batch}
        if "error" in run:
            row.update(median_s=None, images_per_s=None, error=run["error"])
        else:
            median = statistics.median(run["times"])
            row.update(median_s=round(median, 4), images_per_s=round(batch / median, 2))
        rows.append(row)
    base = next(row for row in rows if row["model"] == baseline)
    for row in rows:
        ok = row["images_per_s"] is not None and base["images_per_s"] is not None
        row["ratio"] = round(row["images_per_s"] / base["images_per_s"], 3) if ok else None
    return {"kind": "models", "mode": "train" if settings.train else "inference", "baseline": baseline,
            "precision": settings.precision(device), "compiled": settings.compile, "warmup": settings.warmup,
            "repeats": settings.repeats, "environment": environment(device), "rows": rows}


def _attempt(run: dict, fn: Callable[[], Any]) -> None:
    """Run one pass of a model unless it failed before; a failure is kept and reported in its row
    (one model that cannot run on this device must not hide the others' figures)."""
    if "error" in run:
        return
    try:
        fn()
    except (RuntimeError, ValueError, NotImplementedError, AssertionError) as error:
        run["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"


def models_table(result: dict, device: torch.device) -> str:
    """The printed table of :func:`bench_models`' result: a header line, one row per model, the ratio's meaning."""
    rows = result["rows"]
    mode = "training step (forward + backward)" if result["mode"] == "train" else "inference"
    lines = [f"{mode}, batch {rows[0]['batch']}, {result['precision']}{', compiled' if result['compiled'] else ''}, "
             f"median of {result['repeats']} interleaved rounds after {result['warmup']} warm-up, {where(device)}",
             f"{'model':<48}{'params (M)':>11}{'images/s':>11}{'ratio':>8}"]
    for row in rows:
        if row["images_per_s"] is None:
            lines.append(f"{row['model']:<48}{row['params_m']:>11.2f}  failed: {row['error']}")
        else:
            ratio = f"{row['ratio']:>7.2f}x" if row["ratio"] is not None else f"{'-':>8}"
            lines.append(f"{row['model']:<48}{row['params_m']:>11.2f}{row['images_per_s']:>11.2f}{ratio}")
    lines.append(f"(ratio = images/s over {result['baseline']})")
    return "\n".join(lines)


def plot_models(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    ax.barh([r["model"] for r in rows], [r["images_per_s"] or 0 for r in rows], color="tab:blue")
    for i, row in enumerate(rows):
        ax.text(row["images_per_s"] or 0, i, f" {row['ratio']:.2f}x" if row["ratio"] is not None else " failed",
                va="center")
    ax.invert_yaxis()
    ax.set_xlabel(f"images/s ({result['mode']}, batch {rows[0]['batch']}; ratio to {result['baseline']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
