"""Masking schemes: which heads of which layer are hard-masked, soft-masked or unmasked.

A scheme is one tuple of head kinds per layer.  Its text form (round-trips through
:meth:`MaskingScheme.parse` and ``str()``) is a comma-separated list of ``LAYERS:HEADS``
groups::

    LAYERS  := i | i-j | *                      (0-based, inclusive; * = every layer)
    HEADS   := pattern                          one letter per head, in head order:
                                                  h hard mask (α = 0)
                                                  s soft mask (learnable α in (0, 1))
                                                  r random-mask control (hard, random positions)
                                                  u unmasked (α = 1)
                                                  l learned top-k mask (Sparsifiner)
             | <k>h | <k>s | <k>r | <k>l        the first k heads hard / soft / random / learned, rest unmasked
             | 0 | none                         no masked head
             | all | soft                       every head hard / every head soft

Layers that no group names are unmasked; naming a layer twice is an error.  Examples
for a 24-layer, 3-head model: ``"0-7:2h,8-19:1h"`` (Sch.2), ``"*:1h"`` (Sch.1),
``"0-20:soft"`` (Sch.3), ``"0:hsu,1-23:1h"`` (explicit per-head pattern).

The built-in schemes of the paper (docs/semantics.md) are available by name, scaled to the
model's depth: ``none``, ``sch1``, ``sch2``, ``sch3``, ``mixed``, ``random``, plus
``soft`` (every head soft) and ``all`` (every head hard).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence, Union


class HeadKind(str, Enum):
    """How one attention head treats non-neighbour logits."""

    HARD = "h"      # α = 0: non-neighbour logits become 0 (paper's binary mask)
    SOFT = "s"      # learnable α in (0, 1)
    RANDOM = "r"    # α = 0 with a random mask of the same kept fraction (§5.6 control)
    NONE = "u"      # α = 1: plain attention
    LEARNED = "l"   # instance-dependent top-k mask from a connectivity predictor (mait.learned)

    @property
    def is_masked(self) -> bool:
        return self is not HeadKind.NONE


HeadsSpec = Union[int, Sequence[int]]
_SHORTHAND = re.compile(r"^(\d+)([hsrl])$")
_PATTERN = re.compile(r"^[hsrul]+$")


def _builtin_texts(depth: int) -> dict[str, Callable[[int], str]]:
    """Built-in schemes as text, given the depth; the callable receives the head count."""
    last = depth - 1
    third = max(1, round(depth / 3))           # Sch.2: layers 0-7 of 24
    tail2 = max(1, round(depth / 6))           # Sch.2: no mask in the last 4 of 24
    tail3 = max(1, round(depth / 8))           # Sch.3: no mask in the last 3 of 24

    def span(a: int, b: int) -> str:
        return str(a) if a == b else f"{a}-{b}"

    def sch2(heads: int) -> str:
        groups = [f"{span(0, third - 1)}:{max(heads - 1, 1)}h"]
        if depth - tail2 > third:
            groups.append(f"{span(third, depth - tail2 - 1)}:1h")
        return ",".join(groups)

    def sch3(heads: int) -> str:
        return f"{span(0, max(depth - tail3 - 1, 0))}:soft"

    def mixed(heads: int) -> str:
        groups = [f"{span(0, third - 1)}:all"]
        if depth > third:
            groups.append(f"{span(third, last)}:1h")
        return ",".join(groups)

    return {
        "none": lambda heads: "",
        "sch1": lambda heads: "*:1h",
        "sch2": sch2,
        "sch3": sch3,
        "mixed": mixed,
        "random": lambda heads: "*:1r",
        "soft": lambda heads: "*:soft",
        "all": lambda heads: "*:all",
    }


BUILTIN_SCHEMES = tuple(_builtin_texts(24))


@dataclass(frozen=True)
class MaskingScheme:
    """Per-layer head kinds of a model; ``layers[i][h]`` is the :class:`HeadKind` of head h in layer i."""

    layers: tuple[tuple[HeadKind, ...], ...]

    # ----------------------------------------------------------------- constructors
    @classmethod
    def parse(cls, text: str, depth: int, num_heads: HeadsSpec) -> "MaskingScheme":
        """Parse a scheme name (``"sch2"``) or text (``"0-7:2h,8-19:1h"``) for a given model shape.

        ``num_heads`` is one int for every layer or one int per layer (hierarchical models).
        """
        heads = _heads_per_layer(depth, num_heads)
        if not isinstance(text, str):
            raise TypeError(f"a masking scheme must be a string, got {type(text).__name__}")
        text = text.strip()
        builtins = _builtin_texts(depth)
        if text.lower() in builtins:
            if text.lower() == "sch2" and len(set(heads)) != 1:
                raise ValueError("the built-in 'sch2' needs the same head count in every layer; "
                                 "write the scheme out as text instead")
            text = builtins[text.lower()](heads[0])
        layers: list[tuple[HeadKind, ...] | None] = [None] * depth
        for group in filter(None, (g.strip() for g in text.split(","))):
            if ":" not in group:
                raise ValueError(
                    f"scheme group {group!r} must look like 'LAYERS:HEADS' (e.g. '0-7:2h'); "
                    f"or use a built-in name: {', '.join(BUILTIN_SCHEMES)}")
            layer_part, head_part = (s.strip() for s in group.split(":", 1))
            for layer in _parse_layers(layer_part, depth, group):
                if layers[layer] is not None:
                    raise ValueError(f"scheme names layer {layer} twice (in group {group!r})")
                layers[layer] = _parse_heads(head_part, heads[layer], layer)
        return cls(tuple(
            spec if spec is not None else (HeadKind.NONE,) * heads[i] for i, spec in enumerate(layers)))

    @classmethod
    def from_kinds(cls, layers: Sequence[Sequence[HeadKind | str]]) -> "MaskingScheme":
        """Build from nested per-layer, per-head kinds (letters or :class:`HeadKind`)."""
        return cls(tuple(tuple(HeadKind(k) for k in layer) for layer in layers))

    # ----------------------------------------------------------------- queries
    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def num_heads(self) -> tuple[int, ...]:
        return tuple(len(layer) for layer in self.layers)

    def layer(self, index: int) -> tuple[HeadKind, ...]:
        if not 0 <= index < self.depth:
            raise ValueError(f"layer {index} does not exist: the scheme has {self.depth} layers (0-{self.depth - 1})")
        return self.layers[index]

    def num_masked(self, index: int) -> int:
        return sum(kind.is_masked for kind in self.layer(index))

    @property
    def has_learned(self) -> bool:
        return any(kind is HeadKind.LEARNED for layer in self.layers for kind in layer)

    @property
    def has_soft(self) -> bool:
        return any(kind is HeadKind.SOFT for layer in self.layers for kind in layer)

    def validate(self, depth: int, num_heads: HeadsSpec) -> "MaskingScheme":
        """Raise ``ValueError`` unless the scheme fits a model of this depth and head count."""
        heads = _heads_per_layer(depth, num_heads)
        if self.depth != depth:
            raise ValueError(f"scheme has {self.depth} layers but the model has {depth}")
        for i, (have, want) in enumerate(zip(self.num_heads, heads)):
            if have != want:
                raise ValueError(f"scheme gives layer {i} {have} heads but the model's layer {i} has {want}")
        return self

    def describe(self) -> str:
        """A human-readable per-layer table (one line per run of identical layers)."""
        lines = []
        for start, stop, pattern in self._runs():
            layers = f"{start}" if start == stop else f"{start}-{stop}"
            kinds = " ".join({"h": "hard", "s": "soft", "r": "random", "l": "learned", "u": "-"}[k.value] for k in pattern)
            lines.append(f"  layers {layers:>7}: {kinds}")
        return "\n".join(lines)

    # ----------------------------------------------------------------- text form
    def _runs(self) -> list[tuple[int, int, tuple[HeadKind, ...]]]:
        runs: list[tuple[int, int, tuple[HeadKind, ...]]] = []
        for i, pattern in enumerate(self.layers):
            if runs and runs[-1][2] == pattern and runs[-1][1] == i - 1:
                runs[-1] = (runs[-1][0], i, pattern)
            else:
                runs.append((i, i, pattern))
        return runs

    def __str__(self) -> str:
        groups = []
        for start, stop, pattern in self._runs():
            if not any(k.is_masked for k in pattern):
                continue
            layers = "*" if (start, stop) == (0, self.depth - 1) else (
                f"{start}" if start == stop else f"{start}-{stop}")
            groups.append(f"{layers}:{_format_heads(pattern)}")
        return ",".join(groups) or "none"


def _heads_per_layer(depth: int, num_heads: HeadsSpec) -> tuple[int, ...]:
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    heads = (num_heads,) * depth if isinstance(num_heads, int) else tuple(int(h) for h in num_heads)
    if len(heads) != depth or min(heads) < 1:
        raise ValueError(f"num_heads must be a positive int or one positive int per layer ({depth}), got {num_heads!r}")
    return heads


def _parse_layers(text: str, depth: int, group: str) -> range:
    if text == "*":
        return range(depth)
    match = re.fullmatch(r"(\d+)(?:-(\d+))?", text)
    if not match:
        raise ValueError(f"layers {text!r} in scheme group {group!r} must be 'i', 'i-j' or '*'")
    start = int(match.group(1))
    stop = int(match.group(2)) if match.group(2) is not None else start
    if stop < start:
        raise ValueError(f"layer range {text!r} in scheme group {group!r} is empty (end before start)")
    if stop >= depth:
        raise ValueError(f"scheme group {group!r} names layer {stop}, which does not exist: "
                         f"the model has {depth} layers (0-{depth - 1})")
    return range(start, stop + 1)


def _parse_heads(text: str, heads: int, layer: int) -> tuple[HeadKind, ...]:
    text = text.lower()
    if text in ("0", "none"):
        return (HeadKind.NONE,) * heads
    if text == "all":
        return (HeadKind.HARD,) * heads
    if text == "soft":
        return (HeadKind.SOFT,) * heads
    match = _SHORTHAND.match(text)
    if match:
        count = int(match.group(1))
        if count > heads:
            raise ValueError(f"scheme asks for {count} masked heads in layer {layer}, "
                             f"which has {heads} heads (0-{heads - 1})")
        return (HeadKind(match.group(2)),) * count + (HeadKind.NONE,) * (heads - count)
    if _PATTERN.match(text):
        if len(text) != heads:
            raise ValueError(f"head pattern {text!r} for layer {layer} names {len(text)} heads, "
                             f"but the layer has {heads} heads (0-{heads - 1})")
        return tuple(HeadKind(c) for c in text)
    raise ValueError(f"head spec {text!r} for layer {layer} is not one of: a pattern of h/s/r/u/l letters "
                     f"(one per head), '<k>h', '<k>s', '<k>r', '<k>l', '0', 'none', 'all', 'soft'")


def _format_heads(pattern: tuple[HeadKind, ...]) -> str:
    kinds = set(pattern)
    if kinds == {HeadKind.HARD}:
        return "all"
    if kinds == {HeadKind.SOFT}:
        return "soft"
    first, count = pattern[0], 0
    while count < len(pattern) and pattern[count] is first:
        count += 1
    if first.is_masked and all(k is HeadKind.NONE for k in pattern[count:]):
        return f"{count}{first.value}"
    return "".join(k.value for k in pattern)


def resolve_scheme(scheme: str | MaskingScheme, depth: int, num_heads: HeadsSpec) -> MaskingScheme:
    """Accept a name, text or :class:`MaskingScheme` and return a scheme validated against the model."""
    if isinstance(scheme, MaskingScheme):
        return scheme.validate(depth, num_heads)
    return MaskingScheme.parse(scheme, depth, num_heads)
