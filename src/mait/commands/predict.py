"""``mait predict``: the top-k classes, with names and probabilities, of image files under a checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..errors import UserError
from ..train.data import IMAGE_EXTENSIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help="image files, or folders searched recursively for images")
    parser.add_argument("--checkpoint", required=True, type=Path, metavar="FILE",
                        help="weights (.safetensors) written by `mait train`; they record the model and its input")
    parser.add_argument("--top-k", type=int, default=5, help="classes shown per image (default: 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per image) instead of a table")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")


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


def _load(path: Path, transform) -> torch.Tensor:
    from PIL import Image
    try:
        with Image.open(path) as image:
            return transform(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"cannot read image {path}: {error}") from None


def run(args: argparse.Namespace) -> int:
    from ..train.distributed import setup
    from ..train.runs import checkpoint_card, load_model, run_config

    if args.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {args.top_k}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    files = image_files(args.images)
    config = run_config(args.checkpoint)
    card = checkpoint_card(args.checkpoint, config)
    device = setup(args.device).device
    model = load_model(config, card.data_info(), args.checkpoint).to(device)
    transform, k = card.transform(), min(args.top_k, card.num_classes)
    results = []
    with torch.inference_mode():
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            batch = torch.stack([_load(path, transform) for path in chunk]).to(device)
            top = model(batch).float().softmax(dim=1).topk(k, dim=1)
            for path, probs, classes in zip(chunk, top.values.tolist(), top.indices.tolist()):
                results.append({"image": str(path), "top": [
                    {"class": c, "name": card.class_name(c), "probability": round(p, 6)}
                    for c, p in zip(classes, probs)]})
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    width = max(len(r["image"]) for r in results)
    print(f"{'image':<{width}}  top-{k} classes (probability) of {config.model}")
    for result in results:
        print(f"{result['image']:<{width}}  " + "  ".join(
            f"{t['name']} ({100 * t['probability']:.1f} %)" for t in result["top"]))
    return 0
