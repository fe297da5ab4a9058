"""Cost accounting in the paper's convention: multiply-accumulates (MACs, the paper's "FLOPs").

Dense layers cost their matrix products (``nn.Linear``: tokens x in x out, ``nn.Conv2d``:
outputs x in/groups x kernel area).  Attention maps follow paper Table 1: ``q kᵀ`` and
``A v`` cost ``2·N²·D`` for full attention, ``2·M²·N·D`` for Swin windows of ``M x M`` and
``2·R²·N·D`` for a masked head (a row attends to ``R²`` neighbours plus the prefix tokens;
prefix rows are dense).  Soft-masked heads need every logit, so they count as full heads;
so do masked talking-heads layers (CaiT mixes heads before the softmax).  A learned
(Sparsifiner) head costs its kept pairs, ``2·d·(P·T + (T-P)·k)``, plus its connectivity
predictor (counted apart: ``predictor`` densely, :func:`predictor_macs`; ``predictor_sparse``
with the sparse basis's actual nonzeros, :func:`sparse_predictor_macs`).  Norms,
activations, softmax and top-k are not counted, as in the paper and fvcore.  With token pruning
(:mod:`mait.tokens`) every layer is counted on the tokens it gets, so the dropped tokens cost
nothing after their prune layer; the class-attention row that scores the tokens is part of the
layer's attention map.

:func:`count_macs` runs one forward pass with hooks and reports MACs per layer and per
stage; :func:`block_macs` is the closed form for one transformer block.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import AttentionRope
from timm.models.beit import Attention as BeitAttention
from timm.models.cait import ClassAttn, TalkingHeadAttn
from timm.models.eva import EvaAttention
from timm.models.swin_transformer import WindowAttention
from timm.models.vision_transformer import Attention

from .attention import MaskedAttention
from .learned import ConnectivityPredictor
from .models.cait import MaskedTalkingHeadAttn
from .schemes import HeadKind


def attention_map_macs(tokens: int, dim: int, *, num_heads: int = 1, masked_heads: int = 0, mask_size: int = 3,
                       num_prefix_tokens: int = 0) -> int:
    """MACs of ``q kᵀ`` and ``A v`` for one image (paper Table 1), ``masked_heads`` of ``num_heads`` masked."""
    head_dim = dim // num_heads
    patches = tokens - num_prefix_tokens
    full = 2 * tokens * tokens * head_dim
    masked = 2 * head_dim * (patches * (mask_size * mask_size + num_prefix_tokens) + num_prefix_tokens * tokens)
    return (num_heads - masked_heads) * full + masked_heads * masked


def learned_map_macs(tokens: int, head_dim: int, kept: int, num_prefix_tokens: int) -> int:
    """MACs of ``q kᵀ`` and ``A v`` of one learned head for one image: ``2·d·(P·T + (T-P)·k)`` kept pairs."""
    return 2 * head_dim * (num_prefix_tokens * tokens + (tokens - num_prefix_tokens) * kept)


def _predictor_products(predictor: ConnectivityPredictor, head_dim: int,
                        tokens: Optional[int] = None) -> tuple[int, int]:
    """MACs of one head's predictor for one image on ``tokens`` (default: all it was built for; fewer after
    token pruning): ``(everything before the map, the dense map)``."""
    tokens, prefix = tokens or predictor.num_tokens, predictor.num_prefix_tokens
    reduced, basis = predictor.proj_c_q.out_features, predictor.num_basis
    rows = tokens - prefix
    before = (rows + tokens) * head_dim * reduced + reduced * tokens * basis + rows * reduced * basis
    return before, rows * basis * tokens


def predictor_macs(predictor: ConnectivityPredictor, head_dim: int, tokens: Optional[int] = None) -> int:
    """MACs of one head's connectivity predictor for one image (on ``tokens``), every product dense.

    ``proj_c`` on the patch queries and on every key (``d -> c``), ``k_c`` onto the ``n``
    basis tokens (``c·T·n``), the coefficients (``(T-P)·c·n``) and the map from the basis
    (``(T-P)·n·T``).
    """
    return sum(_predictor_products(predictor, head_dim, tokens))


def sparse_predictor_macs(predictor: ConnectivityPredictor, q: torch.Tensor, k: torch.Tensor,
                          positions: Optional[torch.Tensor] = None) -> float:
    """MACs of the predictor's call on ``q, k`` ``(B, heads, T, d)`` (all images and heads) as it decides masks.

    With the sparse basis, the map multiplies only nonzeros: per patch query, the basis rows of its
    ``coef_topk`` kept coefficients, each with its entries above ``basis_threshold`` (counted on
    this input; after token pruning only the columns of the tokens present, ``positions``); the
    products before the map stay dense.  Without it, :func:`predictor_macs`.
    """
    batch, heads, tokens, head_dim = q.shape
    before, dense_map = _predictor_products(predictor, head_dim, tokens)
    if not predictor.sparse_basis:
        return float(batch * heads * (before + dense_map))
    kept = predictor.pruned_coefficients(predictor.coefficients(q, k, positions)) != 0    # (B, h, T'-P, n)
    basis = predictor.pruned_basis() != 0                                                   # (n, T)
    nonzeros = basis.sum(-1) if positions is None else basis[:, positions].sum(-1).t()[:, None, None]   # (B,1,1,n)
    return float(batch * heads * before + (kept.double() * nonzeros.double()).sum().item())


def block_macs(tokens: int, dim: int, *, mlp_ratio: float = 4.0, **attention: int) -> tuple[int, int]:
    """``(total, attention map)`` MACs of one pre-norm transformer block for one image.

    ``attention`` is passed to :func:`attention_map_macs` (``num_heads``, ``masked_heads``, ...).
    """
    linear = tokens * dim * dim * (4 + 2 * mlp_ratio)     # qkv (3), proj (1), MLP (2 x ratio)
    attn_map = attention_map_macs(tokens, dim, **attention)
    return int(linear + attn_map), attn_map


# ---------------------------------------------------------------------- hooks per module type
def _masked(module: MaskedAttention, x: torch.Tensor) -> int:
    if isinstance(module, MaskedTalkingHeadAttn):
        return attention_map_macs(x.shape[1], x.shape[2])
    masked = sum(kind in (HeadKind.HARD, HeadKind.RANDOM) for kind in module.head_kinds)
    learned = sum(kind is HeadKind.LEARNED for kind in module.head_kinds)
    fixed = attention_map_macs(x.shape[1], x.shape[2], num_heads=module.num_heads, masked_heads=masked,
                               mask_size=module.mask_size, num_prefix_tokens=module.num_prefix_tokens)
    if not learned:
        return fixed
    head_dim = x.shape[2] // module.num_heads
    dense_head = 2 * x.shape[1] * x.shape[1] * head_dim
    return fixed - learned * dense_head + learned * learned_map_macs(
        x.shape[1], head_dim, module.predictor.kept_for(x.shape[1]), module.num_prefix_tokens)


def _full(module: nn.Module, x: torch.Tensor) -> int:
    return attention_map_macs(x.shape[1], x.shape[2])


def _windows(module: nn.Module, x: torch.Tensor) -> int:
    # x is (windows, M², C) for the one image count_macs feeds.
    return x.shape[0] * attention_map_macs(x.shape[1], x.shape[2])


def _class_attention(module: nn.Module, x: torch.Tensor) -> int:
    return 2 * x.shape[1] * x.shape[2]       # one query row (the class token) against every token


def _counters(mask_savings: bool) -> list[tuple[type, Callable[[nn.Module, torch.Tensor], int]]]:
    """Attention-map counters per module type; order matters (subclasses first)."""
    return [(MaskedAttention, _masked if mask_savings else _full), (TalkingHeadAttn, _full), (Attention, _full),
            (EvaAttention, _full), (AttentionRope, _full), (BeitAttention, _full), (WindowAttention, _windows),
            (ClassAttn, _class_attention)]


@dataclass
class LayerCost:
    """MACs of one layer (a block, the patch embedding, a downsampling layer or the head), per image."""

    name: str
    stage: str
    params: int = 0
    dense: int = 0            # linear and convolution MACs
    attention_map: int = 0    # q kᵀ and A v MACs
    predictor: int = 0        # learned-mask connectivity predictors (Sparsifiner), every product dense
    predictor_sparse: float = 0.0   # the same with the sparse basis's actual nonzeros (mean over the images)

    @property
    def macs(self) -> int:
        return self.dense + self.attention_map + self.predictor

    @property
    def mhsa(self) -> int:
        """The MHSA cost Sparsifiner reports: attention maps plus connectivity predictor."""
        return self.attention_map + self.predictor

    @property
    def mhsa_sparse(self) -> float:
        """Attention maps plus the connectivity predictor counted with its sparse basis's nonzeros."""
        return self.attention_map + self.predictor_sparse


