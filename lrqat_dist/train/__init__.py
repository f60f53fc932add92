"""Training: typed YAML config, model building, the loop, metrics (engines, optimizer and schedule:
:mod:`lrqat_dist.engines`; checkpoints: :mod:`lrqat_dist.checkpoint`).

    from lrqat_dist.train import load_config, train
    train(load_config("configs/tiny-cpu.yaml", overrides=["train.max_steps=10"]), resume="auto")
"""
from .build import build_model, build_tokenizer
from .config import JobConfig, load_config
from .loop import Builders, TrainResult, train
from .metrics import read_metrics

__all__ = ["JobConfig", "load_config", "build_model", "build_tokenizer", "train", "Builders", "TrainResult",
           "read_metrics"]
