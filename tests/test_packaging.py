"""The wheel is complete: built with `python -m build`, installed in a fresh venv, it trains from a
shipped preset in a folder far from the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_wheel_trains_the_digits_preset_outside_the_checkout(tmp_path: Path) -> None:
    pytest.importorskip("build", reason="needs the `build` package (pip install build)")
    source = tmp_path / "source"           # a copy, so the build leaves the checkout untouched
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(source)])
    wheel = next((tmp_path / "dist").glob("mait-*.whl"))
    # --system-site-packages: torch, timm and friends come from this interpreter, mait only from the wheel
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")])
    bin_dir = tmp_path / "venv" / "bin"
    _run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)])
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    where = _run([str(bin_dir / "python"), "-c", "import mait; print(mait.__file__)"], cwd=away, env=env).stdout
    assert str(tmp_path / "venv") in where, f"mait was imported from {where.strip()}, not from the installed wheel"
    result = _run([str(bin_dir / "mait"), "train", "--config", "digits", "--epochs", "1", "--output", "run",
                   "--no-progress"], cwd=away, env=env)
    assert "finished in" in result.stdout and (away / "run" / "best.safetensors").is_file()