@dataclass
class CostReport:
    """Per-layer MACs of a model for one image; ``stages()`` sums them per stage."""

    model: str
    input_size: tuple[int, ...]
    layers: list[LayerCost] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def attention_map(self) -> int:
        return sum(layer.attention_map for layer in self.layers)

    @property
    def predictor(self) -> int:
        return sum(layer.predictor for layer in self.layers)

    @property
    def predictor_sparse(self) -> float:
        return sum(layer.predictor_sparse for layer in self.layers)

    @property
    def mhsa(self) -> int:
        """Attention maps plus connectivity predictors (the MHSA cost Sparsifiner reports)."""
        return self.attention_map + self.predictor

    @property
    def mhsa_sparse(self) -> float:
        """Attention maps plus connectivity predictors counted with their sparse basis's nonzeros."""
        return self.attention_map + self.predictor_sparse

    @property
    def macs_sparse(self) -> float:
        """Whole-model MACs with the connectivity predictors counted by their sparse basis's nonzeros."""
        return self.macs - self.predictor + self.predictor_sparse

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def stages(self) -> list[LayerCost]:
        totals: dict[str, LayerCost] = {}
        for layer in self.layers:
            total = totals.setdefault(layer.stage, LayerCost(layer.stage, layer.stage))
            total.params += layer.params
            total.dense += layer.dense
            total.attention_map += layer.attention_map
            total.predictor += layer.predictor
            total.predictor_sparse += layer.predictor_sparse
        return list(totals.values())

    def table(self, per_layer: bool = True) -> str:
        """A plain-text table: params (M), GMACs, attention-map GMACs and share, per stage (and layer)."""
        lines = [f"{self.model} @ {'x'.join(map(str, self.input_size))}: {self.params / 1e6:.2f} M params, "
                 f"{self.macs / 1e9:.3f} GMACs ({self.attention_map / 1e9:.3f} G in attention maps, "
                 f"{100 * self.attention_map / max(self.macs, 1):.1f} %)",
                 f"{'layer':<28}{'params (M)':>12}{'GMACs':>10}{'attn map G':>12}{'attn %':>8}"]

        def row(item: LayerCost, indent: str) -> str:
            share = 100 * item.attention_map / max(item.macs, 1)
            return (f"{indent + item.name:<28}{item.params / 1e6:>12.3f}{item.macs / 1e9:>10.4f}"
                    f"{item.attention_map / 1e9:>12.4f}{share:>8.1f}")

        for stage in self.stages():
            lines.append(row(stage, ""))
            members = [layer for layer in self.layers if layer.stage == stage.name]
            if per_layer and len(members) > 1:
                lines.extend(row(layer, "  ") for layer in members)
        return "\n".join(lines)


    def mhsa_table(self, dense: "CostReport") -> str:
        """Per-layer MHSA MACs (attention maps + predictor) against ``dense`` (the same model, every head full),
        the predictor counted densely and with its sparse basis's nonzeros."""
        lines = ["MHSA (attention maps + connectivity predictor) against full attention, per image:",
                 f"{'layer':<28}{'full MMACs':>12}{'kept MMACs':>12}{'pred MMACs':>12}{'reduction':>11}"
                 f"{'pruned pred':>13}{'reduction':>11}"]
        full = {layer.name: layer for layer in dense.layers}
        for layer in self.layers + [LayerCost("total", "", attention_map=self.attention_map,
                                              predictor=self.predictor, predictor_sparse=self.predictor_sparse)]:
            base = full[layer.name].attention_map if layer.name in full else dense.attention_map
            if not base:
                continue
            lines.append(f"{layer.name:<28}{base / 1e6:>12.3f}{layer.attention_map / 1e6:>12.3f}"
                         f"{layer.predictor / 1e6:>12.3f}{100 * (1 - layer.mhsa / base):>10.1f}%"
                         f"{layer.predictor_sparse / 1e6:>13.3f}{100 * (1 - layer.mhsa_sparse / base):>10.1f}%")
        return "\n".join(lines)


