"""``mait alphas``: the learned soft-mask α per layer and head, a heatmap, and the hardened scheme."""

from __future__ import annotations

import argparse

from ..analysis import harden, model_scheme, read_alphas, save_report
from ._model import prepare


def run(args: argparse.Namespace) -> int:
    model, config, _, output = prepare(args, data=False)
    scheme, hardened = model_scheme(model), harden(model, args.threshold)
    source = args.checkpoint or "fresh weights (no --checkpoint)"
    title = f"Soft-mask α per head of {config.model}\nhardened at α < {args.threshold:g}: {hardened}"
    print(f"α from {source} (0 hard, 1 unmasked, between: learned soft mask)")
    print(save_report(read_alphas(model), output, "alphas", title=title, scheme=scheme, cmap="coolwarm",
                      colorbar_label="α (0 = hard mask, 1 = unmasked)"))
    if not scheme.has_soft:
        print("the model has no soft-masked head: nothing was learned, the hardened scheme is the model's own")
    print(f"hardened scheme (train it with --scheme '{hardened}'):")
    print(hardened.describe())
    (output / "hardened_scheme.txt").write_text(f"{hardened}\n")
    print(f"wrote alphas.txt, alphas.csv, alphas.png and hardened_scheme.txt in {output}")
    return 0
