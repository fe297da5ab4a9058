"""``mait similarity``: cross-layer similarity of attention maps (paper Eq. 4, Fig. 4-6), one heatmap per head."""

from __future__ import annotations

import argparse

from ..analysis import last_layers_similarity, measure_similarity
from ..analysis.plots import plot_similarity
from ..analysis.runs import add_model_arguments, prepare
from ..cli import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--last", type=int, default=8,
                        help="report the mean similarity among the last K layers (paper: 8; capped at the depth)")


def run(args: argparse.Namespace) -> int:
    model, config, loader, output = prepare(args)
    similarity = measure_similarity(model, loader)
    heads, depth = similarity.shape[0], similarity.shape[-1]
    if depth < 2:
        raise UserError(f"{config.model} has {depth} attention layer; cross-layer similarity needs at least 2")
    last = min(args.last, depth)
    if last < 2:
        raise UserError(f"--last must be at least 2, got {args.last}")
    images = len(loader.dataset)
    rows = ["head,layer_i,layer_j,similarity"] + [
        f"{h},{i},{j},{similarity[h, i, j]:.6f}" for h in range(heads) for i in range(depth) for j in range(depth)]
    (output / "similarity.csv").write_text("\n".join(rows) + "\n")
    paths = plot_similarity(similarity, output, title=f"Cross-layer similarity, {config.model}")
    tail = last_layers_similarity(similarity, last)
    print(f"cross-layer attention similarity of {config.model} ({images} held-out images of {config.data}; "
          f"cosine of attention rows, Eq. 4)")
    print(f"mean similarity among the last {last} layers (off-diagonal pairs):")
    for h, value in enumerate(tail.tolist()):
        print(f"  head {h}: {value:.3f}")
    print(f"  all heads: {tail.mean().item():.3f}")
    print(f"wrote {output / 'similarity.csv'} and {len(paths)} heatmaps ({paths[0].name} ...) in {output}")
    return 0
