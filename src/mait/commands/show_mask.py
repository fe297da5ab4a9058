"""``mait show-mask``: the paper's Fig. 1, which patches one patch token attends to at full strength.

With ``--checkpoint`` it draws a trained model's *learned* (Sparsifiner) mask instead: the keys
that patch ``--query`` keeps in learned layer ``--layer`` for one image, over that image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import UserError
from ..masks import check_mask_fits_grid, local_mask, random_mask
from ._output import new_file

FIGURE_SUFFIXES = (".png", ".pdf", ".svg")


def _image(path: Path, config, info) -> "torch.Tensor":
    """The image as the model sees it: the run's eval transform (digits: grey 8x8, scaled and normalised)."""
    import numpy as np
    from PIL import Image
    from ..train.data import DIGITS_MEAN, DIGITS_STD, build_transforms
    if not path.is_file():
        raise UserError(f"--image {path} does not exist")
    picture = Image.open(path)
    if info.img_size is not None:                  # tensor data (the digits): no timm transform
        grey = picture.convert("L").resize((info.img_size, info.img_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(grey, dtype=np.float32))[None]
        return (pixels / 255.0 - DIGITS_MEAN[0]) / DIGITS_STD[0]
    _, transform = build_transforms(config, info)
    return transform(picture.convert("RGB" if info.in_chans == 3 else "L"))


def _learned(args: argparse.Namespace) -> int:
    from ..analysis.learned_masks import plot_query_keys, query_keys
    from ..train.runs import held_out_images, open_run
    saved = open_run(args.checkpoint)
    config = saved.config
    loader, info = held_out_images(config, 1, batch_size=1)
    model = saved.model(info)
    image = _image(args.image, config, info) if args.image is not None else next(iter(loader))[0][0]
    grid = tuple(model.patch_embed.grid_size)
    query = args.query if args.query is not None else (grid[0] // 2) * grid[1] + grid[1] // 2
    keep, name = query_keys(model, image, args.layer, query)
    title = f"{config.model}, {name}: keys kept by patch {query} (star)"
    output = args.output or args.checkpoint.parent / "analysis" / f"learned_mask_l{args.layer}_q{query}.png"
    print(title)
    for head, row in enumerate(keep):
        print(f"head {head}: {int(row.sum())} of {row.numel()} patch keys kept")
    with new_file(output, FIGURE_SUFFIXES, force=True) as written:
        plot_query_keys(image, keep, grid, query, written, title)
    print(f"wrote {output}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..analysis.plots import plot_mask_row  # matplotlib only when drawing

    if args.checkpoint is not None:
        return _learned(args)
    h, w = args.grid
    check_mask_fits_grid(args.mask_size, (h, w), name="--mask-size")
    if args.token >= h * w:
        raise UserError(f"--token {args.token} is not a patch of the {h}x{w} grid (expected 0 to {h * w - 1})")
    keep = (random_mask if args.random else local_mask)(
        (h, w), args.mask_size, 0, **({"seed": args.seed} if args.random else {}))[args.token].view(h, w)
    multipliers = torch.where(keep, torch.tensor(1.0), torch.tensor(args.alpha))
    row, col = divmod(args.token, w)
    kind = f"random mask (seed {args.seed})" if args.random else f"{args.mask_size}x{args.mask_size} mask"
    title = f"Patch {args.token} (row {row}, col {col}): {kind}, α = {args.alpha:g}"
    output = args.output or Path(f"mask_{h}x{w}_r{args.mask_size}_p{args.token}{'_random' if args.random else ''}.png")
    with new_file(output, FIGURE_SUFFIXES, force=True) as written:
        plot_mask_row(multipliers, written, query=(row, col), title=title)
    print(title)
    print(f"{int(keep.sum())} of {h * w} patches kept at full strength (#), the rest scaled by α (.); * = the patch")
    for i in range(h):
        print(" ".join("*" if (i, j) == (row, col) else ("#" if keep[i, j] else ".") for j in range(w)))
    print(f"wrote {output}")
    return 0
