"""Every command's options, declared with argparse alone (no torch, no timm, no mait).

A value argparse can check by itself (a count below 1, an even mask size, a fraction above 1)
is rejected here, as one line, before anything is imported; what needs the model or the data
(a mask larger than the model's grid, an image size below its patch size) is checked by the
command.  ``--device`` is a plain string everywhere: ``mait.train.distributed.setup`` checks it
for every command alike.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from .config_keys import config_keys


# ---------------------------------------------------------------------------- value types
def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def at_least(minimum: int) -> Callable[[str], int]:
    """An int option that must be ``minimum`` or more (1: a count of things, 0: a count that may be none)."""
    def parse(text: str) -> int:
        value = _number(text, int, "a whole number")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def mask_size(text: str) -> int:
    """R of an R x R window: odd and positive, so that the window is centred on its patch."""
    value = _number(text, int, "an odd whole number")
    if value < 1 or value % 2 == 0:
        raise argparse.ArgumentTypeError(f"must be an odd positive number (1, 3, 5, ...), got {value}")
    return value


def fraction(text: str) -> float:
    """A float in [0, 1]."""
    value = _number(text, float, "a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value:g}")
    return value


def non_negative(text: str) -> float:
    value = _number(text, float, "a number")
    if not value >= 0.0:                       # also rejects nan
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value:g}")
    return value


def grid(text: str) -> tuple[int, int]:
    """A patch grid, ``N`` or ``HxW`` with positive ints."""
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.strip().isdigit() and int(p) > 0 for p in parts):
        h, w = (int(p) for p in (parts * 2)[:2])
        return h, w
    raise argparse.ArgumentTypeError(f"expected N or HxW with positive whole numbers (e.g. 14 or 7x10), got {text!r}")


# ---------------------------------------------------------------------------- shared groups
def config_options(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One ``--key VALUE`` option per ``TrainConfig`` field (switches also get ``--no-key``); the values stay
    strings here and are converted and checked when the config is built."""
    group = parser.add_argument_group("config keys (override the --config file; see docs/training.md)")
    for key in config_keys():
        if key.name in skip:
            continue
        flag = "--" + key.name.replace("_", "-")
        text = (f"{key.comment} " if key.comment else "") + f"(default: {key.default})"
        text = text.replace("%", "%%")
        if key.is_switch:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, default=None, metavar="VALUE", help=text)


def model_options(parser: argparse.ArgumentParser, data: bool = True) -> None:
    """The ``--checkpoint/--model/--scheme/--mask-size`` (and ``--data``) options of the analysis commands."""
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="weights (.safetensors) written by `mait train`; it records its model "
                             "(a config.yaml beside it takes precedence)")
    parser.add_argument("--model", default=None, help="timm model name (default: the checkpoint's)")
    parser.add_argument("--scheme", default=None, help="masking scheme (default: the checkpoint's / the model's)")
    parser.add_argument("--mask-size", type=mask_size, default=None,
                        help="the model's mask size R (default: the checkpoint's)")
    parser.add_argument("--img-size", type=at_least(1), default=None,
                        help="image size the model is built for (default: the checkpoint's)")
    parser.add_argument("--model-kwargs", default=None, metavar="YAML",
                        help="extra timm.create_model kwargs as a YAML mapping, e.g. '{depth: 6}' (default: the run's)")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for tables and figures (default: <run folder>/analysis, else ./analysis)")
    if data:
        parser.add_argument("--data", default=None,
                            help="images: 'digits', an ImageFolder tree or CIFAR (default: the run's); "
                                 "the validation split is used")
        parser.add_argument("--holdout-per-class", type=at_least(0), default=None,
                            help="validation = last N images per class of train/ (default: the run's)")
        parser.add_argument("--max-images", type=at_least(0), default=256,
                            help="held-out images to average over (0 = all)")
        parser.add_argument("--batch-size", type=at_least(1), default=64)


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when this torch sees a GPU, else the CPU), cpu or cuda (default: auto)")


# ---------------------------------------------------------------------------- commands
def demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="mait_t24_224", help="timm model name (default: mait_t24_224)")
    parser.add_argument("--scheme", default=None, help="masking scheme name or text (default: the model's)")
    parser.add_argument("--mask-size", type=mask_size, default=None, help="odd mask size R (default: the model's, 3)")
    parser.add_argument("--batch-size", type=at_least(1), default=2)


def train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML",
                        help="a YAML file, or the name of a preset shipped with mait (digits, cifar10, cifar100, "
                             "mait_t24, ...; see docs/training.md)")
    parser.add_argument("--resume", metavar="DIR",
                        help="continue the run saved in DIR exactly where it stopped (its config.yaml is the base)")
    config_options(parser)