def whole_model_reductions(model: nn.Module, name: str = "") -> str:
    """Whole-model MACs of a token-pruned model against the same model unpruned and against its dense backbone
    (every head full, no predictor), the predictor counted densely and by its pruned nonzeros: a few lines for
    ``mait flops``."""
    rate, layers = model.token_keep_rate, model.token_prune_layers
    pruned = count_macs(model, name=name)
    model.set_token_pruning(1.0, layers)
    try:
        unpruned, full = count_macs(model, name=name), count_macs(model, name=name, mask_savings=False)
    finally:
        model.set_token_pruning(rate, layers)
    dense = full.macs - full.predictor
    rows = [("model", pruned.macs, unpruned.macs)]
    if pruned.predictor:
        rows = [("predictor counted densely", pruned.macs, unpruned.macs),
                ("predictor by its nonzeros", pruned.macs_sparse, unpruned.macs_sparse)]
    lines = [f"whole model with token pruning (token_keep_rate {rate:g} after blocks {', '.join(map(str, layers))}) "
             f"against the same model unpruned ({unpruned.macs / 1e9:.3f} GMACs) and its dense backbone "
             f"({dense / 1e9:.3f} GMACs), per image:",
             f"{'':<28}{'GMACs':>10}{'unpruned':>10}{'vs unpruned':>13}{'vs dense':>10}"]
    lines += [f"{label:<28}{macs / 1e9:>10.3f}{base / 1e9:>10.3f}{100 * (macs / base - 1):>12.1f}%"
              f"{100 * (macs / dense - 1):>9.1f}%" for label, macs, base in rows]
    return "\n".join(lines)


