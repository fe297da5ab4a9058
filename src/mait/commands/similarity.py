"""``mait similarity``: cross-layer similarity of attention maps (paper Eq. 4, Fig. 4-6), one heatmap per head.

Layers can only be compared when their maps have the same shape; a hierarchical model
(H-MaiT) is therefore measured stage by stage (runs of layers with the same grid and heads).
"""

from __future__ import annotations

import argparse
from itertools import groupby

from ..analysis import attention_layers, last_layers_similarity, measure_similarity
from ..analysis.plots import plot_similarity
from ._model import prepare
from ..errors import UserError


def run(args: argparse.Namespace) -> int:
    model, config, loader, output = prepare(args)
    shapes = [(layer.grid_size, layer.module.num_heads) for layer in attention_layers(model)]
    groups = [[i for i, _ in run] for _, run in groupby(enumerate(shapes), key=lambda item: item[1])]
    groups = [g for g in groups if len(g) >= 2]
    if not groups:
        raise UserError(f"{config.model} has no two attention layers of the same shape to compare")
    print(f"cross-layer attention similarity of {config.model} ({len(loader.dataset)} held-out images of "
          f"{config.data}; cosine of attention rows, Eq. 4)")
    rows = ["head,layer_i,layer_j,similarity"]
    for layers in groups:
        similarity = measure_similarity(model, loader, layers=layers)
        stem = "similarity" if len(groups) == 1 else f"similarity_layers{layers[0]}-{layers[-1]}"
        rows += [f"{h},{i},{j},{similarity[h, a, b]:.6f}" for h in range(similarity.shape[0])
                 for a, i in enumerate(layers) for b, j in enumerate(layers)]
        paths = plot_similarity(similarity, output, title=f"Cross-layer similarity, {config.model}",
                                layer_names=layers, stem=stem)
        last = min(args.last, len(layers))
        tail = last_layers_similarity(similarity, last)
        print(f"layers {layers[0]}-{layers[-1]}: mean similarity among the last {last} layers (off-diagonal pairs): "
              + ", ".join(f"head {h} {v:.3f}" for h, v in enumerate(tail.tolist()))
              + f"; all heads {tail.mean().item():.3f}")
        print(f"  wrote {len(paths)} heatmaps ({paths[0].name} ...)")
    (output / "similarity.csv").write_text("\n".join(rows) + "\n")
    print(f"wrote similarity.csv and the heatmaps in {output}")
    return 0
