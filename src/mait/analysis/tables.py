"""Layer x head tables of the analysis tools: printed text and CSV files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..schemes import MaskingScheme

_KIND_MARK = {"h": "H", "s": "S", "r": "R", "l": "L", "u": " "}


def format_table(values: Sequence[torch.Tensor], scheme: Optional[MaskingScheme] = None) -> str:
    """One line per layer, one column per head, plus the layer mean; with a scheme, each value is
    followed by its head's kind (H hard, S soft, R random, blank unmasked)."""
    width = max(len(v) for v in values)
    lines = ["layer " + "".join(f"{'head ' + str(h):>9}" for h in range(width)) + f"{'mean':>9}"]
    for i, layer in enumerate(values):
        cells = []
        for h, value in enumerate(layer.tolist()):
            mark = _KIND_MARK[scheme.layers[i][h].value] if scheme is not None else ""
            cells.append(f"{value:>8.3f}{mark}" if scheme is not None else f"{value:>9.3f}")
        cells += [" " * 9] * (width - len(layer))
        lines.append(f"{i:>5} " + "".join(cells) + f"{layer.float().mean().item():>9.3f}")
    if scheme is not None:
        lines.append("(H hard-masked, S soft-masked, R random-mask control, L learned mask, blank unmasked)")
    return "\n".join(lines)


def write_csv(values: Sequence[torch.Tensor], path: Union[str, Path], scheme: Optional[MaskingScheme] = None) -> Path:
    """``layer,head,value[,kind]`` rows, one per head."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = ["layer,head,value" + (",kind" if scheme is not None else "")]
    for i, layer in enumerate(values):
        for h, value in enumerate(layer.tolist()):
            kind = f",{scheme.layers[i][h].value}" if scheme is not None else ""
            rows.append(f"{i},{h},{value:.6f}{kind}")
    path.write_text("\n".join(rows) + "\n")
    return path


def save_report(values: Sequence[torch.Tensor], folder: Union[str, Path], stem: str, *, title: str,
                colorbar_label: str, scheme: Optional[MaskingScheme] = None, cmap: str = "viridis") -> str:
    """Write ``<stem>.txt`` (title + table), ``<stem>.csv`` and the heatmap ``<stem>.png``; return the text."""
    from .plots import plot_layer_head  # matplotlib only when a figure is written

    folder = Path(folder)
    text = f"{title}\n{format_table(values, scheme)}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.txt").write_text(text + "\n")
    write_csv(values, folder / f"{stem}.csv", scheme)
    plot_layer_head(values, folder / f"{stem}.png", title=title, colorbar_label=colorbar_label, cmap=cmap)
    return text
