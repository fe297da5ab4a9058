"""Experiments, skipped by the default test command (run with ``pytest -m slow``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_builtin_default_reaches_95_percent(tmp_path: Path) -> None:
    """The README's main job, exactly as a user runs it: `mait train` with no flags (~2 min on 2 cores)."""
    proc = subprocess.run([sys.executable, "-m", "mait", "train", "--no-progress"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    found = re.search(r"finished in ([\d.]+) s: validation top-1 ([\d.]+) %", proc.stdout)
    assert found, proc.stdout[-2000:]
    print(f"digits default: {found.group(2)} % in {found.group(1)} s")
    assert float(found.group(2)) >= 95.0, proc.stdout[-2000:]
    assert list(tmp_path.glob("runs/*/best.safetensors")) and list(tmp_path.glob("runs/*/curves.png"))
