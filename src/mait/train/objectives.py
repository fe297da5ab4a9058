"""The training loss of a stage: weighted terms over the student's outputs, its teacher's and its predictors'.

Terms (``losses:`` of a stage, docs/training.md):

* ``ce``: the base criterion (label smoothing / mixup targets) on the class head;
* ``hard_distillation``: DeiT's hard-label distillation, cross-entropy against the teacher's argmax;
* ``kl``: ``KL(teacher || student)`` of the class probabilities, averaged over images (the
  Sparsifiner release's logit distillation);
* ``tokens``: mean squared error between the student's and the teacher's final (normed) patch
  tokens (the release's token distillation; with token pruning over the tokens the student kept);
* ``reconstruction``: the learned heads' attention-reconstruction loss
  (:func:`mait.learned.reconstruction_loss`) against the dense teacher's attention
  (``reconstruction_target: teacher``, as released) or each layer's own dense attention
  (``self``, mait's), reduced by ``reconstruction_reduction`` (``sum`` as released, ``row_mean`` mait's).

The distillation terms act on the student's distillation head when it has one (DeiT's
distillation token), else on its class head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.beit import Beit
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from ..attention import MaskedAttention
from ..errors import UserError
from ..learned import RECONSTRUCTION_REDUCTIONS, predictors, reconstruction_loss
from ..models import mask_model
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import DataInfo
from .models import build_model

TERMS = ("ce", "hard_distillation", "kl", "tokens", "reconstruction")
TEACHER_TERMS = ("hard_distillation", "kl", "tokens")
RECONSTRUCTION_TARGETS = ("teacher", "self")


def build_criterion(config: TrainConfig, mixup_on: bool) -> nn.Module:
    """The base classification criterion (the ``ce`` term)."""
    if mixup_on:
        return SoftTargetCrossEntropy()          # mixup already smooths the targets
    if config.smoothing > 0:
        return LabelSmoothingCrossEntropy(config.smoothing)
    return nn.CrossEntropyLoss()


def build_teacher(config: TrainConfig, info: DataInfo, attention: bool = False) -> Optional[nn.Module]:
    """The frozen teacher of ``config`` (built like the student, never masked), or None without one.

    With ``attention`` (its attention maps are a reconstruction target) a timm ViT, Eva or BEiT teacher gets
    mait's attention layers without masks (:func:`mait.mask_model` with ``scheme="none"``: the
    same computation), which can hand out their attention maps.
    """
    if config.teacher is None:
        return None
    if not config.teacher_checkpoint:
        raise UserError("--teacher needs --teacher-checkpoint (a .safetensors of the trained teacher)")
    teacher_config = TrainConfig.from_dict({"model": config.teacher, "scheme": None, "mask_size": None,
                                            "model_kwargs": config.teacher_kwargs, "drop_path": 0.0, "stages": []},
                                           base=config)
    teacher = build_model(teacher_config, info)
    ckpt.load_weights(teacher, Path(config.teacher_checkpoint))
    if attention and isinstance(teacher, (VisionTransformer, Eva, Beit)) and not _mait_layers(teacher):
        mask_model(teacher, scheme="none")
    return teacher.eval().requires_grad_(False)


def _mait_layers(model: nn.Module) -> list[MaskedAttention]:
    """The model's MaskedAttention layers in forward order (none for a model mait has not masked)."""
    return [module for module in model.modules() if isinstance(module, MaskedAttention)]


