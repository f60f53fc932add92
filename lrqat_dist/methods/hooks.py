"""What a method needs from the training loop besides forward, backward and the optimizer step.

The trainer calls :meth:`TrainingHooks.before_step` and :meth:`TrainingHooks.after_step` around every
optimizer step (1-based ``step``) on every rank, with its engine. Both are collective.

- DL-QAT: phase 1 (steps ``1..dlqat_phase1_steps``) trains ``s, b``; phase 2 trains ``m, A, B``.
  The switch keeps every parameter in the optimizer (``requires_grad`` flips would invalidate the
  flat buffers of ZeRO and the sharded groups of FSDP2). Instead, two things make the frozen group
  exactly frozen on every engine: (1) its gradients are exact zeros, produced inside the layer's
  backward (:meth:`QuantLinear.gradient_mask`), so they add nothing to the clipping norm nor to the
  Adam moments; (2) its learning rate is 0 (:func:`group_windows`, applied by the LR schedule),
  so the Adam momentum it built in phase 1 cannot keep moving ``s, b`` in phase 2.
- LoQT: at each update step (:func:`~lrqat_dist.methods.loqt.loqt_update_steps`) the layers capture
  dL/dW during that step's backward; after the step, per layer: the gradient is summed onto one
  owner rank (layers are dealt round-robin), the owner computes the SVD (new P) and the merge, and
  broadcasts P and the new integer weight; B is reset through the engine. Every rank therefore
  holds bit-identical buffers, whatever its hardware.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from .base import QuantLinear
from .config import QATConfig
from .dlqat import PHASE1, PHASE2, DLQATLinear
from .loqt import LoQTLinear, gradient_projection, loqt_update_steps


class ParamAccess(Protocol):
    """How hooks read and write trainable tensors, however an engine shards them (see ``Engine``)."""

    def full_params(self, names: list[str]) -> dict[str, torch.Tensor]: ...

    def assign_params(self, values: dict[str, torch.Tensor]) -> None: ...


class LocalParams:
    """:class:`ParamAccess` of an unsharded model in one process (``prepare`` users, tests)."""

    def __init__(self, model: nn.Module):
        self.params = dict(model.named_parameters())

    def full_params(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {n: self.params[n].detach().clone() for n in names}

    @torch.no_grad()
    def assign_params(self, values: dict[str, torch.Tensor]) -> None:
        for n, v in values.items():
            self.params[n].copy_(v)


class TrainingHooks:
    """No-op base; see the module docstring."""

    def before_step(self, step: int, params: ParamAccess) -> None:
        pass

    def after_step(self, step: int, params: ParamAccess) -> None:
        pass


class DLQATHooks(TrainingHooks):
    def __init__(self, layers: dict[str, DLQATLinear], phase1_steps: int):
        self.layers, self.phase1_steps = layers, phase1_steps

    def phase(self, step: int) -> int:
        return PHASE1 if step <= self.phase1_steps else PHASE2

    def before_step(self, step: int, params: ParamAccess) -> None:
        for layer in self.layers.values():
            layer.set_phase(self.phase(step))


class LoQTHooks(TrainingHooks):
    def __init__(self, layers: dict[str, LoQTLinear], cfg: QATConfig, max_steps: int):
        self.layers, self.cfg, self.max_steps = layers, cfg, max_steps
        self.update_steps = set(loqt_update_steps(cfg.loqt_tau, cfg.loqt_psi, max_steps))
        self.merges = 0  # merges that changed weights, this process (for logs and tests)

    def before_step(self, step: int, params: ParamAccess) -> None:
        capture = step in self.update_steps and not self._final(step)
        for layer in self.layers.values():
            layer.weight_grad_sink = (torch.zeros(layer.out_features, layer.in_features, dtype=torch.float32,
                                                  device=layer.qscale.device) if capture else None)

    def _final(self, step: int) -> bool:
        return self.cfg.loqt_final_merge and step == self.max_steps

    @torch.no_grad()
    def after_step(self, step: int, params: ParamAccess) -> None:
        final = self._final(step)
        if step not in self.update_steps and not final:
            return
        names = {name: f"{name}.lora_B" for name in self.layers}
        b_full = params.full_params(list(names.values()))  # the same values on every rank
        rank, world = _rank_world()
        new_b = {}
        for i, (name, layer) in enumerate(self.layers.items()):
            owner = i % world
            grad, layer.weight_grad_sink = layer.weight_grad_sink, None
            if grad is not None and world > 1:
                dist.reduce(grad, dst=owner)  # sum over ranks, to the owner only
            b_old = b_full[names[name]]
            if rank == owner:
                proj = None if grad is None else gradient_projection(grad / world, layer.rank, layer.left)
                codes, scale, zp, b_new = layer.merge(b_old, proj, 0 if final else self.cfg.loqt_error_comp)
                layer.apply_merge(codes, scale, zp, proj)
            else:
                b_new = torch.empty_like(b_old)
            if world > 1:
                tensors = [layer.qweight, layer.qscale, b_new] + ([layer.proj] if grad is not None else [])
                tensors += [] if layer.zero_point is None else [layer.zero_point]
                for t in tensors:
                    _broadcast(t, owner)
            self.merges += int(bool(b_old.any()))
            new_b[names[name]] = b_new
        params.assign_params(new_b)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _broadcast(t: torch.Tensor, src: int) -> None:
    if t.dtype == torch.int16:  # not every backend (gloo) reduces/broadcasts int16: go through int32
        wide = t.to(torch.int32)
        dist.broadcast(wide, src=src)
        t.copy_(wide)
    else:
        dist.broadcast(t, src=src)


def training_hooks(model: nn.Module, cfg: QATConfig, max_steps: int) -> TrainingHooks | None:
    """The hooks a prepared model's method needs in the training loop (None when it needs none)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if cfg.method == "dlqat":
        return DLQATHooks({n: m for n, m in layers.items() if isinstance(m, DLQATLinear)}, cfg.dlqat_phase1_steps)
    if cfg.method == "loqt":
        return LoQTHooks({n: m for n, m in layers.items() if isinstance(m, LoQTLinear)}, cfg, max_steps)
    return None


def group_windows(cfg: Any) -> dict[str, tuple[int, int | None]]:
    """Per optimizer group name, the window ``[start, end)`` of 0-based optimizer steps in which its
    learning rate is on (elsewhere the LR schedule multiplies it by 0). Groups not listed: always on."""
    if getattr(cfg, "method", None) == "dlqat":
        p1 = cfg.dlqat_phase1_steps
        return {"scales": (0, p1), "adapters": (p1, None)}
    return {}
