"""Learned (Sparsifiner) masks: how local they are (mask ALS), and which keys a patch query keeps in one image."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from ..attention import MaskedAttention
from .als import attention_locality_score
from .collect import Images, _batches


def learned_layers(model: nn.Module) -> list[tuple[str, MaskedAttention]]:
    """``(name, layer)`` of every attention layer holding a connectivity predictor, in forward order."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, MaskedAttention) and module.predictor is not None]


def mask_locality(keep: torch.Tensor, grid_size: tuple[int, int], mask_size: int = 3,
                  num_prefix_tokens: int = 1) -> torch.Tensor:
    """ALS of a binary mask ``(B, heads, T, T)``: per head, the fraction of each patch row's kept keys that lie
    in its ``R x R`` window (prefix keys count as outside), averaged over patch rows and images -> ``(heads,)``.

    This is the ALS of the attention map that spreads each row uniformly over its kept keys.
    """
    uniform = keep.double() / keep.sum(dim=-1, keepdim=True).clamp_min(1)
    return attention_locality_score(uniform, grid_size, mask_size, num_prefix_tokens).float()


@torch.no_grad()
def measure_mask_locality(model: nn.Module, images: Images, mask_size: int = 3) -> list[torch.Tensor]:
    """Mask ALS (:func:`mask_locality`) of every learned head of every learned layer: a list of ``(learned heads,)``.

    ``images`` is a ``(B, C, H, W)`` batch or an iterable of batches / ``(images, labels)``
    pairs; the mean is over all images.
    """
    layers = learned_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no learned (Sparsifiner) heads; mask ALS needs a model with "
                         f"'l' heads")
    device = next(model.parameters()).device
    sums: list[torch.Tensor] = [torch.zeros(len(layer.learned_index), dtype=torch.float64) for _, layer in layers]
    count, was_training = 0, model.training
    model.eval()
    try:
        for _, layer in layers:
            layer.capture_attention = True
        for batch in _batches(images):
            model(batch.to(device))
            for index, (_, layer) in enumerate(layers):
                sums[index] += mask_locality(layer.predictor.last_keep, layer.grid_size, mask_size,
                                             layer.num_prefix_tokens).double().cpu() * len(batch)
            count += len(batch)
    finally:
        model.train(was_training)
        for _, layer in layers:
            layer.capture_attention, layer.last_attention, layer.predictor.last_keep = False, None, None
    if count == 0:
        raise ValueError("no images: the data is empty")
    return [(total / count).float() for total in sums]


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
        keep = module.predictor.last_keep[0, :, prefix + query, prefix:]
    finally:
        module.capture_attention, module.last_attention, module.predictor.last_keep = False, None, None
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
