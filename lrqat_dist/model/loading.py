"""Loading HF causal LMs from a local directory or building them from a config (random init)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel


def build_config(config: dict[str, Any] | str | Path | PretrainedConfig) -> PretrainedConfig:
    """A transformers config from a dict (with ``model_type``), a config.json path or directory."""
    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, dict):
        cfg = dict(config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError("model.config: needs a 'model_type' key (e.g. 'llama', 'mistral', 'qwen2')")
        return AutoConfig.for_model(model_type, **cfg)
    path = Path(config)
    if not path.exists():
        raise FileNotFoundError(f"model.config: {path} does not exist")
    return AutoConfig.from_pretrained(path)


def load_causal_lm(path: str | Path | None = None, config: dict | str | Path | PretrainedConfig | None = None,
                   dtype: torch.dtype = torch.float32, seed: int = 0,
                   attn_implementation: str = "sdpa") -> PreTrainedModel:
    """Load pretrained weights from a local HF directory (``path``) or random-init from ``config``.

    Never reaches a hub: ``path`` must be an existing local directory.
    """
    if (path is None) == (config is None):
        raise ValueError("model: give exactly one of model.path (local HF directory) or model.config (random init)")
    if path is not None:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path: {path} is not a local HF model directory (no config.json)")
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                    attn_implementation=attn_implementation)
    cfg = build_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn_implementation)
