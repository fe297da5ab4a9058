"""The Triton kernel for hard heads against the float64 reference, on the CPU under Triton's interpreter.

The interpreter must be chosen before triton is first imported, so the comparison runs in a
fresh process with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from packaging.version import Version

import mait
from mait.backends import triton_local

pytestmark = pytest.mark.skipif(not triton_local.available(), reason="triton is not installed")

COMPARE = """
import itertools, torch, mait
generator = torch.Generator().manual_seed(0)
# grids smaller and larger than a 64-query block, rows that straddle blocks, R 1-7, prefix 0-2
for mode, grid, size, prefix in itertools.product(["zero", "neg_inf"], [(1, 1), (3, 5), (9, 9), (12, 7)],
                                                  [1, 3, 7], [0, 1, 2]):
    tokens = prefix + grid[0] * grid[1]
    q, k, v = (2 * torch.randn(2, 2, tokens, 24, generator=generator) for _ in range(3))
    kwargs = dict(grid_size=grid, mask_size=size, num_prefix_tokens=prefix, mode=mode)
    truth = mait.masked_attention(q.double(), k.double(), v.double(), backend="reference", **kwargs)
    got = mait.masked_attention(q, k, v, backend="triton", **kwargs)
    torch.testing.assert_close(got, truth.float(), rtol=1e-5, atol=1e-5, msg=f"{mode} {grid} R {size} P {prefix}")
print("all match")
"""


def test_triton_matches_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", COMPARE], env=env, capture_output=True, text=True, timeout=600)
    if (result.returncode and "only 0-dimensional arrays can be converted" in result.stderr
            and Version(triton_local.triton.__version__) < Version("3.8") and Version(np.__version__) >= Version("2.4")):
        pytest.skip("the interpreter of this triton turns loop bounds into ints with int(array), which NumPy >= 2.4 "
                    "refuses (triton-lang/triton#9171); install numpy<2.4 to run this check with it")
    assert result.returncode == 0 and "all match" in result.stdout, result.stderr[-3000:]


def test_triton_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")          # can_run reads it; nothing is launched here
    q = torch.randn(1, 2, 10, 16, requires_grad=True)
    with pytest.raises(ValueError, match="no backward"):
        mait.masked_attention(q, q, q, grid_size=3, backend="triton")
    with pytest.raises(ValueError, match="hard-masked"):
        mait.masked_attention(q.detach(), q.detach(), q.detach(), grid_size=3, alpha=[0.0, 0.5], backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        mait.masked_attention(q.detach(), q.detach(), q.detach(), grid_size=3, backend="triton")
