"""``mait export``: a checkpoint as an ONNX file or a ``torch.export`` program, checked against PyTorch.

Masked layers export through plain PyTorch ops, never FlexAttention (the model is traced
on the CPU): with ``--attention auto`` (default) hard-masked heads take the exact
linear-time backend where the grid is large enough for it to pay (else the dense one),
unmasked heads ``scaled_dot_product_attention`` and soft heads the dense ``matmul`` backend; with
``--attention reference`` every masked layer is the dense masked attention.  The exported file
is run on random images (ONNX: with onnxruntime, the ``[export]`` extra) and becomes ``--output``
only when its logits match PyTorch's within ``--atol``.  The checkpoint and the output path are checked
before the export (never the checkpoint itself, an existing file only with ``--force``), and before
the ONNX packages are looked for; the file is written atomically.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..errors import UserError
from ._output import new_file

FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
EXPORT_EXTRA = 'pip install -e ".[export]" in the mait checkout'


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


def _check_onnx_exporter() -> None:
    """Stop before any work when the ONNX exporter's packages are missing."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError(f"ONNX export needs the onnx and onnxscript packages: {EXPORT_EXTRA}") from None


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """``torch.onnx.export`` (the ``torch.export``-based exporter) with a dynamic batch dimension.

    Of onnxscript's default optimisation only constant folding and dead-node removal run: they
    take seconds and halve the graph, while its pattern rewriter costs minutes per layer of the
    linear-time path (O(R²) slices each; a 24-layer 224-px MaiT takes most of an hour) for
    fusions onnxruntime makes itself when it loads the file.
    """
    from onnxscript import optimizer
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


def graph_ops(path: Path, fmt: str) -> int:
    """Operators in the exported graph: call_function nodes of a torch.export program, nodes of an ONNX graph."""
    if fmt == "pt2":
        return sum(node.op == "call_function" for node in torch.export.load(str(path)).graph.nodes)
    import onnx
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def graph_size(path: Path, fmt: str) -> str:
    """Operator count of the exported graph and the file size, for the summary line."""
    return f"{graph_ops(path, fmt)} ops, {path.stat().st_size / 2 ** 20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    from ..train.runs import open_run

    output = args.output or args.checkpoint.with_suffix(FORMATS[args.format])
    if output.resolve() == args.checkpoint.resolve():
        raise UserError(f"--output {output} is the checkpoint being exported; give another path "
                        f"(e.g. {args.checkpoint.with_suffix(FORMATS[args.format])})")
    saved = open_run(args.checkpoint)
    config = saved.config
    replaced = " (replaced the earlier file)" if output.exists() else ""
    with new_file(output, (FORMATS[args.format],), force=args.force) as written:
        if args.format == "onnx":         # what was asked is checked first, so a wrong path reads the same
            _check_onnx_exporter()        # with or without the [export] extra
        card = saved.model_card()
        model = saved.model(card.data_info()).requires_grad_(False)
        masked = set_backend(model, args.attention)
        shape = (card.in_chans, card.img_size, card.img_size)
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(args.batch_size, *shape, generator=generator)
        check = torch.randn(args.batch_size + 1, *shape, generator=generator)   # another batch size than the example
        with torch.no_grad():
            expected = model(check)
            if args.format == "pt2":
                export_pt2(model, example, written)
            else:
                export_onnx(model, example, written)
            got = run_exported(written, args.format, check)
        size = graph_size(written, args.format)
        difference = None if got is None else (got.float() - expected).abs().max().item()
        if difference is not None and difference > args.atol:
            raise UserError(f"the exported {args.format} program's logits differ from PyTorch's by up to "
                            f"{difference:.2e} (allowed: {args.atol:g}), so {output} was not written")
    backend = f"{masked} masked layers through the {args.attention} backend" if masked else "no masked layer"
    print(f"wrote {output}{replaced} ({size}): {config.model}, input (batch, {', '.join(map(str, shape))}), "
          f"{backend}")
    if difference is None:
        print(f"onnxruntime is not installed, so the file was not run; to check it: {EXPORT_EXTRA}")
    else:
        print(f"check: max |logit difference| to PyTorch on {len(check)} random images: {difference:.2e} "
              f"(allowed {args.atol:g})")
    return 0
