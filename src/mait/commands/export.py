"""``mait export``: a checkpoint as an ONNX file or a ``torch.export`` program, checked against PyTorch.

Masked layers export through plain PyTorch ops, never FlexAttention (the model is traced
on the CPU): with ``--attention auto`` (default) hard-masked heads take the exact
linear-time backend where the grid is large enough for it to pay (else the dense one),
unmasked heads ``scaled_dot_product_attention`` and soft heads the dense ``matmul`` backend; with
``--attention reference`` every masked layer is the dense masked attention.  After writing the file
the command runs the exported program on random images (ONNX: with onnxruntime, the
``[export]`` extra) and fails when its logits differ from PyTorch's by more than ``--atol``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import UserError

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, metavar="FILE",
                        help="weights (.safetensors) written by `mait train`; they record the model and its input")
    parser.add_argument("--format", required=True, choices=tuple(FORMATS), help="onnx (torch.onnx) or pt2 (torch.export)")
    parser.add_argument("--output", type=Path, default=None,
                        help="file to write (default: the checkpoint's name with .onnx / .pt2)")
    parser.add_argument("--attention", choices=("auto", "reference"), default="auto",
                        help="masked layers in the graph: auto (hard heads linear-time where the grid is large "
                             "enough; default) or reference (dense)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch of the example input and the check (default 2)")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="largest allowed |logit difference| to PyTorch in the check (default 1e-4)")


def set_backend(model: nn.Module, backend: str) -> int:
    """Make every masked attention layer of ``model`` use ``backend``; returns how many there are."""
    from ..attention import MaskedAttention
    layers = [m for m in model.modules() if isinstance(m, MaskedAttention)]
    for layer in layers:
        layer.backend = backend
    return len(layers)


def export_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension, saved to ``path``."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
    torch.export.save(program, str(path))
    return program


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """``torch.onnx.export`` (the ``torch.export``-based exporter) with a dynamic batch dimension.

    Of onnxscript's default optimisation only constant folding and dead-node removal run: they
    take seconds and halve the graph, while its pattern rewriter costs minutes per layer of the
    linear-time path (O(R²) slices each; a 24-layer 224-px MaiT takes most of an hour) for
    fusions onnxruntime makes itself when it loads the file.
    """
    try:
        from onnxscript import optimizer
    except ImportError:
        raise UserError("ONNX export needs the onnx and onnxscript packages: pip install 'mait[export]'") from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},), optimize=False,
                                verbose=False)
    optimizer.fold_constants(program.model)
    optimizer.remove_unused_nodes(program.model)
    program.save(str(path), external_data=False)


def run_exported(path: Path, fmt: str, images: torch.Tensor) -> Optional[torch.Tensor]:
    """Logits of the exported file on ``images`` (None: ONNX without onnxruntime installed)."""
    if fmt == "pt2":
        return torch.export.load(str(path)).module()(images)
    try:
        import onnxruntime
    except ImportError:
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: images.numpy()})[0])


def graph_size(path: Path, fmt: str) -> str:
    """Operator count of the exported graph and the file size, for the summary line."""
    if fmt == "pt2":
        count = sum(node.op == "call_function" for node in torch.export.load(str(path)).graph.nodes)
    else:
        import onnx
        count = len(onnx.load(str(path), load_external_data=False).graph.node)
    return f"{count} ops, {path.stat().st_size / 2 ** 20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    from ..train.runs import checkpoint_card, load_model, run_config

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    config = run_config(args.checkpoint)
    card = checkpoint_card(args.checkpoint, config)
    model = load_model(config, card.data_info(), args.checkpoint).requires_grad_(False)
    masked = set_backend(model, args.attention)
    output = args.output or args.checkpoint.with_suffix(FORMATS[args.format])
    output.parent.mkdir(parents=True, exist_ok=True)
    shape = (card.in_chans, card.img_size, card.img_size)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(args.batch_size, *shape, generator=generator)
    check = torch.randn(args.batch_size + 1, *shape, generator=generator)   # another batch size than the example
    with torch.no_grad():
        expected = model(check)
        if args.format == "pt2":
            export_pt2(model, example, output)
        else:
            export_onnx(model, example, output)
        got = run_exported(output, args.format, check)
    backend = f"{masked} masked layers through the {args.attention} backend" if masked else "no masked layer"
    print(f"wrote {output} ({graph_size(output, args.format)}): {config.model}, input (batch, {', '.join(map(str, shape))}), "
          f"{backend}")
    if got is None:
        print("onnxruntime is not installed, so the file was not run: pip install 'mait[export]' to check it")
        return 0
    difference = (got.float() - expected).abs().max().item()
    if difference > args.atol:
        raise UserError(f"the exported {args.format} program's logits differ from PyTorch's by up to {difference:.2e} "
                        f"(allowed: {args.atol:g}); {output} is not a faithful export")
    print(f"check: max |logit difference| to PyTorch on {len(check)} random images: {difference:.2e} "
          f"(allowed {args.atol:g})")
    return 0