_BLOCK = re.compile(r"^(?P<stage>(?:.*\.)?(?:blocks|blocks_token_only))\.(?P<index>\d+)(?:\.|$)")
_STAGE = re.compile(r"^(?P<stage>(?:layers|stages)\.\d+)(?:\.|$)")


def _layer_of(name: str) -> tuple[str, str]:
    """``(layer, stage)`` names of a sub-module: the enclosing block, else its top-level module."""
    block = _BLOCK.match(name)
    stage = _STAGE.match(name)
    if block:
        stage_name = stage.group("stage") if stage else block.group("stage")
        return f"{block.group('stage')}.{block.group('index')}", stage_name
    if stage:
        rest = name[len(stage.group("stage")):].lstrip(".").split(".")[0]
        return f"{stage.group('stage')}.{rest}" if rest else stage.group("stage"), stage.group("stage")
    top = name.split(".")[0] or "(root)"
    return top, top


def count_macs(model: nn.Module, input_size: Optional[Sequence[int]] = None, name: str = "",
               mask_savings: bool = True, images: Optional[torch.Tensor] = None) -> CostReport:
    """Count MACs per layer for one image of ``input_size`` ``(C, H, W)`` (default: the size it was built for).

    ``mask_savings=False`` counts masked heads as dense (what the paper's Table 7 does for
    monolithic MaiT: 5.3 G for MaiT-XS, 9.1 G for MaiT-S).  The sparse predictor count
    depends on the input: it is taken on an all-zero image, or averaged over ``images``
    ``(B, C, H, W)`` when given.
    """
    counters = _counters(mask_savings)
    if images is not None:
        input_size = tuple(images.shape[1:])
    if input_size is None:
        input_size = tuple(getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224)))
        built_for = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if built_for is not None:
            input_size = (input_size[0], *built_for)
    report = CostReport(name or type(model).__name__, tuple(input_size))
    layers: dict[str, LayerCost] = {}

    def layer(module_name: str) -> LayerCost:
        layer_name, stage = _layer_of(module_name)
        if layer_name not in layers:
            layers[layer_name] = LayerCost(layer_name, stage)
        return layers[layer_name]

    def hook_for(module_name: str, module: nn.Module) -> Optional[Callable]:
        if isinstance(module, ConnectivityPredictor):
            def predictor(mod, inputs, output):
                batch, heads, tokens, head_dim = inputs[0].shape
                layer(module_name).predictor += batch * heads * predictor_macs(mod, head_dim, tokens)
                layer(module_name).predictor_sparse += sparse_predictor_macs(mod, *inputs[:3])
            return predictor
        if ".predictor." in f"{module_name}.":        # its linear maps are in predictor_macs
            return None
        if isinstance(module, nn.Linear):
            def linear(mod, inputs, output):
                layer(module_name).dense += output.numel() // output.shape[-1] * mod.in_features * mod.out_features
            return linear
        if isinstance(module, nn.Conv2d):
            def conv(mod, inputs, output):
                kernel = mod.kernel_size[0] * mod.kernel_size[1]
                layer(module_name).dense += output.numel() * mod.in_channels // mod.groups * kernel
            return conv
        for kind, counter in counters:
            if isinstance(module, kind):
                def attention(mod, inputs, output, counter=counter):
                    layer(module_name).attention_map += counter(mod, inputs[0])
                return attention
        return None

    handles = []
    for module_name, module in model.named_modules():
        hook = hook_for(module_name, module)
        if hook is not None:
            handles.append(module.register_forward_hook(hook))
        for param_name, param in module.named_parameters(recurse=False):
            layer(f"{module_name}.{param_name}" if module_name else param_name).params += param.numel()
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, *input_size))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if images is not None:
        _average_sparse_predictor(model, images, layer)
    order = {n: i for i, n in enumerate(layers)}
    report.layers = sorted(layers.values(), key=lambda item: order[item.name])
    return report


def _average_sparse_predictor(model: nn.Module, images: torch.Tensor, layer: Callable[[str], LayerCost]) -> None:
    """Replace each layer's sparse predictor count by its mean over ``images``."""
    totals: dict[str, float] = {}
    handles = []
    for module_name, module in model.named_modules():
        if isinstance(module, ConnectivityPredictor):
            def collect(mod, inputs, output, module_name=module_name):
                totals[module_name] = totals.get(module_name, 0.0) + sparse_predictor_macs(mod, *inputs[:3])
            handles.append(module.register_forward_hook(collect))
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(images)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    for module_name, total in totals.items():
        layer(module_name).predictor_sparse = total / len(images)
