"""Row-band sizes of the linear backend, side by side: whole-grid slot passes against bands of 512 KiB to 4 MiB.

    python benchmarks/local_bands.py            # CPU, one thread; writes benchmarks/results/local_bands.txt

For each case (grid, batch, heads x d; R 3, one prefix token, float32) the op is timed forward (inference)
and forward + backward with ``mait.backends.local.BAND_BYTES`` set to each size in interleaved rounds
(median of 7).  The rule in ``row_bands`` (bands only for tensors over two bands, 2 MiB each) comes from
this table.  The last lines time the slot loop on bf16 inputs against float32 ones (why the backend
computes in float32 on a CPU under autocast).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

import mait.backends.local as local

RESULTS = Path(__file__).resolve().parent / "results" / "local_bands.txt"
CASES = [((14, 14), 16, 3, 32), ((28, 28), 4, 3, 32), ((56, 56), 4, 3, 32), ((56, 56), 16, 3, 32),
         ((28, 28), 1, 6, 64), ((56, 56), 1, 6, 64), ((84, 84), 1, 6, 64), ((112, 112), 1, 6, 64)]
SETTINGS = {"whole": 1 << 40, "512K": 1 << 19, "1M": 1 << 20, "2M": 1 << 21, "4M": 1 << 22}


def timed(step, rounds: int = 7) -> dict[str, float]:
    """Median milliseconds of ``step(setting)`` per setting, interleaved rounds after one warm-up each."""
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for name in SETTINGS:
        step(name)
    for _ in range(rounds):
        for name in SETTINGS:
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main() -> None:
    torch.set_num_threads(1)
    default = local.BAND_BYTES
    lines = [f"linear backend row bands, ms (median of 7 interleaved rounds), 1 thread, torch {torch.__version__}"]
    for train in (False, True):
        for grid, batch, heads, dim in CASES:
            q, k, v = (torch.randn(batch, heads, 1 + grid[0] * grid[1], dim, requires_grad=train) for _ in range(3))

            def step(setting: str) -> None:
                local.BAND_BYTES = SETTINGS[setting]
                with torch.set_grad_enabled(train):
                    out = local.local_attention(q, k, v, grid_size=grid, mask_size=3, num_prefix_tokens=1)
                    if train:
                        out.sum().backward()
            medians = timed(step)
            mib = batch * heads * grid[0] * grid[1] * dim * 4 / 2 ** 20
            lines.append(f"{'train' if train else 'infer'} {grid[0]}x{grid[1]} b{batch} {heads}x{dim} "
                         f"({mib:.1f} MiB/tensor): " + "  ".join(f"{n} {m:.2f}" for n, m in medians.items()))
            print(lines[-1], flush=True)
    local.BAND_BYTES = default
    for grid in ((28, 28), (56, 56), (84, 84)):           # the slot loop itself, in bf16 and in float32
        h, w = grid
        qg, kg, vg = (torch.randn(1, 6, h, w, 64) for _ in range(3))
        kp, vp = (torch.randn(1, 6, 1, 64) for _ in range(2))
        inputs = {"bf16": [t.bfloat16() for t in (qg, kg, vg, kp, vp)], "float32": [qg, kg, vg, kp, vp]}
        times: dict[str, list[float]] = {name: [] for name in inputs}
        with torch.inference_mode():
            for _ in range(8):
                for name, tensors in inputs.items():
                    start = time.perf_counter()
                    local._LocalRows.apply(*tensors, 3, True)
                    times[name].append(time.perf_counter() - start)
        lines.append(f"slot loop at {h}x{w}, 6x64: bf16 {statistics.median(times['bf16'][1:]) * 1e3:.2f} ms, "
                     f"float32 {statistics.median(times['float32'][1:]) * 1e3:.2f} ms")
        print(lines[-1], flush=True)
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
