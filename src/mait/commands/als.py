"""``mait als``: Attention Locality Score (paper Eq. 3) of every head of every layer, as a table and a heatmap."""

from __future__ import annotations

import argparse

from ..analysis import attention_layers, measure_als, model_scheme, save_report
from ..analysis.learned_masks import learned_layers, measure_mask_locality
from ..attention import MaskedAttention
from ..masks import check_mask_fits_grid
from ._model import prepare


def run(args: argparse.Namespace) -> int:
    model, config, loader, output = prepare(args)
    if args.window is not None:
        for grid in sorted({tuple(layer.grid_size) for layer in attention_layers(model)}, key=max):
            check_mask_fits_grid(args.window, grid, name="--window")
    als = measure_als(model, loader, mask_size=args.window)
    masked = any(isinstance(m, MaskedAttention) for m in model.modules())
    window = args.window or getattr(model, "mask_size", 3)
    title = (f"Attention Locality Score (R = {window}) of {config.model}\n"
             f"{len(loader.dataset)} held-out images of {config.data}")
    print(save_report(als, output, "als", title=title, colorbar_label="ALS (attention on the neighbourhood)",
                      scheme=model_scheme(model) if masked else None))
    print(f"wrote als.txt, als.csv and als.png in {output}")
    if learned_layers(model):       # learned (Sparsifiner) heads: how much of each mask is local
        locality = measure_mask_locality(model, loader, mask_size=window)
        print(save_report(locality, output, "mask_als", colorbar_label="share of kept keys in the window",
                          title=f"Learned-mask ALS (R = {window}): share of kept keys inside the window\n"
                                f"{config.model}, {len(loader.dataset)} held-out images"))
        print(f"wrote mask_als.txt, mask_als.csv and mask_als.png in {output}")
    return 0
