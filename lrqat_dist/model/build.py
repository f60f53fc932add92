"""The one way to build a prepared model: base model -> (lean) load -> seeded ``prepare`` -> cast -> no KV cache.

The trainer (``lrqat_dist.train.build.build_model``, a thin adapter from a run's config), the export
and eval side (rebuilding a run), the memory benchmark and the quickstart's RTN baseline all call
:func:`build_prepared_model`, so a model built anywhere is the model the trainer trains, bit for bit.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..methods import QATConfig
from .lean_load import LeanLoadUnsupported, lean_build, lean_loadable
from .loading import load_causal_lm
from .masters import fp32_masters_
from .patch import prepare

logger = logging.getLogger(__name__)


def build_prepared_model(quant: QATConfig, *, path: str | Path | None = None, config: Any = None,
                         init_seed: int = 0, attn_implementation: str = "sdpa",
                         device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                         lean: bool | None = None,
                         prepare_fn: Callable[[nn.Module], Any] | None = None,
                         on_converted: Callable[[nn.Module, str], None] | None = None) -> nn.Module:
    """The prepared (quantized, frozen except the method's trainable tensors) model, deterministic
    given its arguments, with ``config.use_cache = False``.

    ``path`` (a local HF directory) or ``config`` (a config dict / config.json, random init from
    ``init_seed``) names the base model: the fields of a run's ``model:`` section. The base model is
    read in its stored dtype (random init: fp32) and prepared from that, under ``torch.manual_seed(
    init_seed)`` (the adapters' random init, drawn on the CPU: the same on every rank), so the frozen
    buffers do not depend on the compute ``dtype``; afterwards the remaining frozen float parameters
    (embeddings, norms, lm_head) are cast to ``dtype``, and trainable ones (``quant.train_unquantized``)
    become fp32 masters computing in fp32 inside a ``dtype`` model (:mod:`lrqat_dist.model.masters`).

    ``lean``: ``None`` (default) builds a local safetensors directory one weight at a time
    (:func:`~lrqat_dist.model.lean_load.lean_build`; equal bit for bit, never the whole float model on
    the device or beside the result) and falls back to loading the whole model when that directory
    cannot be read tensor by tensor; a ``config`` model is random-initialised eagerly (``from_config``'s
    values). ``True`` always builds leanly (a ``config`` model then gets lean loading's per-tensor
    random init: other values, for measuring 7B-70B shapes); ``False`` never does.
    ``prepare_fn(model)`` replaces ``prepare(model, quant)`` (e.g. the plain-LoRA reference of
    ``lrqat_dist.methods.lora_reference``); it runs under the same seed, and needs the eager path.
    ``on_converted``: passed to ``prepare`` (called after each quantized linear is converted; used by
    ``dist.shard_frozen`` to shard each decoder layer as soon as it is built).
    """
    if (path is None) == (config is None):
        raise ValueError("model: give exactly one of model.path (local HF directory) or model.config (random init)")
    device = torch.device(device)
    if prepare_fn is not None and lean:
        raise ValueError("build_prepared_model: lean loading runs prepare itself; prepare_fn needs lean=False")
    if lean is None:
        lean = path is not None and prepare_fn is None and lean_loadable(path)
        fallback = True
    else:
        fallback = False
    if lean:
        try:
            model = lean_build(quant, path=path, config=config, device=device, dtype=dtype, init_seed=init_seed,
                               attn_implementation=attn_implementation, on_converted=on_converted)
            fp32_masters_(model, dtype)
            return model
        except LeanLoadUnsupported as e:
            if not fallback:
                raise
            logger.warning("lean loading not possible (%s); loading the whole model first", e)
    if path is not None:
        model = load_causal_lm(path=path, dtype="auto", attn_implementation=attn_implementation)
    else:
        model = load_causal_lm(config=config, dtype=torch.float32, seed=init_seed,
                               attn_implementation=attn_implementation)
    model.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)  # the adapters' random init (drawn on the CPU), same on every rank
        if prepare_fn is None:
            prepare(model, quant, on_converted=on_converted)
        else:
            prepare_fn(model)
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)
    fp32_masters_(model, dtype)  # train_unquantized from a bf16/fp16 checkpoint: fp32 masters
    model.config.use_cache = False
    return model
