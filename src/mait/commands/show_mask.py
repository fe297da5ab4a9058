"""``mait show-mask``: the paper's Fig. 1, which patches one patch token attends to at full strength."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import UserError
from ..masks import check_mask_size, local_mask, random_mask, to_grid


def _grid(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
        return to_grid(parts[0] if len(parts) == 1 else parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must be N or HxW with positive ints (e.g. 14 or 7x10), got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", type=_grid, default=(14, 14), help="patch grid, N or HxW (default: 14, DeiT at 224 px)")
    parser.add_argument("--mask-size", type=int, default=3, help="odd mask size R (default: 3)")
    parser.add_argument("--token", type=int, default=16,
                        help="patch index in the grid, row-major from 0, prefix tokens not counted (default: 16)")
    parser.add_argument("--alpha", type=float, default=0.0,
                        help="the head's α: 0 hard mask (default), between 0 and 1 soft mask")
    parser.add_argument("--random", action="store_true", help="show the random-mask control (§5.6) instead")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask (with --random)")
    parser.add_argument("--output", type=Path, default=None, help="PNG path (default: mask_<H>x<W>_r<R>_p<token>.png)")


def run(args: argparse.Namespace) -> int:
    from ..analysis.plots import plot_mask_row  # matplotlib only when drawing

    h, w = args.grid
    check_mask_size(args.mask_size)
    if not 0 <= args.token < h * w:
        raise UserError(f"--token {args.token} is not a patch of the {h}x{w} grid (expected 0 to {h * w - 1})")
    if not 0.0 <= args.alpha <= 1.0:
        raise UserError(f"--alpha must lie in [0, 1] (0 hard mask, 1 unmasked), got {args.alpha}")
    keep = (random_mask if args.random else local_mask)(
        (h, w), args.mask_size, 0, **({"seed": args.seed} if args.random else {}))[args.token].view(h, w)
    multipliers = torch.where(keep, torch.tensor(1.0), torch.tensor(args.alpha))
    row, col = divmod(args.token, w)
    kind = f"random mask (seed {args.seed})" if args.random else f"{args.mask_size}x{args.mask_size} mask"
    title = f"Patch {args.token} (row {row}, col {col}): {kind}, α = {args.alpha:g}"
    output = args.output or Path(f"mask_{h}x{w}_r{args.mask_size}_p{args.token}{'_random' if args.random else ''}.png")
    print(title)
    print(f"{int(keep.sum())} of {h * w} patches kept at full strength (#), the rest scaled by α (.); * = the patch")
    for i in range(h):
        print(" ".join("*" if (i, j) == (row, col) else ("#" if keep[i, j] else ".") for j in range(w)))
    print(f"wrote {plot_mask_row(multipliers, output, query=(row, col), title=title)}")
    return 0
