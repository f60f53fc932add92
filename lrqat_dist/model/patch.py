"""torchao-style model patching: ``prepare`` swaps target linears for quantized ones, ``fold`` reads
back the integer checkpoint, ``materialize`` turns a prepared model into a plain HF model."""
from __future__ import annotations

import torch
from torch import nn

from ..methods import METHODS, FoldedWeight, QATConfig, QuantLinear


def _set_child(model: nn.Module, name: str, child: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, child)


def prepare(model: nn.Module, config: QATConfig) -> nn.Module:
    """Replace every ``nn.Linear`` whose last name component is in ``config.targets`` (in place).

    Everything else (embeddings, lm_head, norms) is frozen; afterwards the trainable parameters are
    exactly the method's (LR-QAT: ``lora_A``, ``lora_B``, ``scale`` of each layer).
    """
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("prepare: model is already prepared (it contains quantized linears)")
    for p in model.parameters():
        p.requires_grad_(False)
    method = METHODS[config.method]
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    chosen = [(n, m) for n, m in linears if n.rpartition(".")[2] in config.targets]
    if not chosen:
        found = sorted({n.rpartition(".")[2] for n, _ in linears})
        raise ValueError(f"targets: no nn.Linear named {config.targets} in the model; its linears are {found}")
    for name, linear in chosen:
        _set_child(model, name, method.from_linear(linear, config, name))
    model.qat_config = config
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@torch.no_grad()
def fold(model: nn.Module) -> dict[str, FoldedWeight]:
    """``{module_name: FoldedWeight}`` for every quantized linear of a prepared model."""
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("fold: model has no quantized linears; call lrqat_dist.prepare first")
    return {name: layer.fold() for name, layer in layers.items()}


@torch.no_grad()
def materialize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace each quantized linear by an ``nn.Linear`` holding its folded, dequantized weight (in place)."""
    for name, layer in quantized_layers(model).items():
        folded = layer.fold()
        w = folded.dequantize()
        linear = nn.Linear(layer.in_features, layer.out_features, bias=folded.bias is not None,
                           device=w.device, dtype=dtype or w.dtype)
        linear.weight.copy_(w)
        if folded.bias is not None:
            linear.bias.copy_(folded.bias)
        linear.requires_grad_(False)
        _set_child(model, name, linear)
    if hasattr(model, "qat_config"):
        del model.qat_config
    return model
