"""Measuring primitives: what to measure, timed calls, peak extra memory, autocast, the environment, result files."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Optional

import timm
import torch

import mait
from mait.errors import UserError
from mait.train.precision import cpu_name


@dataclass(frozen=True)
class BenchSettings:
    """How to measure (the options of ``mait bench``); sizes of None mean the defaults named below."""

    batch_size: Optional[int] = None     # None = 64 for models, 4 for the attention op
    img_size: Optional[int] = None       # None = the model's
    train: bool = False                  # time a training step (forward + backward) instead of inference
    amp: Optional[bool] = None           # autocast to ``dtype``; None = on for CUDA, off on the CPU
    dtype: str = "bfloat16"              # "bfloat16" or "float16"
    compile: bool = False                # torch.compile every model before timing
    warmup: int = 2
    repeats: int = 5
    # the attention op alone
    grids: tuple[int, ...] = (7, 14, 28, 56, 112)
    mask_size: int = 3
    heads: int = 3
    head_dim: int = 32
    prefix: int = 1                      # prefix tokens (class token)
    max_dense_gib: float = 6.0           # skip dense masked attention when its score tensors exceed this
    memory: bool = True                  # measure peak extra memory (attention op)

    def amp_enabled(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.amp is None else bool(self.amp)

    def autocast(self, device: torch.device) -> ContextManager[Any]:
        """``torch.autocast`` to :attr:`dtype` when :meth:`amp_enabled`, else a no-op context."""
        if not self.amp_enabled(device):
            return nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, self.dtype))

    def precision(self, device: torch.device) -> str:
        return f"{self.dtype} autocast" if self.amp_enabled(device) else "float32"


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3
    start_s = time.perf_counter()
    fn()
    return time.perf_counter() - start_s


def peak_extra_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by ``fn`` above what was allocated before it ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            events = json.load(handle)["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        return 0
    start = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - start


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Silence file descriptor 2 for a moment: the profiler's native library logs start/stop lines
    (and a CUDA device-count error on GPU-less machines) straight to it."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> ``(name, kwargs)``; values become int/float when they look like one."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"model spec {spec!r}: expected key=value after ':', got {item!r}")
        for cast in (int, float):
            try:
                kwargs[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            kwargs[key] = value
    if not timm.is_model(name):
        raise UserError(f"unknown model {name!r} in spec {spec!r}")
    return name, kwargs


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and versions a figure was measured with (stored beside it in the results)."""
    info = {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": timm.__version__, "mait": mait.__version__, "device": str(device),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def where(device: torch.device) -> str:
    """Device and versions for a table's header line."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    return f"{device} ({name}), torch {torch.__version__}, timm {timm.__version__}"


def write_results(prefix: str, result: dict, plot: Callable[[dict, str], None]) -> list[str]:
    """``result`` as ``prefix.json``, its rows as ``prefix.csv`` and ``plot(result, path)`` as ``prefix.png``;
    returns the three paths."""
    folder = os.path.dirname(prefix)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(prefix + ".json", "w") as handle:
        json.dump(result, handle, indent=2)
    with open(prefix + ".csv", "w", newline="") as handle:
        fields = list(dict.fromkeys(key for row in result["rows"] for key in row))
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(result["rows"])
    plot(result, prefix + ".png")
    return [prefix + ".json", prefix + ".csv", prefix + ".png"]
