"""The engine interface: what the training loop asks of whatever holds and shards the model.

Per optimizer step the loop calls :meth:`Engine.forward_backward` ``train.grad_accum`` times, then
:meth:`Engine.step`. Gradients are averaged over micro-batches and ranks, so a run of ``W`` ranks
with micro-batch ``m`` and accumulation ``k`` computes the same update as one process with micro-batch
``m`` and accumulation ``W * k`` over the same sequences (up to fp32 summation order).

Checkpoint payloads are engine specific: each engine writes (``save``), restores (``load``) and reads
offline (``read_payload_trainable``: one CPU process, no process group) its own; what is common
(trainable tensors, data and RNG state, meta.json) and the layout are :mod:`lrqat_dist.checkpoint`'s.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..objective.losses import next_token_loss
from ..objective.objective import TrainingObjective
from .config import EngineConfig
from .env import DistEnv


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` to backpropagate: unchanged (``* 1.0``, exact) when finite, ``* NaN`` otherwise, so that a
    non-finite loss on any rank makes every gradient, and so the reduced global grad norm on every rank,
    NaN: the engines' ``step()`` then skips the update everywhere (see :mod:`lrqat_dist.train.nonfinite`).
    No host synchronisation."""
    ok = torch.isfinite(loss.detach())
    return loss * torch.where(ok, torch.ones_like(loss), torch.full_like(loss, float("nan")))


class Engine(ABC):
    """One process's handle on the model, its optimizer and LR scheduler, however they are sharded."""

    name: ClassVar[str]
    # False: the payload holds optimizer/scheduler state only, and the checkpoint layer restores the
    # trainable tensors from the full copy it writes for every engine.
    payload_holds_trainable: ClassVar[bool] = True

    def __init__(self, model: nn.Module, cfg: EngineConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.last_step_skipped = False  # set by step(): the update was skipped (non-finite grad norm)
        # What forward_backward minimises: plain next-token CE unless the trainer sets a distilling one.
        self.objective = TrainingObjective()

    # --- process setup ------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def setup(cls, cfg: EngineConfig) -> DistEnv:
        """Join the job (process group, device) before anything else is built."""

    # --- training -----------------------------------------------------------------------------
    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The model to call for a forward pass (wrapped or sharded as the engine needs)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits for ``input_ids``."""
        return self.module(input_ids=input_ids).logits

    def training_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The mean training loss of one micro-batch, with autograd to the trainable tensors: every
        engine's :meth:`forward_backward` computes it here (:class:`TrainingObjective`: CE, or CE mixed
        with distillation from a teacher forward of the same module)."""
        return self.objective.loss(self.module, self.forward, input_ids)

    @abstractmethod
    def forward_backward(self, input_ids: torch.Tensor, last_micro: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its mean loss (detached)."""

    @abstractmethod
    def step(self) -> float | None:
        """Clip, update, advance the LR schedule, zero the gradients; returns the pre-clip grad norm.

        A non-finite global grad norm is never applied: then nothing is updated (no optimizer step, no
        scheduler step), the gradients are zeroed and ``last_step_skipped`` is True, on every rank.
        ``forward_backward`` backpropagates :func:`poison_nonfinite` of the loss, so a non-finite loss
        on any rank ends the same way."""

    @abstractmethod
    def lrs(self) -> dict[str, float]:
        """Current learning rate of each parameter group, by group name."""

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    # --- whole trainable tensors, for methods that rewrite them between steps (LoQT) -----------
    def full_params(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Full copies of the named trainable parameters on every rank (collective). This default
        is for unsharded parameters; sharding engines override it."""
        params = dict(self.module.named_parameters())
        return {n: params[n].detach().clone() for n in names}

    @torch.no_grad()
    def assign_params(self, values: dict[str, torch.Tensor]) -> None:
        """Set whole trainable parameters (collective; every rank passes the same full values),
        wherever the engine keeps them, fp32 optimizer masters included; optimizer state is kept."""
        params = dict(self.module.named_parameters())
        for n, v in values.items():
            params[n].copy_(v)

    @torch.no_grad()
    def eval_loss_sum(self, input_ids: torch.Tensor) -> tuple[float, int]:
        """Summed next-token loss and number of targets of one batch (for perplexity)."""
        loss = next_token_loss(self.forward(input_ids), input_ids, reduction="sum")
        return float(loss), input_ids.shape[0] * (input_ids.shape[1] - 1)

    # --- state ----------------------------------------------------------------------------------
    @abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full fp32 CPU copies of the trainable parameters by model name, on the main rank
        (an empty dict elsewhere). Collective: every rank must call it."""

    @abstractmethod
    def save(self, path: Path) -> dict[str, Any]:
        """Write this engine's payload (optimizer, scheduler, sharded state) under ``path``.
        Collective. Returns what to record in meta.json (e.g. the payload's subdirectory)."""

    @abstractmethod
    def load(self, path: Path) -> None:
        """Restore a payload written by :meth:`save` under ``path`` (with ``payload_holds_trainable``
        False, only the optimizer and scheduler). Collective."""

    def load_resharded(self, path: Path, meta: dict[str, Any], params: dict[str, torch.Tensor]) -> None:
        """Elastic resume: restore trainable tensors, optimizer and scheduler from a checkpoint written by
        ``meta["world_size"]`` ranks onto this job's (different) world size. ``params``: the checkpoint's
        full fp32 trainable tensors (``trainable.safetensors``), the same on every rank. Collective."""
        raise ValueError(f"{path}: written by {meta['world_size']} processes; engine {self.name!r} can only "
                         f"resume it on that many (this job has {self.env.world_size})")

    @classmethod
    def read_payload_trainable(cls, path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Offline (one CPU process, no process group, whatever world size saved it): the fp32 trainable
        tensors named in ``meta["trainable"]`` from the payload :meth:`save` wrote under ``path``."""
        raise ValueError(f"{path}: engine {cls.name!r} keeps no trainable tensors in its payload")

    @classmethod
    def read_payload_buffers(cls, path: Path, meta: dict[str, Any],
                             keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        """Offline: the model buffers whose names ``keep`` accepts, as the payload under ``path`` saved them."""
        raise ValueError(f"{path}: engine {cls.name!r} keeps no buffers in its payload")

    def close(self) -> None:
        """Release engine resources (process groups are left to the caller)."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of an HF causal LM (the classes it lists in ``_no_split_modules``)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: cannot find its decoder layers (no _no_split_modules match)")
    return layers


def clip_and_norm(params: list[torch.Tensor], max_norm: float | None) -> torch.Tensor:
    """Total 2-norm of the gradients (a full tensor, also for sharded DTensor grads), clipping to
    ``max_norm`` when given."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=False)
    full = getattr(total, "full_tensor", None)
    if full is not None:  # DTensor (FSDP2): the local norms are partial, reduce them
        total = full()
    if max_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
    return total
