"""Token pruning: images/s and whole-model GMACs against the token keep rate ρ, the pruned tokens dropped.

    python benchmarks/token_pruning.py                    # CPU, one thread, batch 8, 224 px
    python benchmarks/token_pruning.py --device cuda      # on a GPU (batch 64)

Speed: DeiT-S-size Sparsifiner (``sparsifiner_deit_small_224``, keep 0.25) and MaiT-S
(``mait_s24_224``) at each ρ (``token_keep_rate``; prune layers 3, 6, 9 of 12 and 6, 12, 18 of
24), inference, timed in interleaved rounds (a fresh random order per round after one untimed
round) and reported as medians, with the speed-up against the same model at ρ = 1 from the same
rounds.  On a CPU each call is timed twice: by the process's CPU time (what one thread spent on it,
which other processes on a loaded machine barely change) and by the wall clock.  Cost: the whole-model GMACs of DeiT-S-size Sparsifiner over attention keep rates and ρ
(predictor counted by its pruned nonzeros on a zero image, at its initialisation) against the
dense DeiT-S, and the first (keep rate, ρ) past a 60 % reduction.  Results go to
``benchmarks/results/token_pruning[_<device>].{txt,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import timm
import torch

import mait  # noqa: F401  (registers the models)
from mait.cost import count_macs

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("sparsifiner_deit_small_224", "mait_s24_224")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def speed(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Images/s of every (model, ρ), interleaved rounds, medians."""
    torch.manual_seed(0)
    models, costs = {}, {}
    for name in MODELS:
        base = timm.create_model(name).eval()
        for rate in args.rates:
            model = timm.create_model(name, token_keep_rate=rate).eval()
            model.load_state_dict(base.state_dict())
            costs[name, rate] = count_macs(model).macs_sparse / 1e9
            models[name, rate] = model.to(args.device)
    images = torch.randn(args.batch_size, 3, 224, 224, device=args.device)

    def call(key: tuple[str, float]) -> tuple[float, float]:
        with torch.inference_mode(), torch.autocast(args.device, torch.bfloat16, enabled=args.device == "cuda"):
            wall, cpu = time.perf_counter(), time.process_time()
            models[key](images)
            _sync(args.device)
            return time.perf_counter() - wall, time.process_time() - cpu

    keys = list(models)
    for key in keys:             # one untimed round
        call(key)
    times: dict[tuple[str, float], list[tuple[float, float]]] = {key: [] for key in keys}
    for _ in range(args.repeats):
        random.shuffle(keys)
        for key in keys:
            times[key].append(call(key))
    clocks = ("wall",) if args.device == "cuda" else ("cpu", "wall")
    header = "".join(f"{f'img/s ({clock})':>16}{'vs rho=1':>10}" for clock in clocks)
    rows, lines = [], [f"{'model':<28}{'rho':>6}{'GMACs':>8}{header}"]

    def rate_of(key: tuple[str, float], clock: str) -> float:
        return args.batch_size / statistics.median(t[0 if clock == "wall" else 1] for t in times[key])

    for name in MODELS:
        for rate in args.rates:
            row = dict(model=name, rho=rate, gmacs=costs[name, rate], times_s=times[name, rate])
            line = f"{name:<28}{rate:>6.2f}{costs[name, rate]:>8.3f}"
            for clock in clocks:
                per_second, base = rate_of((name, rate), clock), rate_of((name, 1.0), clock)
                row |= {f"images_per_s_{clock}": per_second, f"speedup_{clock}": per_second / base}
                line += f"{per_second:>16.2f}{per_second / base:>9.2f}x"
            rows.append(row)
            lines.append(line)
    return rows, lines


def cost_sweep(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    """Whole-model GMACs of DeiT-S-size Sparsifiner over (attention keep rate, ρ) against dense DeiT-S."""
    torch.manual_seed(0)
    dense = count_macs(timm.create_model("sparsifiner_deit_small_224", keep_rate=1.0), mask_savings=False)
    dense_macs = (dense.macs - dense.predictor) / 1e9
    rows, passed = [], None
    lines = [f"whole-model GMACs of sparsifiner_deit_small_224 against dense DeiT-S ({dense_macs:.3f} GMACs), "
             f"predictor by its pruned nonzeros (dense count in brackets):",
             f"{'keep':>6}{'rho':>6}{'GMACs':>8}{'reduction':>11}{'(dense pred.)':>15}"]
    base = timm.create_model("sparsifiner_deit_small_224")
    for keep in args.keep_rates:
        for rate in args.cost_rates:
            model = timm.create_model("sparsifiner_deit_small_224", keep_rate=keep, token_keep_rate=rate)
            model.load_state_dict(base.state_dict())
            report = count_macs(model)
            reduction = 1 - report.macs_sparse / 1e9 / dense_macs
            dense_reduction = 1 - report.macs / 1e9 / dense_macs
            rows.append(dict(keep_rate=keep, rho=rate, gmacs=report.macs_sparse / 1e9, reduction=reduction,
                             reduction_dense_predictor=dense_reduction))
            lines.append(f"{keep:>6.2f}{rate:>6.2f}{report.macs_sparse / 1e9:>8.3f}{100 * reduction:>10.1f}%"
                         f"{100 * dense_reduction:>14.1f}%")
            if passed is None and reduction > 0.6:
                passed = (keep, rate)
    lines.append("first (keep rate, rho) past a 60 % whole-model reduction, in the order above: "
                 + (f"keep {passed[0]:g}, rho {passed[1]:g}" if passed else "none"))
    return rows, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.9, 0.7, 0.5])
    parser.add_argument("--keep-rates", type=float, nargs="+", default=[0.25, 0.1, 0.05])
    parser.add_argument("--cost-rates", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 on a CPU, 64 on a GPU")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-cost", action="store_true", help="skip the GMACs sweep")
    args = parser.parse_args()
    if 1.0 not in args.rates:
        parser.error("--rates must include 1.0, the baseline of the speed-ups")
    args.batch_size = args.batch_size or (8 if args.device == "cpu" else 64)
    torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    lines = [f"token pruning, {device}, inference{' (bf16 autocast)' if args.device == 'cuda' else ''}, batch "
             f"{args.batch_size}, 224 px, {args.threads} thread(s), {args.repeats} interleaved rounds (medians), "
             f"load average {os.getloadavg()[0]:.1f} at the start"]
    print(lines[0], flush=True)
    speed_rows, speed_lines = speed(args)
    lines += speed_lines + [f"load average {os.getloadavg()[0]:.1f} at the end"]
    print("\n".join(lines[1:]), flush=True)
    cost_rows: list[dict] = []
    if not args.no_cost:
        cost_rows, cost_lines = cost_sweep(args)
        lines += [""] + cost_lines
        print("\n".join(cost_lines), flush=True)
    RESULTS.mkdir(exist_ok=True)
    stem = "token_pruning" + ("" if args.device == "cpu" else f"_{args.device}")
    (RESULTS / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"args": vars(args), "speed": speed_rows, "cost": cost_rows},
                                                     indent=1))


if __name__ == "__main__":
    main()
