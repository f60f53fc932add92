"""torchao-style model patching: ``prepare`` swaps target linears for quantized ones, ``fold`` reads
back the integer checkpoint, ``materialize`` turns a prepared model into a plain HF model."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..methods import METHODS, FoldedWeight, QATConfig, QuantLinear
from .activations import apply_activation_quant, move_input_quantizer


def prepare(model: nn.Module, config: QATConfig,
            load_linear: Callable[[str, nn.Linear], nn.Linear] | None = None,
            on_converted: Callable[[nn.Module, str], None] | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` whose last name component is in ``config.targets`` (in place).

    Everything else (embeddings, lm_head, norms) is frozen; afterwards the trainable parameters are
    exactly the method's (LR-QAT: ``lora_A``, ``lora_B``, ``scale`` of each layer), plus learned
    activation scales when ``config.activations`` asks for static learned ranges.
    With ``config.activations`` the activation fake-quantizers are attached too (model/activations.py).
    ``load_linear(name, linear)``, when given, returns the linear to convert in place of ``linear``
    right before its conversion: lean loading (``lrqat_dist.model.lean_load``) builds the model on
    the ``meta`` device and reads each weight only then, so one base weight is in memory at a time.
    ``on_converted(model, name)``, when given, is called right after each conversion (``dist.shard_frozen``
    shards a decoder layer's frozen buffers as soon as its last linear is converted).
    """
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("prepare: model is already prepared (it contains quantized linears)")
    for p in model.parameters():
        p.requires_grad_(config.train_unquantized)  # True: pretraining from random init trains them too
    method = METHODS[config.method]
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    chosen = [(n, m) for n, m in linears if n.rpartition(".")[2] in config.targets]
    if not chosen:
        found = sorted({n.rpartition(".")[2] for n, _ in linears})
        raise ValueError(f"targets: no nn.Linear named {config.targets} in the model; its linears are {found}")
    for name, linear in chosen:
        if load_linear is not None:
            linear = load_linear(name, linear)
        model.set_submodule(name, method.from_linear(linear, config, name))
        if on_converted is not None:
            on_converted(model, name)
    if config.activations is not None:
        apply_activation_quant(model, config.activations, [n for n, _ in chosen])
    model.qat_config = config
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def trained_buffer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers training rewrites (``QuantLinear.trained_buffers``, e.g. LoQT's merged codes and P),
    by full name: checkpoints and exports carry them since the base model cannot rebuild them."""
    out = {}
    for name, layer in quantized_layers(model).items():
        for b in layer.trained_buffers:
            t = getattr(layer, b)
            if t is not None:
                out[f"{name}.{b}"] = t.detach().cpu().contiguous().clone()
    return out


@torch.no_grad()
def load_trained_buffers_(model: nn.Module, state: dict[str, torch.Tensor], origin: str = "state") -> None:
    """Put :func:`trained_buffer_state` tensors back (in place); every expected buffer must be present."""
    want = trained_buffer_state(model)
    missing = sorted(set(want) - set(state))
    if missing:
        raise KeyError(f"{origin}: missing trained buffers, e.g. {missing[:3]}")
    buffers = dict(model.named_buffers())
    for k in want:
        if buffers[k].shape != state[k].shape:
            raise ValueError(f"{origin}: {k} has shape {tuple(state[k].shape)}, model expects {tuple(buffers[k].shape)}")
        buffers[k].copy_(state[k])


@torch.no_grad()
def fold(model: nn.Module) -> dict[str, FoldedWeight]:
    """``{module_name: FoldedWeight}`` for every quantized linear of a prepared model."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("fold: model has no quantized linears; call lrqat_dist.prepare first")
    return {name: layer.fold() for name, layer in layers.items()}


@torch.no_grad()
def materialize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace each quantized linear by an ``nn.Linear`` holding its folded, dequantized weight (in place).

    Activation quantizers (if any) are kept: the result computes what the prepared model computes."""
    for name, layer in quantized_layers(model).items():
        folded = layer.fold()
        w = folded.dequantize()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=folded.bias is not None,
                           device=w.device, dtype=dtype or w.dtype)
        linear.weight.copy_(w)
        if folded.bias is not None:
            linear.bias.copy_(folded.bias)
        linear.requires_grad_(False)
        move_input_quantizer(layer, linear)  # activation quantization stays in place
        model.set_submodule(name, linear)
    if hasattr(model, "qat_config"):
        del model.qat_config
    return model
