"""The linear backend of the working tree against its version at another commit, in one process.

Both versions of ``src/mait/backends/local.py`` are loaded side by side (the old one from
``git show REV:...``) and timed in interleaved rounds, so the ratio does not depend on how fast
the machine happens to be during the run (CPU speed drifts by 10-20 % on a shared VM).

    python benchmarks/local_versions.py --base HEAD~1            # inference and training
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

import mait.backends.local as current

ROOT = Path(__file__).resolve().parents[1]
# (grid, batch, heads, d), R 3, 1 prefix token; the last is one MaiT-S layer on a 1344-px image.
CASES = [((14, 14), 16, 3, 32), ((28, 28), 4, 3, 32), ((56, 56), 4, 3, 32), ((84, 84), 1, 6, 64)]


def module_at(revision: str) -> ModuleType:
    """``mait.backends.local`` as it was at ``revision`` (imported as a sibling module)."""
    source = subprocess.run(["git", "show", f"{revision}:src/mait/backends/local.py"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "local_base.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("mait.backends.local_base", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def step(module: ModuleType, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int],
         train: bool) -> None:
    with torch.set_grad_enabled(train):
        out = module.local_attention(q, k, v, grid_size=grid, mask_size=3, num_prefix_tokens=1)
        if train:
            out.sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit to compare against (e.g. HEAD~1)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "local_versions.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.strip()
    versions = {"base": module_at(args.base), "current": current}
    rows = []
    print(f"linear backend, {args.base} against the working tree; R 3, 1 prefix token, float32, "
          f"median of {args.repeats} interleaved rounds, {args.threads} thread(s), torch {torch.__version__}")
    print(f"{'grid':<8}{'batch':>6}{'heads x d':>10}{'pass':>10}{'base (ms)':>12}{'now (ms)':>12}{'base / now':>12}")
    for train in (False, True):
        for grid, batch, heads, dim in CASES:
            q, k, v = (torch.randn(batch, heads, 1 + grid[0] * grid[1], dim, requires_grad=train) for _ in range(3))
            times: dict[str, list[float]] = {name: [] for name in versions}
            for module in versions.values():                          # untimed warm-up
                step(module, q, k, v, grid, train)
            for _ in range(args.repeats):
                for name, module in versions.items():
                    start = time.perf_counter()
                    step(module, q, k, v, grid, train)
                    times[name].append(time.perf_counter() - start)
            base, now = (1e3 * statistics.median(times[name]) for name in ("base", "current"))
            rows.append({"grid": f"{grid[0]}x{grid[1]}", "batch": batch, "heads": heads, "head_dim": dim,
                         "pass": "train" if train else "inference",
                         "base_ms": round(base, 2), "now_ms": round(now, 2), "ratio": round(base / now, 2)})
            row = rows[-1]
            print(f"{row['grid']:<8}{batch:>6}{f'{heads} x {dim}':>10}{row['pass']:>10}{base:>12.2f}{now:>12.2f}"
                  f"{row['ratio']:>11.2f}x",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"base": args.base, "repeats": args.repeats, "threads": args.threads,
                                    "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
