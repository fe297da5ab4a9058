"""The keys of ``mait.train.TrainConfig`` for the command line, read without importing mait.

``import mait`` imports torch and timm, which takes seconds, so ``mait train --help`` cannot
import the dataclass to list its fields. Its source is plain: one annotated field per line with a
literal default (or ``field(default_factory=...)``) and a comment saying what the key does. This
module reads that source with :mod:`ast`; a test checks the result against the real dataclass.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ConfigKey:
    """One ``TrainConfig`` field: its name, whether it is a switch (bool), its default as written, its comment."""

    name: str
    is_switch: bool
    default: Any
    comment: str


def _config_source() -> Path:
    """``mait/train/config.py`` of the installed package, found without importing ``mait``."""
    spec = importlib.util.find_spec("mait")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the mait package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "train" / "config.py"


def _default_text(value: ast.expr) -> str:
    """The default as Python source: the literal, or what ``field(default_factory=...)`` makes."""
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        factory = next(k.value for k in value.keywords if k.arg == "default_factory")
        if isinstance(factory, ast.Lambda):
            return ast.unparse(factory.body)
        return {"dict": "{}", "list": "[]"}.get(getattr(factory, "id", ""), ast.unparse(factory) + "()")
    return ast.unparse(value)


@lru_cache(maxsize=1)
def config_keys() -> tuple[ConfigKey, ...]:
    """Every field of ``TrainConfig`` in the order the class declares them."""
    path = _config_source()
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source, filename=str(path))
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "TrainConfig")
    keys = []
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            after = lines[node.end_lineno - 1][node.end_col_offset:]
            comment = after.split("#", 1)[1].strip() if "#" in after else ""
            keys.append(ConfigKey(node.target.id, ast.unparse(node.annotation) in ("bool", "Optional[bool]"),
                                  ast.literal_eval(_default_text(node.value)), comment))
    return tuple(keys)
