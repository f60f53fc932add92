"""fp32 masters for the unquantized parameters a run trains (``quant.train_unquantized``: embeddings,
norms, lm_head), whatever dtype the base checkpoint stores them in.

A bf16/fp16 checkpoint would otherwise leave them trainable in that dtype: AdamW updates rounded
away (the reason A, B, s are fp32), and a model whose trainable parameters mix fp32 and bf16, which
FSDP2 refuses (one dtype per parameter group). Here they become fp32 Parameters; when the compute
dtype is lower, each module owning one computes in fp32 (its floating inputs cast up by a forward
pre-hook) and hands its output on in the compute dtype (a forward hook), so the activations stay in
``train.dtype`` as with a frozen model, and the gradients reach the fp32 parameters.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

_HOOKED = "_lrqat_fp32_master_hooks"


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def _owns_unquantized_trainable(module: nn.Module) -> bool:
    """A module of the base model (not one of this package's quantized layers or quantizers, which
    keep their own fp32 tensors) that directly holds a trainable floating parameter."""
    if type(module).__module__.startswith("lrqat_dist."):
        return False
    return any(p.requires_grad and p.is_floating_point() for p in module.parameters(recurse=False))


def fp32_masters_(model: nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """Make every trainable floating parameter of ``model`` fp32 (in place; tied weights stay tied) and,
    when ``compute_dtype`` is not fp32, hook the base-model modules owning unquantized trainable
    parameters so that they compute in fp32 and output ``compute_dtype``. Returns the names of the
    parameters that were cast."""
    cast = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            cast.append(name)
    if cast:
        logger.info("trainable parameters cast to fp32 masters: %d (e.g. %s)", len(cast), cast[0])
    if compute_dtype == torch.float32:
        return cast
    for module in model.modules():
        if getattr(module, _HOOKED, False) or not _owns_unquantized_trainable(module):
            continue
        module.register_forward_pre_hook(
            lambda mod, args, kwargs: (_cast(args, torch.float32),
                                       {k: _cast(v, torch.float32) for k, v in kwargs.items()}),
            with_kwargs=True)
        module.register_forward_hook(lambda mod, args, output: _cast(output, compute_dtype))
        setattr(module, _HOOKED, True)
    return cast
