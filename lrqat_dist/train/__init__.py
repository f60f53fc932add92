"""Training: typed YAML config, model building, optimizer/schedule, the loop, checkpoints, metrics.

    from lrqat_dist.train import load_config, train
    train(load_config("configs/tiny-cpu.yaml", overrides=["train.max_steps=10"]), resume="auto")
"""
from .build import build_model, build_tokenizer, resolve_device, resolve_dtype
from .checkpoint import checkpoint_path, list_checkpoints, read_meta, resolve_resume
from .config import JobConfig, load_config
from .loop import Builders, TrainResult, train
from .metrics import read_metrics

__all__ = ["JobConfig", "load_config", "build_model", "build_tokenizer", "resolve_device", "resolve_dtype",
           "train", "Builders", "TrainResult", "checkpoint_path", "list_checkpoints", "read_meta",
           "resolve_resume", "read_metrics"]
