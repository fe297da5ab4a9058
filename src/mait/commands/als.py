"""``mait als``: Attention Locality Score (paper Eq. 3) of every head of every layer, as a table and a heatmap."""

from __future__ import annotations

import argparse

from ..analysis import format_table, measure_als, model_scheme, write_csv
from ..analysis.plots import plot_layer_head
from ..analysis.runs import add_model_arguments, prepare
from ..attention import MaskedAttention


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--window", type=int, default=None,
                        help="R of the neighbourhood the ALS counts (default: each layer's mask size, 3 for plain models)")


def run(args: argparse.Namespace) -> int:
    model, config, loader, output = prepare(args)
    als = measure_als(model, loader, mask_size=args.window)
    masked = any(isinstance(m, MaskedAttention) for m in model.modules())
    scheme = model_scheme(model) if masked else None
    images = len(loader.dataset)
    window = args.window or getattr(model, "mask_size", 3)
    title = f"ALS of {config.model} ({images} held-out images of {config.data}, R = {window})"
    print(title)
    print(format_table(als, scheme))
    (output / "als.txt").write_text(title + "\n" + format_table(als, scheme) + "\n")
    write_csv(als, output / "als.csv", scheme)
    plot = plot_layer_head(als, output / "als.png", colorbar_label="ALS (attention on the neighbourhood)",
                           title=f"Attention Locality Score (R = {window}) of {config.model}\n"
                                 f"{images} held-out images of {config.data}")
    print(f"wrote {output / 'als.txt'}, {output / 'als.csv'}, {plot}")
    return 0
