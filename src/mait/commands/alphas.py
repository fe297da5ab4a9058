"""``mait alphas``: the learned soft-mask α per layer and head, a heatmap, and the hardened scheme."""

from __future__ import annotations

import argparse

from ..analysis import format_table, harden, model_scheme, read_alphas, write_csv
from ..analysis.plots import plot_layer_head
from ..analysis.runs import add_model_arguments, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, data=False)
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="harden: soft heads with α below it become hard-masked, the others unmasked (default 0.5)")


def run(args: argparse.Namespace) -> int:
    model, config, _, output = prepare(args, data=False)
    alphas, scheme = read_alphas(model), model_scheme(model)
    hardened = harden(model, args.threshold)
    source = args.checkpoint or "fresh weights (no --checkpoint)"
    print(f"α of {config.model} from {source} (0 hard, 1 unmasked, between: learned soft mask)")
    print(format_table(alphas, scheme))
    if not scheme.has_soft:
        print("the model has no soft-masked head: nothing was learned, the hardened scheme is the model's own")
    print(f"hardened at α < {args.threshold:g} -> hard mask: {hardened}")
    print(hardened.describe())
    write_csv(alphas, output / "alphas.csv", scheme)
    (output / "hardened_scheme.txt").write_text(f"{hardened}\n")
    plot = plot_layer_head(alphas, output / "alphas.png", title=f"Soft-mask α per head of {config.model}\n(hardened at {args.threshold:g}: {hardened})",
                           colorbar_label="α (0 = hard mask, 1 = unmasked)", cmap="coolwarm")
    print(f"wrote {output / 'alphas.csv'}, {output / 'hardened_scheme.txt'} (use with --scheme), {plot}")
    return 0
