"""``mait flops MODEL``: parameters and GMACs in the paper's convention, per stage and per layer."""

from __future__ import annotations

import argparse

from ..cost import count_macs, whole_model_reductions
from ._model import create_model


def run(args: argparse.Namespace) -> int:
    options = {key: value for key, value in (("img_size", args.img_size), ("scheme", args.scheme),
                                             ("mask_size", args.mask_size), ("keep_rate", args.keep_rate),
                                             ("token_keep_rate", args.token_keep_rate))
               if value is not None}
    for name in args.models:
        model = create_model(name, **options)
        report = count_macs(model, name=name, mask_savings=not args.dense_masks)
        print(report.table(per_layer=not args.stages_only))
        if report.predictor and not args.dense_masks:     # learned (Sparsifiner) heads: the MHSA reduction
            print(report.mhsa_table(count_macs(model, name=name, mask_savings=False)))
        if getattr(model, "token_keep_rate", 1.0) < 1.0:      # token pruning: the whole-model reduction
            print(whole_model_reductions(model, name=name))
        print()
    return 0
