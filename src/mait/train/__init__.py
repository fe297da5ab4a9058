"""Training and evaluation (DeiT recipe from timm's components): ``mait train`` / ``mait eval`` as a library.

    from mait.train import TrainConfig, load_config, train
    result = train(load_config("digits", {"epochs": 10, "output": "runs/x"}))
    print(result.best_acc1, result.best_checkpoint)
"""

from .checkpoint import load_weights, save_weights
from .config import TrainConfig, load_config
from .data import CIFAR10_JPG_HOLDOUT, DataInfo, Loaders, build_loaders, open_data
from .engine import TrainResult, evaluate, summary, train
from .models import build_model

__all__ = [
    "CIFAR10_JPG_HOLDOUT", "DataInfo", "Loaders", "TrainConfig", "TrainResult", "build_loaders", "build_model",
    "evaluate", "load_config", "load_weights", "open_data", "save_weights", "summary", "train",
]
