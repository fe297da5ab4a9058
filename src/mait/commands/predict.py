"""``mait predict``: the top-k classes, with names and probabilities, of image files under a checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import UserError
from ..train.data import IMAGE_EXTENSIONS

_MODE_NAMES = {"L": "grey", "LA": "grey with alpha", "1": "black-and-white", "P": "palette", "I;16": "16-bit grey",
               "I": "32-bit grey", "F": "float grey"}


def image_files(paths: list[str]) -> list[Path]:
    """The given files, and every image below the given folders (sorted); an error for a path that is neither."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UserError(f"folder {path} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"image {path} does not exist")
    return files


def _load(path: Path, transform: Callable, size: int, mode: str) -> tuple[torch.Tensor, Optional[str]]:
    """The image through the model's ``transform``, and, when it is not ``size`` x ``size`` pixels of
    colour ``mode`` (``L``: grey, ``RGB``), what it was (e.g. ``photo.jpg (640x480 RGB)``)."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            matches = image.size == (size, size) and image.mode == mode
            was = f"{path} ({image.width}x{image.height} {_MODE_NAMES.get(image.mode, image.mode)})"
            return transform(image), None if matches else was
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"cannot read image {path}: {error}") from None


def _conversion_note(converted: list[str], size: int, mode: str, model: str) -> str:
    """One line saying which images were resized or converted to the model's input."""
    shown = ", ".join(converted[:3]) + (f" and {len(converted) - 3} more" if len(converted) > 3 else "")
    return (f"mait predict: note: {model} takes {size}x{size} {_MODE_NAMES.get(mode, mode)} images; converted to "
            f"that: {shown} (--quiet hides this note)")


def run(args: argparse.Namespace) -> int:
    from ..train.distributed import setup
    from ..train.runs import open_run

    files = image_files(args.images)
    saved = open_run(args.checkpoint)
    config, card = saved.config, saved.model_card()
    device = setup(args.device).device
    model = saved.model(card.data_info()).to(device)
    transform, k = card.transform(), min(args.top_k, card.num_classes)
    mode = "L" if card.in_chans == 1 else "RGB"
    results, converted = [], []
    with torch.inference_mode():
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            loaded = [_load(path, transform, card.img_size, mode) for path in chunk]
            converted += [was for _, was in loaded if was is not None]
            top = model(torch.stack([image for image, _ in loaded]).to(device)).float().softmax(dim=1).topk(k, dim=1)
            for path, probs, classes in zip(chunk, top.values.tolist(), top.indices.tolist()):
                results.append({"image": str(path), "top": [
                    {"class": c, "name": card.class_name(c), "probability": round(p, 6)}
                    for c, p in zip(classes, probs)]})
    if converted and not args.quiet:
        print(_conversion_note(converted, card.img_size, mode, config.model), file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    width = max(len(r["image"]) for r in results)
    print(f"{'image':<{width}}  top-{k} classes (probability) of {config.model}")
    for result in results:
        print(f"{result['image']:<{width}}  " + "  ".join(
            f"{t['name']} ({100 * t['probability']:.1f} %)" for t in result["top"]))
    return 0
