"""Placing activation fake-quantizers in an HF model without touching its forward code.

- **Linear inputs**: each target linear gets an ``input_quantizer`` child module and a forward
  pre-hook that quantizes its input. This covers the inputs after the norms (q/k/v, gate/up), the
  attention output (o_proj) and the MLP's inner activation (down_proj).
- **Queries, keys, values after RoPE**: the attention module gets an ``act_quant``
  (:class:`AttentionActQuant`) child, and the model's attention implementation is switched to a
  registered wrapper (``lrqat_actq_sdpa`` / ``lrqat_actq_eager``) that quantizes ``query``,
  ``key``, ``value`` and then calls the original ``sdpa`` / eager function. HF models call the
  attention function through ``ALL_ATTENTION_FUNCTIONS`` with the post-RoPE (and post-cache)
  tensors, so this is the one place where K is seen after RoPE, for LLaMA, Mistral and Qwen2 alike.

KV-cache semantics: keys are quantized **after** RoPE and values as they are (LR-QAT Table 5,
following LLM-QAT / OmniQuant). The quantization is a per-row function (a token's range depends on
that token only, or a static range), so quantizing the concatenated cache at every step gives
exactly the values a cache storing quantized K / V would hold.

The registered wrappers are stateless functions (all state lives in the modules they find on the
attention layer); registering them is idempotent. :func:`remove_activation_quant` restores the
original implementation name and removes every hook and quantizer, so the model computes exactly
what it did before.
"""
from __future__ import annotations

import sys
from typing import Iterable

import torch
from torch import nn

from ..methods.act_config import ActQuantConfig
from ..quant.activation import DynamicActQuantizer, StaticActQuantizer

WRAPPER_PREFIX = "lrqat_actq_"
SUPPORTED_ATTENTION = ("sdpa", "eager")
INPUT_QUANTIZER = "input_quantizer"
ATTN_QUANT = "act_quant"


# --- the quantizer modules -------------------------------------------------------------------

def make_quantizer(bits: int, cfg: ActQuantConfig, reduce_dims: tuple[int, ...], name: str,
                   symmetric: bool = False) -> nn.Module:
    if cfg.mode == "dynamic":
        return DynamicActQuantizer(bits, reduce_dims, symmetric)
    return StaticActQuantizer(bits, learned=cfg.static_range == "learned", name=name, symmetric=symmetric)


class AttentionActQuant(nn.Module):
    """Quantizers of one attention layer's post-RoPE ``query`` / ``key`` / ``value`` ([b, heads, t, d])."""

    def __init__(self, cfg: ActQuantConfig, name: str):
        super().__init__()
        dims = (1, 3) if cfg.kv_granularity == "token" else (3,)
        self.query = None if cfg.query_bits is None else make_quantizer(cfg.query_bits, cfg, dims, f"{name}.query")
        self.key = None if cfg.kv_bits is None else make_quantizer(cfg.kv_bits, cfg, dims, f"{name}.key")
        self.value = None if cfg.kv_bits is None else make_quantizer(cfg.kv_bits, cfg, dims, f"{name}.value")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        return (query if self.query is None else self.query(query), key if self.key is None else self.key(key),
                value if self.value is None else self.value(value))


# --- linear inputs ---------------------------------------------------------------------------

def _quantize_input(module: nn.Module, args: tuple) -> tuple:
    return (getattr(module, INPUT_QUANTIZER)(args[0]), *args[1:])


def _input_hook_ids(module: nn.Module) -> list[int]:
    return [k for k, h in module._forward_pre_hooks.items() if h is _quantize_input]


def attach_input_quantizer(linear: nn.Module, quantizer: nn.Module) -> None:
    """Quantize ``linear``'s input with ``quantizer`` (a child module + forward pre-hook)."""
    if _input_hook_ids(linear):
        raise ValueError(f"{type(linear).__name__} already has an input quantizer")
    linear.add_module(INPUT_QUANTIZER, quantizer)
    linear.register_forward_pre_hook(_quantize_input)


def detach_input_quantizer(linear: nn.Module) -> nn.Module | None:
    """Remove the input quantizer of ``linear`` (hook and child); returns it (None if there was none)."""
    for k in _input_hook_ids(linear):
        del linear._forward_pre_hooks[k]
    return linear._modules.pop(INPUT_QUANTIZER, None)


def move_input_quantizer(src: nn.Module, dst: nn.Module) -> None:
    """Carry an input quantizer over when a linear is replaced (``materialize``)."""
    quantizer = detach_input_quantizer(src)
    if quantizer is not None:
        attach_input_quantizer(dst, quantizer)


# --- attention wrapper -----------------------------------------------------------------------

