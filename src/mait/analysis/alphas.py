"""Soft-mask read-out (paper §4.3 "Soft Masking") and hardening a soft scheme into a hard one.

A soft head learns ``α = sigmoid(alpha_logit)`` in (0, 1): near 0 it behaves like a hard
mask (locality), near 1 like an unmasked head.  :func:`harden` turns the learned α into a
hard scheme that can be trained or deployed with the efficient hard-mask kernels.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from ..attention import MaskedAttention
from ..schemes import HeadKind, MaskingScheme


def masked_layers(model: nn.Module) -> list[MaskedAttention]:
    """The model's :class:`~mait.MaskedAttention` layers in registration (forward) order."""
    layers = [m for m in model.modules() if isinstance(m, MaskedAttention)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no mait MaskedAttention layer (is it a mait model?)")
    return layers


def read_alphas(model: nn.Module) -> list[torch.Tensor]:
    """α of every head of every masked-attention layer: a list over layers of ``(heads,)``.

    0 = hard (or random-control) head, 1 = unmasked head, in between = learned soft α.
    """
    return [layer.alpha.detach().float().cpu() for layer in masked_layers(model)]


def model_scheme(model: nn.Module) -> MaskingScheme:
    """The scheme a model's masked layers implement (their ``head_kinds``)."""
    return MaskingScheme.from_kinds([layer.head_kinds for layer in masked_layers(model)])


def harden(source: Union[nn.Module, MaskingScheme], threshold: float = 0.5,
           alphas: Optional[Sequence[Sequence[float]]] = None) -> MaskingScheme:
    """Turn every soft head into a hard-masked head (α < ``threshold``) or an unmasked one (α >= ``threshold``).

    ``source`` is a mait model (its scheme and learned α are read from it) or a
    :class:`~mait.MaskingScheme` together with ``alphas`` (one α per head per layer, e.g.
    from :func:`read_alphas`).  Hard, random and unmasked heads keep their kind.  Print the
    result with ``str()`` to get text usable as ``--scheme``.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1], got {threshold!r}")
    if isinstance(source, nn.Module):
        if alphas is not None:
            raise ValueError("pass alphas only with a MaskingScheme; a model's α are read from the model")
        scheme, alphas = model_scheme(source), [a.tolist() for a in read_alphas(source)]
    elif isinstance(source, MaskingScheme):
        scheme = source
        if alphas is None:
            raise ValueError("harden(scheme) needs alphas: one α per head per layer (see read_alphas)")
    else:
        raise TypeError(f"harden expects a mait model or a MaskingScheme, got {type(source).__name__}")
    alpha_heads = tuple(len(a) for a in alphas)
    if alpha_heads != scheme.num_heads:
        raise ValueError(f"alphas give {alpha_heads} heads per layer but the scheme has {scheme.num_heads}")
    layers = []
    for kinds, layer_alphas in zip(scheme.layers, alphas):
        layers.append(tuple(
            (HeadKind.HARD if float(a) < threshold else HeadKind.NONE) if kind is HeadKind.SOFT else kind
            for kind, a in zip(kinds, layer_alphas)))
    return MaskingScheme(tuple(layers))
