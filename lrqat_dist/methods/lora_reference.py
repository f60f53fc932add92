"""Plain LoRA (no quantization): the reference the memory planner and benchmark compare against.

Not a quantization method (``prepare`` does not know it and it exports nothing): the frozen base
weight stays in the compute dtype beside rank-``r`` fp32 adapters, ``y = x W^T + (alpha/r) (x A^T) B^T``,
as in the LR-QAT paper's LoRA baseline. ``lrqat_dist.memory`` plans and measures it under :data:`NAME`.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .config import DEFAULT_TARGETS

NAME = "lora"


class LoRALinear(nn.Module):
    """y = x W^T + (alpha/r) (x A^T) B^T with W frozen (compute dtype), A, B fp32 masters (B = 0)."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return F.linear(x, self.weight) + low * self.scaling


def apply_lora(model: nn.Module, rank: int = 32, alpha: float = 1.0,
               targets: Iterable[str] = DEFAULT_TARGETS) -> nn.Module:
    """Freeze ``model`` and replace each ``nn.Linear`` whose last name component is in ``targets`` by a
    :class:`LoRALinear` (in place, in ``named_modules`` order: A's random init draws from the global RNG)."""
    targets = set(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in [(n, x) for n, x in model.named_modules() if type(x) is nn.Linear]:
        if name.rpartition(".")[2] in targets:
            model.set_submodule(name, LoRALinear(mod, rank, alpha))
    return model
