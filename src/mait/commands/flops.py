"""``mait flops MODEL``: parameters and GMACs in the paper's convention, per stage and per layer."""

from __future__ import annotations

import argparse

import timm

import mait  # noqa: F401  (registers the models)
from mait.train.engine import check_model_name
from mait.cost import count_macs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL", help="timm model names (ours or timm's)")
    parser.add_argument("--img-size", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--scheme", default=None, help="masking scheme override for MaiT models")
    parser.add_argument("--mask-size", type=int, default=None, help="mask size R override for MaiT models")
    parser.add_argument("--keep-rate", type=float, default=None,
                        help="kept fraction of keys of learned (Sparsifiner) heads (default: the model's, 0.25)")
    parser.add_argument("--stages-only", action="store_true", help="print one row per stage, not per layer")
    parser.add_argument("--dense-masks", action="store_true",
                        help="count masked heads at full cost (as the paper's Table 7 does for monolithic MaiT)")


def run(args: argparse.Namespace) -> int:
    kwargs = {key: value for key, value in (("img_size", args.img_size), ("scheme", args.scheme),
                                            ("mask_size", args.mask_size), ("keep_rate", args.keep_rate)) if value is not None}
    for name in args.models:
        check_model_name(name)
        model = timm.create_model(name, pretrained=False, **kwargs)
        report = count_macs(model, name=name, mask_savings=not args.dense_masks)
        print(report.table(per_layer=not args.stages_only))
        if report.predictor and not args.dense_masks:     # learned (Sparsifiner) heads: the MHSA reduction
            print(report.mhsa_table(count_macs(model, name=name, mask_savings=False)))
        print()
    return 0