class Objective(nn.Module):
    """``Σ weight · term`` over the terms of ``weights`` (see the module docs); ``forward`` returns the
    loss and the reconstruction term's value (None when it is not part of the loss)."""

    def __init__(self, weights: Mapping[str, float], criterion: nn.Module, teacher: Optional[nn.Module],
                 model: nn.Module, reconstruction_target: str = "teacher",
                 reconstruction_reduction: str = "sum") -> None:
        super().__init__()
        unknown = sorted(set(weights) - set(TERMS))
        if unknown:
            raise UserError(f"unknown loss term {unknown[0]!r}; the terms are {', '.join(TERMS)}")
        if reconstruction_target not in RECONSTRUCTION_TARGETS:
            raise UserError(f"reconstruction_target must be one of {RECONSTRUCTION_TARGETS}, got "
                            f"{reconstruction_target!r}")
        if reconstruction_reduction not in RECONSTRUCTION_REDUCTIONS:
            raise UserError(f"reconstruction_reduction must be one of {RECONSTRUCTION_REDUCTIONS}, got "
                            f"{reconstruction_reduction!r}")
        self.weights = {term: float(weight) for term, weight in weights.items() if weight}
        self.criterion, self.teacher = criterion, teacher
        self.reduction = reconstruction_reduction
        self.reconstruct = "reconstruction" in self.weights and bool(predictors(model))
        self.teacher_attention = self.reconstruct and reconstruction_target == "teacher"
        needs = [term for term in TEACHER_TERMS if term in self.weights]
        needs += ["reconstruction (reconstruction_target: teacher)"] if self.teacher_attention else []
        if needs and teacher is None:
            raise UserError(f"the loss term {needs[0]} needs a teacher (--teacher and --teacher-checkpoint)"
                            + ("; or set reconstruction_target: self (mait's: each layer's own dense attention)"
                               if self.teacher_attention else ""))
        self._tokens: Optional[torch.Tensor] = None
        self._hook = None
        if "tokens" in self.weights:
            for who, net in (("student", model), ("teacher", teacher)):
                if not isinstance(getattr(net, "norm", None), nn.Module) or not hasattr(net, "num_prefix_tokens"):
                    raise UserError(f"the tokens loss term needs a ViT-like {who} (a final norm over its tokens); "
                                    f"{type(net).__name__} has none")
            self._hook = model.norm.register_forward_hook(self._keep_tokens)
        self.pairs = self._pair_layers(model) if self.teacher_attention else []

    def _keep_tokens(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        self._tokens = output

    def close(self) -> None:
        """Stop watching the student (its final tokens); the objective of the next stage takes over."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _pair_layers(self, model: nn.Module) -> list[tuple[MaskedAttention, MaskedAttention]]:
        """(student layer with a predictor, the teacher layer at its depth) for the teacher-attention target."""
        student, teacher = _mait_layers(model), _mait_layers(self.teacher)
        if len(student) != len(teacher) or any(s.num_heads != t.num_heads or s.num_tokens != t.num_tokens
                                                for s, t in zip(student, teacher)):
            raise UserError(f"reconstruction_target: teacher needs a teacher with the student's attention layers; "
                            f"the teacher has {len(teacher)} of {teacher[0].num_heads if teacher else 0} heads, "
                            f"the student {len(student)} of {student[0].num_heads if student else 0}")
        return [(s, t) for s, t in zip(student, teacher) if s.predictor is not None]

    @torch.no_grad()
    def _teacher(self, images: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor], list[torch.Tensor]]:
        """The teacher's logits, final patch tokens (when asked) and attention of the paired layers."""
        for _, layer in self.pairs:
            layer.capture_attention = True
        try:
            if "tokens" in self.weights:
                features = self.teacher.forward_features(images)
                logits, tokens = self.teacher.forward_head(features), features[:, self.teacher.num_prefix_tokens:]
            else:
                logits, tokens = self.teacher(images), None
            attention = [layer.last_attention[:, student.learned_index, student.num_prefix_tokens:]
                         for student, layer in self.pairs]
        finally:
            for _, layer in self.pairs:
                layer.capture_attention, layer.last_attention = False, None
        return logits, tokens, attention

    def forward(self, model: nn.Module, images: torch.Tensor, outputs: Any,
                targets: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        cls_out, dist_out = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
        values: dict[str, torch.Tensor] = {}
        if "ce" in self.weights:
            values["ce"] = self.criterion(cls_out, targets)
        if self.teacher is not None and (self.teacher_attention or any(t in self.weights for t in TEACHER_TERMS)):
            logits, tokens, attention = self._teacher(images)
            if "hard_distillation" in self.weights:
                values["hard_distillation"] = F.cross_entropy(dist_out, logits.argmax(dim=1))
            if "kl" in self.weights:
                values["kl"] = F.kl_div(F.log_softmax(dist_out, dim=-1), F.log_softmax(logits.float(), dim=-1),
                                        reduction="batchmean", log_target=True)
            if "tokens" in self.weights:
                mine = self._tokens[:, model.num_prefix_tokens:]
                kept = getattr(model, "token_index", None)          # token pruning: the teacher's at the kept ones
                if kept is not None and kept.shape == mine.shape[:2]:
                    tokens = tokens.gather(1, kept[..., None].expand(-1, -1, tokens.shape[-1]))
                if mine.shape != tokens.shape:
                    raise UserError(f"the tokens loss term compares final patch tokens, but the student's are "
                                    f"{tuple(mine.shape[1:])} and the teacher's {tuple(tokens.shape[1:])}")
                values["tokens"] = F.mse_loss(mine, tokens.to(mine.dtype))
        recon = None
        if self.reconstruct:
            recon = reconstruction_loss(model, attention if self.teacher_attention else None, self.reduction)
            if recon is not None:
                values["reconstruction"] = recon
        self._tokens = None
        if not values:
            raise RuntimeError(f"no loss term of {sorted(self.weights)} applies to this step (a reconstruction loss "
                               f"needs the learned heads' predictors in phase joint or reconstruct)")
        loss = sum(self.weights[term] * value for term, value in values.items())
        return loss, recon
