"""Figures of the analysis tools (PNG, matplotlib's object API: no global pyplot state, no display needed).

Every figure has a title, axis labels and a colour bar so it reads without the code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from matplotlib.figure import Figure

PathLike = Union[str, Path]


def layer_head_matrix(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-layer ``(heads,)`` values into ``(layers, max heads)``, NaN where a layer has fewer heads."""
    width = max(len(v) for v in values)
    table = torch.full((len(values), width), float("nan"))
    for i, v in enumerate(values):
        table[i, :len(v)] = torch.as_tensor(v, dtype=torch.float32)
    return table


def plot_layer_head(values: Sequence[torch.Tensor], path: PathLike, *, title: str, colorbar_label: str,
                    vmin: float = 0.0, vmax: float = 1.0, cmap: str = "viridis") -> Path:
    """Heatmap of one value per (layer, head), e.g. ALS or α, annotated with the numbers."""
    table = layer_head_matrix(values)
    layers, heads = table.shape
    fig = Figure(figsize=(max(5.0, 2.6 + 0.9 * heads), max(3.6, 1.6 + 0.32 * layers)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(table.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    _annotate(ax, image, table)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    return _save(fig, path)


def _annotate(ax, image, table: torch.Tensor) -> None:
    """Write each finite cell's value, dark on light colours and light on dark ones."""
    for i, j in zip(*torch.nonzero(table.isfinite(), as_tuple=True)):
        value = float(table[i, j])
        red, green, blue, _ = image.cmap(image.norm(value))
        dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
        ax.text(int(j), int(i), f"{value:.2f}", ha="center", va="center", fontsize=7 if table.shape[1] > 12 else 8,
                color="white" if dark else "black")


def plot_similarity(similarity: torch.Tensor, directory: PathLike, *, title: str,
                    layer_names: Optional[Sequence[int]] = None, stem: str = "similarity") -> list[Path]:
    """One ``L x L`` heatmap per head (the paper's Fig. 4-6) as ``<stem>_head<h>.png``; returns the paths."""
    directory = Path(directory)
    depth = similarity.shape[-1]
    ticks = list(layer_names) if layer_names is not None else list(range(depth))
    step = max(1, depth // 12)
    paths = []
    for head in range(similarity.shape[0]):
        fig = Figure(figsize=(6.0, 5.0), layout="constrained")
        ax = fig.add_subplot()
        image = ax.imshow(similarity[head].numpy(), cmap="magma", vmin=0.0, vmax=1.0)
        if depth <= 12:
            _annotate(ax, image, similarity[head])
        ax.set_title(f"{title}, head {head}", fontsize=10)
        ax.set_xlabel("layer j")
        ax.set_ylabel("layer i")
        ax.set_xticks(range(0, depth, step), [str(t) for t in ticks[::step]])
        ax.set_yticks(range(0, depth, step), [str(t) for t in ticks[::step]])
        fig.colorbar(image, ax=ax, label="cosine similarity of attention rows (mean)")
        paths.append(_save(fig, directory / f"{stem}_head{head}.png"))
    return paths


def plot_mask_row(multipliers: torch.Tensor, path: PathLike, *, query: tuple[int, int], title: str) -> Path:
    """Fig. 1: the ``H x W`` grid coloured by the multiplier ``Mα`` the query patch applies to each patch."""
    h, w = multipliers.shape
    fig = Figure(figsize=(max(5.5, 2.4 + 0.38 * w), max(4.0, 1.4 + 0.38 * h)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(multipliers.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ax.scatter([query[1]], [query[0]], marker="*", s=160, color="crimson")
    ax.set_xticks(range(w))
    ax.set_yticks(range(h))
    ax.set_xticks([x - 0.5 for x in range(1, w)], minor=True)
    ax.set_yticks([y - 0.5 for y in range(1, h)], minor=True)
    ax.grid(which="minor", color="grey", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("patch column (red star: the query patch)")
    ax.set_ylabel("patch row")
    fig.colorbar(image, ax=ax, label="multiplier Mα of the logit")
    return _save(fig, path)


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