def _eager_of(module: nn.Module):
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise TypeError(f"{type(module).__name__}: its module defines no eager_attention_forward; "
                        f"activation quantization of q/k/v needs attn_implementation 'sdpa'")
    return fn


def _quantized_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        aq = getattr(module, ATTN_QUANT, None)
        if aq is not None:
            query, key, value = aq(query, key, value)
        fn = _eager_of(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        return fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{WRAPPER_PREFIX}{base}"
    return attention


def _register_wrappers() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for base in SUPPORTED_ATTENTION:
        name = WRAPPER_PREFIX + base
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _quantized_attention(base))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None),
                                                                           "_attn_implementation")}
    for config in configs.values():
        config._attn_implementation = name


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The self-attention modules (those owning ``k_proj`` and ``v_proj``)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(getattr(m, "k_proj", None), nn.Module) and isinstance(getattr(m, "v_proj", None), nn.Module)}


# --- whole model -----------------------------------------------------------------------------

def apply_activation_quant(model: nn.Module, cfg: ActQuantConfig, linear_names: Iterable[str]) -> nn.Module:
    """Attach activation quantizers for ``cfg`` (in place): inputs of ``linear_names``; q/k/v after RoPE."""
    if has_activation_quant(model):
        raise ValueError("activations: model already has activation quantizers; remove_activation_quant first")
    if cfg.bits is not None:
        for name in linear_names:
            attach_input_quantizer(model.get_submodule(name), make_quantizer(cfg.bits, cfg, (-1,), f"{name}.input",
                                                                              cfg.symmetric))
    if cfg.kv_bits is not None or cfg.query_bits is not None:
        impl = model.config._attn_implementation
        if impl not in SUPPORTED_ATTENTION:
            raise ValueError(f"activations: quantizing keys/values/queries needs attn_implementation 'sdpa' or "
                             f"'eager' (model.attn_implementation), the model uses {impl!r}")
        attn = attention_modules(model)
        if not attn:
            raise ValueError("activations: kv_bits/query_bits set but no attention module with k_proj and v_proj found")
        _register_wrappers()
        for name, module in attn.items():
            module.add_module(ATTN_QUANT, AttentionActQuant(cfg, name))
        _set_attn_implementation(model, WRAPPER_PREFIX + impl)
    model.act_quant_config = cfg
    return model


def has_activation_quant(model: nn.Module) -> bool:
    return any(_input_hook_ids(m) or isinstance(m, AttentionActQuant) for m in model.modules())


def remove_activation_quant(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_activation_quant` exactly (in place): hooks, quantizers, attention implementation."""
    for module in model.modules():
        detach_input_quantizer(module)
        module._modules.pop(ATTN_QUANT, None)
    impl = getattr(model.config, "_attn_implementation", None)
    if isinstance(impl, str) and impl.startswith(WRAPPER_PREFIX):
        _set_attn_implementation(model, impl.removeprefix(WRAPPER_PREFIX))
    if hasattr(model, "act_quant_config"):
        del model.act_quant_config
    return model


def activation_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """``{module name: quantizer}`` of every activation quantizer in the model."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (DynamicActQuantizer, StaticActQuantizer))}


def activation_state_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes owned by activation quantizers (kept out of dense HF checkpoints)."""
    return tuple(f"{n}." for n in activation_quantizers(model))


# --- static ranges ---------------------------------------------------------------------------

@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every static quantizer's range from min-max over ``batches`` (input_ids tensors).

    Under torch.distributed the ranges are reduced (MIN / MAX) over all ranks, so every rank ends with
    the same scales whatever data it saw. Returns the number of quantizers calibrated.
    """
    static = {n: q for n, q in activation_quantizers(model).items() if isinstance(q, StaticActQuantizer)}
    if not static:
        raise ValueError("calibrate_activations: the model has no static activation quantizers (mode: static)")
    for q in static.values():
        q.forward = _observing_forward(q)  # instance attribute: shadows forward during calibration only
    was_training = model.training
    model.eval()
    try:
        n = 0
        for ids in batches:
            model(input_ids=ids)
            n += 1
        if n == 0:
            raise ValueError("calibrate_activations: no batches")
    finally:
        for q in static.values():
            del q.forward
        model.train(was_training)
    for name, q in static.items():
        if q.observed is None:
            raise RuntimeError(f"calibrate_activations: {name} saw no data (is it on the model's forward path?)")
        lo, hi = q.observed
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
            torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
        q.calibrate(lo, hi)
    return len(static)


def _observing_forward(q: StaticActQuantizer):
    def forward(x: torch.Tensor) -> torch.Tensor:
        q.observe(x)
        return x  # calibrate on the unquantized model: ranges of full-precision activations

    return forward
