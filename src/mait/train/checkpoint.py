"""Checkpoints: weights as safetensors, the training state beside them, every file written atomically.

An output folder holds ``last.safetensors`` + ``last.state.pt`` (weights, optimizer, scheduler,
EMA, scaler, RNG states, epoch, position in the epoch, history) and ``best.safetensors``.  Each
file is written to a temporary name and renamed, so a run killed at any moment leaves the
previous complete checkpoint behind; the state is written first and holds the weights, so it
alone resumes a run exactly even when the process died before ``last.safetensors`` followed.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn as nn

from ..errors import UserError
from ..learned import convert_legacy_predictors
from ..models._masking import fit_position_embedding

LAST, BEST, STATE = "last.safetensors", "best.safetensors", "last.state.pt"
HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias", "head.fc.weight", "head.fc.bias")


def new_file_mode() -> int:
    """The mode a newly created file gets under the process's umask (``0o666 & ~umask``)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic(path: Path, write) -> None:
    """Write through ``write(temporary)`` and rename into place, with a new file's mode (some writers, such
    as safetensors', create their file private)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.chmod(tmp, new_file_mode())
    os.replace(tmp, path)


@contextlib.contextmanager
def training_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` while a run trains into ``folder``: a second process training into the same
    folder (two study runners, a resumed run still alive) is refused instead of overwriting the first's
    checkpoints.  The operating system releases the lock when the process dies, however it dies; a run
    that ends removes the file (and the folder, if it made it and nothing else was written there)."""
    try:
        import fcntl
    except ImportError:                     # no POSIX locks (Windows): nothing to hold
        yield
        return
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"{folder} is being trained into by {owner}; wait for it to end or "
                            f"choose another --output") from None
        try:                                # the holder before us may have removed the file as we opened it
            if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)        # removed while still held, so no one else holds this file
        handle.close()
        if made and not any(folder.iterdir()):
            folder.rmdir()


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def weights_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as a checkpoint stores them: detached, on the CPU, contiguous."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_weights(model: nn.Module, path: Path, metadata: Optional[dict[str, str]] = None) -> None:
    state = weights_of(model)
    _atomic(path, lambda tmp: safetensors.torch.save_file(state, str(tmp), metadata=metadata))


def save_state(state: dict[str, Any], path: Path) -> None:
    _atomic(path, lambda tmp: torch.save(state, tmp))


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load_state(folder: Path) -> dict[str, Any]:
    """The training state of the run in ``folder`` (for ``--resume``), or a one-line error."""
    path = folder / STATE
    if not folder.is_dir():
        raise UserError(f"--resume {folder}: the folder does not exist")
    if not path.is_file():
        raise UserError(f"--resume {folder}: no checkpoint there (expected {STATE})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several error types for a truncated or foreign file
        raise UserError(f"--resume {folder}: {STATE} is not a readable training state: {error}") from None
    if "model" not in state and not (folder / LAST).is_file():     # a state of before it held the weights
        raise UserError(f"--resume {folder}: no checkpoint there (expected {STATE} and {LAST})")
    return state


def _checkpoint_file(path: Path) -> Path:
    """``path`` if it is a file; a one-line error for a folder or a missing file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; give a .safetensors file in it "
                        f"(e.g. {path / 'best.safetensors'} or {path / 'last.safetensors'})")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    return path


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """A safetensors file opened for reading; a one-line error for a missing or unreadable one."""
    path = _checkpoint_file(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            yield handle
    except Exception as error:  # safetensors raises its own error types for bad files
        raise UserError(f"checkpoint {path} is not a readable safetensors file: {error}") from None


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file alone (its header)."""
    with _opened(path) as handle:
        return handle.metadata() or {}


def read_checkpoint(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and the tensors of a safetensors file, read in one opening."""
    with _opened(path) as handle:
        return handle.metadata() or {}, {key: handle.get_tensor(key) for key in handle.keys()}


def _mismatch_message(path: Path, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if keys:
            shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
            parts.append(f"{label}: {shown}")
    hint = ""
    if shapes and any(".predictor." in key for key in shapes):
        hint = ("; learned heads' connectivity predictors hold per-token tables, so a Sparsifiner checkpoint loads "
                "only into a model of its own image size")
    elif missing and not unexpected and not shapes and all(".predictor." in key for key in missing):
        hint = ("; only the learned-mask predictor is missing: a dense checkpoint, which a Sparsifiner model "
                "starts from with --init-from")
    return f"checkpoint {path} does not fit this model ({'; '.join(parts)}){hint}"


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_weights` left at the model's initialisation: classifier keys of another
    class count (``reset``) and keys the checkpoint lacks (``missing``, only with ``strict=False``)."""

    reset: list[str]
    missing: list[str]

    def describe(self) -> str:
        """One line for the log, e.g. ``"head.weight, head.bias start fresh (another class count);
        blocks.*.attn.alpha_logit (12 tensors) keep their initialisation (not in the checkpoint)"``."""
        parts = []
        if self.reset:
            parts.append(f"{', '.join(self.reset)} start fresh (another class count)")
        if self.missing:
            patterns = dict.fromkeys(re.sub(r"\.\d+\.", ".*.", key) for key in self.missing)
            parts.append(f"{', '.join(patterns)} ({len(self.missing)} tensors) keep their initialisation "
                         f"(not in the checkpoint)")
        return "; ".join(parts)


def load_weights(model: nn.Module, path: Path, *, allow_head_reset: bool = False, strict: bool = True) -> LoadReport:
    """Load a safetensors file into ``model`` (see :func:`load_tensors`); returns what stayed at its initialisation."""
    return load_tensors(model, read_checkpoint(path)[1], path, allow_head_reset=allow_head_reset, strict=strict)


def load_tensors(model: nn.Module, weights: dict[str, torch.Tensor], path: Path, *, allow_head_reset: bool = False,
                 strict: bool = True) -> LoadReport:
    """Load a checkpoint's tensors (read from ``path``) into ``model``; returns what stayed at its initialisation.

    The position embedding is resampled to the model's patch grid (as timm does for ViTs), so a
    checkpoint loads into the same model built for another image size; connectivity predictors
    of mait's earlier layout are converted (:func:`mait.learned.convert_legacy_predictors`); with ``allow_head_reset``,
    ViT checkpoints also go through timm's ``checkpoint_filter_fn`` (other key layouts, patch
    kernels), so DeiT weights fine-tune into a MaiT at another size.
    With ``allow_head_reset`` a classifier of another class count is dropped (fresh head);
    any other mismatch is an error listing the keys.  ``strict=False`` tolerates missing keys
    (e.g. a soft head's α or the learned-mask predictor when starting from a dense model).
    """
    try:
        weights = convert_legacy_predictors(fit_position_embedding(dict(weights), model), model)
    except ValueError as error:
        raise UserError(f"checkpoint {path}: {error}") from None
    own = model.state_dict()
    if allow_head_reset:
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
        if isinstance(model, VisionTransformer):
            weights = checkpoint_filter_fn(weights, model)
    reset = [k for k in HEAD_KEYS if allow_head_reset and k in weights and k in own
             and weights[k].shape != own[k].shape]
    for key in reset:
        del weights[key]
    missing = [k for k in own if k not in weights and k not in reset]
    unexpected = [k for k in weights if k not in own]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(own[k].shape)}" for k in weights
              if k in own and weights[k].shape != own[k].shape]
    if unexpected or shapes or (missing and strict):
        raise UserError(_mismatch_message(Path(path), missing, unexpected, shapes))
    model.load_state_dict(weights, strict=False)
    return LoadReport(reset=reset, missing=missing)
