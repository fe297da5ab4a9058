"""Learned (Sparsifiner) masks of one image: which keys a patch query keeps, drawn over the input image."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from ..learned import learned_layers


def query_keys(model: nn.Module, image: torch.Tensor, layer: int, query: int) -> tuple[torch.Tensor, str]:
    """Kept keys of patch ``query`` in learned layer ``layer`` for one ``(C, H, W)`` image.

    Returns a ``(learned heads, H*W)`` boolean tensor over the patch grid (prefix keys dropped)
    and the layer's name.  ``layer`` counts the model's layers that hold learned heads.
    """
    layers = learned_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no learned (Sparsifiner) heads; show-mask --checkpoint needs "
                         f"a model with 'l' heads")
    if not 0 <= layer < len(layers):
        raise ValueError(f"--layer {layer} is not a learned layer: the model has {len(layers)} (0-{len(layers) - 1})")
    name, module = layers[layer]
    grid = module.grid_size
    if not 0 <= query < grid[0] * grid[1]:
        raise ValueError(f"--query {query} is not a patch of the {grid[0]}x{grid[1]} grid "
                         f"(expected 0 to {grid[0] * grid[1] - 1})")
    module.capture_attention = True
    try:
        with torch.no_grad():
            model.eval()(image[None])
        prefix = module.num_prefix_tokens
        keep = module.last_keep[0, :, prefix + query, prefix:]
    finally:
        module.capture_attention, module.last_attention, module.last_keep = False, None, None
    return keep.cpu(), name


def plot_query_keys(image: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int], query: int,
                    path: Union[str, Path], title: Optional[str] = None) -> Path:
    """One panel per head: the image with the query patch (star) and its kept key patches (outlined)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    heads = keep.shape[0]
    picture = image.float()
    picture = (picture - picture.min()) / (picture.max() - picture.min()).clamp_min(1e-8)
    picture = picture.permute(1, 2, 0).squeeze(-1).numpy()
    height, width = picture.shape[:2]
    ph, pw = height / grid[0], width / grid[1]
    figure, axes = plt.subplots(1, heads, figsize=(3.2 * heads, 3.4), squeeze=False)
    row, col = divmod(query, grid[1])
    for head, axis in enumerate(axes[0]):
        axis.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
        cells = keep[head].view(grid).nonzero().tolist()
        for r, c in cells:
            axis.add_patch(Rectangle((c * pw - 0.5, r * ph - 0.5), pw, ph, fill=True, alpha=0.35, color="orange"))
        axis.scatter([col * pw + pw / 2 - 0.5], [row * ph + ph / 2 - 0.5], marker="*", s=140, color="crimson")
        axis.set_title(f"head {head}: {len(cells)} patch keys kept", fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
