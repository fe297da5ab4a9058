"""How long ``mait --help`` and friends take to answer, against importing torch, timm and mait.

Each case is a fresh Python process (what a shell runs), timed from start to exit; the cases run
in interleaved rounds (each round runs every case once, in a fresh random order) and the median
is reported, with its ratio to the bare interpreter and to ``import mait``.  The ``mait`` cases
run ``mait_cli.main`` as the ``mait`` console script does; ``python -m mait --help`` (also how
``torchrun -m mait`` starts each process) imports the ``mait`` package before its ``__main__``,
which then leaves torch and the API to the command that runs.

    python benchmarks/cli_startup.py                 # 7 rounds
    python benchmarks/cli_startup.py --repeats 15

Results: a printed table and ``benchmarks/results/cli_startup.{txt,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAIT = "import sys; from mait_cli import main; sys.exit(main())"   # the console script's body
CASES = {                                    # name -> arguments of the Python interpreter
    "python (empty interpreter)": ["-c", "pass"],
    "mait --help": ["-c", MAIT, "--help"],
    "mait train --help": ["-c", MAIT, "train", "--help"],
    "mait export --help": ["-c", MAIT, "export", "--help"],
    "mait export --format tflite (an error)": ["-c", MAIT, "export", "--checkpoint", "x", "--format", "tflite"],
    "mait bench --help": ["-c", MAIT, "bench", "--help"],
    "import torch": ["-c", "import torch"],
    "import timm": ["-c", "import timm"],
    "import mait": ["-c", "import mait"],
    "python -m mait --help": ["-m", "mait", "--help"],
}


def seconds(arguments: list[str], env: dict[str, str]) -> float:
    """Wall time of one fresh interpreter running ``arguments``, to its exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *arguments], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cli_startup"),
                        help="path prefix of the .txt/.json results")
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    for arguments in CASES.values():                       # warm the file cache once
        seconds(arguments, env)
    times: dict[str, list[float]] = {name: [] for name in CASES}
    order = random.Random(0)
    for _ in range(args.repeats):
        for name in order.sample(list(CASES), len(CASES)):
            times[name].append(seconds(CASES[name], env))
    medians = {name: statistics.median(values) for name, values in times.items()}
    empty, mait = medians["python (empty interpreter)"], medians["import mait"]
    lines = [f"fresh process to exit, median of {args.repeats} interleaved rounds; Python {platform.python_version()}, "
             f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end",
             f"{'case':<42}{'seconds':>9}{'/ python':>10}{'/ import mait':>15}"]
    lines += [f"{name:<42}{median:>9.3f}{median / empty:>9.1f}x{median / mait:>14.2f}x"
              for name, median in medians.items()]
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".txt").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"repeats": args.repeats, "python": platform.python_version(), "cpus": os.cpu_count(),
         "load_average": os.getloadavg(), "seconds": times, "median_s": medians}, indent=2) + "\n")
    print(f"wrote {out.with_suffix('.txt')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
