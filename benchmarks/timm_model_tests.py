"""Run timm's own generic model tests (``tests/test_models.py`` of pytorch-image-models) on every mait model.

timm's test file is not part of mait; give it from a checkout of timm's repository (or a git directory of
one), ideally at the version installed here::

    python benchmarks/timm_model_tests.py --timm-repo ~/src/pytorch-image-models
    python benchmarks/timm_model_tests.py --timm-repo /path/to/repo.git --rev v1.0.31

The tests run on mait's registered models only (``-k`` on their names), with mait imported and its models
filed as timm files its own (``benchmarks/timm_suite/mait_timm_plugin.py``); tests that need a network
(pretrained weights) are left out.  A table of results per test and model goes to
``benchmarks/results/timm_model_tests.txt``.  mait's own conformance tests, modelled on these, are
``tests/test_timm_conformance.py`` in the default suite.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "timm_model_tests.txt"
# Tests of timm's file that download weights or sample images.
NETWORK_TESTS = ("test_model_inference", "test_model_load_pretrained", "test_model_features_pretrained")


def timm_test_file(repo: Path, rev: str, into: Path) -> Path:
    """``tests/test_models.py`` of a timm checkout (its work tree) or git directory (at ``rev``), copied into ``into``."""
    target = into / "test_models.py"
    work_tree_file = repo / "tests" / "test_models.py"
    if work_tree_file.is_file() and rev == "HEAD":
        shutil.copyfile(work_tree_file, target)
        return target
    text = subprocess.run(["git", "--git-dir" if (repo / "HEAD").is_file() else "-C", str(repo), "show",
                           f"{rev}:tests/test_models.py"], check=True, capture_output=True, text=True).stdout
    target.write_text(text)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timm-repo", type=Path, required=True, help="a checkout or git directory of timm")
    parser.add_argument("--rev", default="HEAD", help="git revision of the test file (default HEAD)")
    parser.add_argument("-k", dest="select", default="", help="extra pytest -k expression (e.g. a model name)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    import timm
    import torch
    sys.path.insert(0, str(HERE / "timm_suite"))
    from mait_timm_plugin import MAIT_MODELS

    with tempfile.TemporaryDirectory() as folder:
        test_file = timm_test_file(args.timm_repo.expanduser(), args.rev, Path(folder))
        models = " or ".join(MAIT_MODELS)
        expression = f"({models}) and not ({' or '.join(NETWORK_TESTS)})"
        if args.select:
            expression += f" and ({args.select})"
        env = dict(os.environ, COLUMNS="400", PYTHONPATH=os.pathsep.join(filter(None, [str(HERE / "timm_suite"),
                                                                      os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-m", "pytest", str(test_file), "-p", "mait_timm_plugin", "-p", "no:cacheprovider",
                   "-o", "addopts=", "-q", "-rA", "--tb=line", "-o", "console_output_style=classic", "-W", "ignore", "-k", expression]
        print(" ".join(command[2:]), flush=True)
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    outcomes: dict[str, dict[str, str]] = collections.defaultdict(dict)
    reasons: dict[tuple[str, str], str] = {}
    for line in result.stdout.splitlines():
        match = re.match(r"(PASSED|FAILED|ERROR|SKIPPED) \S*::(\w+)\[\d+-([\w.]+)\](?: - (.*))?", line)
        if match:
            status, test, model, reason = match.groups()
            model = model.split(".")[0]          # timm lists some tests by tagged name (model.pretrained_tag)
            outcomes[test][model] = status
            if reason:
                reasons[(test, model)] = reason[:160]
    tests = sorted(outcomes)
    counts = collections.Counter(status for test in tests for status in outcomes[test].values())
    lines = [f"timm's tests/test_models.py ({args.rev}) on mait's models; timm {timm.__version__}, "
             f"torch {torch.__version__}", "",
             "| model | " + " | ".join(t.replace("test_model_", "") for t in tests) + " |",
             "|---|" + "---|" * len(tests)]
    for model in MAIT_MODELS:
        lines.append(f"| {model} | " + " | ".join(outcomes[t].get(model, "-").lower() for t in tests) + " |")
    lines += ["", f"passed {counts['PASSED']}, failed {counts['FAILED'] + counts['ERROR']}, "
                  f"skipped {counts['SKIPPED']} ('-': the test does not apply to the model)", ""]
    lines += [f"{test}[{model}]: {reason}" for (test, model), reason in sorted(reasons.items())
              if outcomes[test][model] != "PASSED"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not outcomes:
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
        raise SystemExit("no test results were parsed (see pytest's output above)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