def eval_(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="weights (.safetensors) written by `mait train`; they record their model, scheme and "
                             "data (a config.yaml beside them takes precedence)")
    parser.add_argument("--config", metavar="YAML", help="config file (default: config.yaml beside the checkpoint)")
    config_options(parser)


def predict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help="image files, or folders searched recursively for images")
    parser.add_argument("--checkpoint", required=True, type=Path, metavar="FILE",
                        help="weights (.safetensors) written by `mait train`; they record the model and its input")
    parser.add_argument("--top-k", type=at_least(1), default=5, help="classes shown per image (default: 5)")
    parser.add_argument("--batch-size", type=at_least(1), default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--json", action="store_true", help="print JSON (one object per image) instead of a table")
    parser.add_argument("--quiet", action="store_true",
                        help="no note on stderr when an image is resized or converted to the model's input")
    _device_option(parser)


def export(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, type=Path, metavar="FILE",
                        help="weights (.safetensors) written by `mait train`; they record the model and its input")
    parser.add_argument("--format", required=True, choices=("onnx", "pt2"),
                        help="onnx (torch.onnx) or pt2 (torch.export)")
    parser.add_argument("--output", type=Path, default=None,
                        help="file to write, ending in .onnx / .pt2 (default: the checkpoint's name with that suffix)")
    parser.add_argument("--force", action="store_true",
                        help="replace a file that exists at the output path (never the checkpoint itself)")
    parser.add_argument("--attention", choices=("auto", "reference"), default="auto",
                        help="masked layers in the graph: auto (hard heads linear-time where the grid is large "
                             "enough; default) or reference (dense)")
    parser.add_argument("--batch-size", type=at_least(1), default=2,
                        help="batch of the example input and the check (default 2)")
    parser.add_argument("--atol", type=non_negative, default=1e-4,
                        help="largest allowed |logit difference| to PyTorch in the check (default 1e-4)")


def als(parser: argparse.ArgumentParser) -> None:
    model_options(parser)
    parser.add_argument("--window", type=mask_size, default=None,
                        help="R of the neighbourhood the ALS counts (default: each layer's mask size, 3 for plain "
                             "models)")


def similarity(parser: argparse.ArgumentParser) -> None:
    model_options(parser)
    parser.add_argument("--last", type=at_least(2), default=8,
                        help="report the mean similarity among the last K layers (paper: 8; capped at the depth)")


def alphas(parser: argparse.ArgumentParser) -> None:
    model_options(parser, data=False)
    parser.add_argument("--threshold", type=fraction, default=0.5,
                        help="harden: soft heads with α below it become hard-masked, the others unmasked "
                             "(default 0.5)")


def search(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="training config (default: the built-in digits job); "
                        "its epochs are the budget of each search step, its output the search folder")
    group = parser.add_argument_group("search")
    group.add_argument("--high", type=fraction, default=0.65, help="head-0 ALS above it: mask all heads (default 0.65)")
    group.add_argument("--low", type=fraction, default=0.35,
                       help="head-0 ALS below it: remove the mask; calibration unmasks heads below it (default 0.35)")
    group.add_argument("--calibration", choices=("retrain", "initial"), default="retrain",
                       help="per-head ALS for calibration from a run trained with the assigned scheme (retrain, "
                            "the paper's second iteration) or from the Sch.1 run (initial, one training less)")
    group.add_argument("--retrain-epochs", type=at_least(0), default=0,
                       help="train the searched scheme once more for N epochs and report its accuracy (0 = skip)")
    group.add_argument("--resume", action="store_true",
                       help="continue the interrupted search in --output (give the same options again)")
    group.add_argument("--als-images", type=at_least(0), default=512,
                       help="held-out images for each ALS table (0 = all)")
    config_options(parser, skip=("scheme",))


def show_mask(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grid", type=grid, default=(14, 14),
                        help="patch grid, N or HxW (default: 14, DeiT at 224 px)")
    parser.add_argument("--mask-size", type=mask_size, default=3,
                        help="odd mask size R, at most 2·max(H, W) - 1 (default: 3)")
    parser.add_argument("--token", type=at_least(0), default=16,
                        help="patch index in the grid, row-major from 0, prefix tokens not counted (default: 16)")
    parser.add_argument("--alpha", type=fraction, default=0.0,
                        help="the head's α: 0 hard mask (default), between 0 and 1 soft mask")
    parser.add_argument("--random", action="store_true", help="show the random-mask control (§5.6) instead")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mask (with --random)")
    parser.add_argument("--output", type=Path, default=None,
                        help="PNG file to write (default: mask_<H>x<W>_r<R>_p<token>.png in the current folder; "
                             "with --checkpoint: <run>/analysis/learned_mask_l<layer>_q<query>.png)")
    learned = parser.add_argument_group("learned masks (a trained model with 'l' heads)")
    learned.add_argument("--checkpoint", type=Path, default=None,
                         help="weights written by `mait train` (config.yaml beside)")
    learned.add_argument("--image", type=Path, default=None,
                         help="image file (default: the first held-out image of the run's data)")
    learned.add_argument("--layer", type=at_least(0), default=0,
                         help="learned layer, 0-based among layers with 'l' heads")
    learned.add_argument("--query", type=at_least(0), default=None,
                         help="query patch, row-major from 0 (default: the centre)")


def flops(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL", help="timm model names (ours or timm's)")
    parser.add_argument("--img-size", type=at_least(1), default=None, help="image size (default: the model's)")
    parser.add_argument("--scheme", default=None,
                        help="masking scheme: overrides a MaiT model's, masks a timm ViT/Eva/BEiT/CaiT")
    parser.add_argument("--mask-size", type=mask_size, default=None, help="mask size R override for MaiT models")
    parser.add_argument("--keep-rate", type=fraction, default=None,
                        help="kept fraction of keys of learned (Sparsifiner) heads (default: the model's, 0.25)")
    parser.add_argument("--token-keep-rate", type=fraction, default=None,
                        help="token pruning: fraction of patch tokens each prune layer keeps (MaiT, Sparsifiner and "
                             "timm ViT/Eva/BEiT/CaiT models, heads unmasked unless --scheme; default 1.0, none)")
    parser.add_argument("--stages-only", action="store_true", help="print one row per stage, not per layer")
    parser.add_argument("--dense-masks", action="store_true",
                        help="count masked heads at full cost (as the paper's Table 7 does for monolithic MaiT)")


def bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", metavar="SPEC",
                        help="timm model names, optionally with kwargs: mait_t24_224:scheme=sch1,mask_size=5")
    parser.add_argument("--baseline", default=None, help="model spec the ratios refer to (default: the first)")
    parser.add_argument("--batch-size", type=at_least(1), default=None,
                        help="batch size (default: 64 models, 4 attention)")
    parser.add_argument("--img-size", type=at_least(1), default=None, help="image size (default: the model's)")
    parser.add_argument("--train", action="store_true", help="time a training step (forward + backward)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="autocast to --dtype (default: on for CUDA, off on the CPU)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16",
                        help="autocast dtype with --amp (default: bfloat16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model before timing")
    parser.add_argument("--attention", action="store_true", help="benchmark the attention op alone")
    parser.add_argument("--grids", nargs="+", type=at_least(1), default=[7, 14, 28, 56, 112],
                        help="square grid sizes")
    parser.add_argument("--mask-size", type=mask_size, default=3)
    parser.add_argument("--heads", type=at_least(1), default=3)
    parser.add_argument("--head-dim", type=at_least(1), default=32)
    parser.add_argument("--prefix", type=at_least(0), default=1, help="prefix tokens (class token)")
    parser.add_argument("--max-dense-gib", type=non_negative, default=6.0,
                        help="skip dense masked attention when its score tensors would exceed this (GiB)")
    parser.add_argument("--no-memory", action="store_true", help="do not measure peak memory (attention)")
    parser.add_argument("--warmup", type=at_least(0), default=2)
    parser.add_argument("--repeats", type=at_least(1), default=5)
    parser.add_argument("--threads", type=at_least(1), default=None, help="torch.set_num_threads (default: torch's)")
    _device_option(parser)
    parser.add_argument("--out", default=None, help="path prefix of the .json/.csv/.png results (default: none)")


# name -> (one-line help, the function declaring its options).  mait.commands.<name with _ for -> runs it.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "demo": ("build a MaiT model, run a sample batch and print its per-layer masking", demo),
    "train": ("train a model (default: MaiT on the built-in digits, no download); DeiT recipe, torchrun-ready", train),
    "eval": ("evaluate a checkpoint: top-1, top-5, loss and images/s", eval_),
    "predict": ("top-k classes with names and probabilities of image files under a checkpoint", predict),
    "export": ("export a checkpoint to ONNX or a torch.export program, checked against PyTorch", export),
    "als": ("Attention Locality Score per layer and head of a model on held-out images (table + heatmap)", als),
    "similarity": ("cross-layer similarity of attention maps, one L x L heatmap per head (paper Fig. 4-6)",
                   similarity),
    "alphas": ("learned soft-mask α per layer and head, heatmap, and the hardened scheme", alphas),
    "search": ("quick empirical mask search (paper §4.3): Sch.1, ALS, assign, calibrate, optionally retrain", search),
    "show-mask": ("draw which patches one patch token attends to at full strength (paper Fig. 1)", show_mask),
    "flops": ("parameters and GMACs of models in the paper's convention, per stage and per layer", flops),
    "bench": ("throughput of whole models (ours vs DeiT/CaiT/Swin) or of the attention op alone (--attention)",
              bench),
}
