"""The precision a run computes in: autocast on CUDA by default, bf16 autocast on request on CPUs with native bf16.

``amp`` unset (the default) autocasts on CUDA (bf16, or fp16 with a gradient scaler on GPUs
without bf16) and keeps CPUs in float32; ``amp: true`` (``--amp``) also autocasts to bf16 on a
CPU with native bf16 instructions (``avx512_bf16`` or AMX), which speeds up masked heads and
MLPs but slows torch's SDPA for small unmasked heads (docs/training.md, "Precision");
``amp: false`` is float32 everywhere.  Other CPUs stay in float32.  The choice and its reason
go into the training log.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

#: CPU features that compute bf16 natively: AVX-512 BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and
#: later) and AMX's bf16 tiles (Sapphire Rapids and later).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> Optional[frozenset[str]]:
    """This CPU's feature flags: torch's capability query (``torch.cpu.get_capabilities``), else
    ``/proc/cpuinfo``'s ``flags`` line on Linux; None when neither says."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        return frozenset(name for name, value in capabilities().items() if value is True)
    flags = _cpuinfo_field("flags")
    return frozenset(flags.split()) if flags is not None else None


def _cpuinfo_field(name: str) -> Optional[str]:
    """The value of the first ``name`` line of ``/proc/cpuinfo`` (Linux), or None."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    return None


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """This CPU's model name (``/proc/cpuinfo``'s ``model name`` on Linux, else what :mod:`platform` says)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """What computes on ``device``: the GPU's name, or the CPU's with the threads torch uses (for logs, since
    float results, and so long runs, differ bit-wise between CPU models)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_name()}, {threads} thread{'s' if threads > 1 else ''}" if device.type == "cpu" else device.type


def cpu_bf16_support(flags: Optional[frozenset[str]] = None) -> tuple[bool, str]:
    """Whether this CPU (or one with ``flags``) computes bf16 natively, and why: the flag it has, or what it lacks."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return False, (f"cannot read the CPU's features on {platform.system() or 'this system'} "
                       f"(torch {torch.__version__} has no torch.cpu.get_capabilities and there is no /proc/cpuinfo)")
    found = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    if found:
        return True, f"CPU has {found[0]}"
    return False, f"CPU has neither {' nor '.join(NATIVE_BF16_FLAGS)}"


@dataclass(frozen=True)
class Precision:
    """The autocast dtype of a run (None = float32) and why it was chosen."""

    dtype: Optional[torch.dtype]
    reason: str

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    def describe(self) -> str:
        """The training log's line, e.g. ``bf16 autocast (CPU has avx512_bf16)`` or ``fp32 (amp off)``."""
        return f"{self.name} autocast ({self.reason})" if self.dtype is not None else f"fp32 ({self.reason})"


def choose_precision(amp: Optional[bool], device: torch.device) -> Precision:
    """The precision of a run with ``amp`` (None = the device's default) on ``device``: bf16/fp16 autocast
    on CUDA unless ``amp`` is False, bf16 autocast on CPUs with native bf16 when ``amp`` is True, else float32."""
    if amp is False:
        return Precision(None, "amp off")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(torch.bfloat16, "CUDA")
        return Precision(torch.float16, "CUDA GPU without bf16")
    if device.type != "cpu":
        return Precision(None, f"no autocast on {device.type}")
    native, why = cpu_bf16_support()
    if amp is None:
        return Precision(None, f"the CPU default; --amp autocasts to bf16 here: {why}" if native else why)
    return Precision(torch.bfloat16 if native else None, why)
