"""``dist.engine: deepspeed``: DeepSpeed ZeRO stage 0-3, optionally with optimizer state on the CPU.

The DeepSpeed config is generated from the YAML (or read from ``dist.ds_config`` and completed from
it). The YAML stays the single source of batch sizes, accumulation, clipping, optimizer and schedule:
a config file that sets them differently is an error, not a silent override.

Precision: no ``bf16``/``fp16`` section. DeepSpeed's bf16 mode casts every parameter, A, B and s
included, to bf16 and keeps the fp32 masters inside its optimizer, so the forward would see a bf16
scale (0.19 leaves buffers alone unless ``buffer_dtype`` is set; older releases cast float buffers
too, e.g. an fp32/fp16 Phi0 store; int8/uint8 Phi0 is never touched). Here the frozen model is
already in ``train.dtype`` and A, B, s are fp32 Parameters, so DeepSpeed runs its fp32 path on them:
they are their own masters and the forward sees the fp32 values (see docs/launch-deepspeed.md).

Checkpoint payload: ``deepspeed/``, DeepSpeed's ``save_checkpoint`` layout (``latest`` + one tag
directory), frozen parameters and every buffer excluded (``exclude_frozen_parameters`` drops frozen
parameters only, and not a tied alias such as ``lm_head.weight``; while saving, the buffers are
non-persistent and a state-dict hook keeps the trainable names only,
:func:`lrqat_dist.model.frozen_state.frozen_state_left_out`), so the model-states files hold only the
trainable tensors (ZeRO-3: their empty placeholders) and the optimizer-state files the fp32 master
partitions and Adam moments. Offline, :func:`deepspeed_trainable` reads the trainable
tensors back in one CPU process: ZeRO 1-3 merge the fp32 master partitions of the optimizer-state
shards with ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint`` (its float
casting of buffers does not matter for A, B, s); ZeRO-0 keeps full parameters in the model-states
file. Checkpoints written before the buffers were left out (no ``payload_buffers: false`` in meta.json)
also hold the (integer) buffers as saved (:func:`deepspeed_buffers`).
"""
from __future__ import annotations

import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from ..model.frozen_state import frozen_state_left_out
from .base import Engine, clip_and_norm, poison_nonfinite
from .config import DistConfig, EngineConfig, TrainConfig
from .env import DistEnv, claim_device, default_backend, local_rank, process_group_timeout, standalone_env
from .optim import build_optimizer, build_scheduler

DS_DIR = "deepspeed"


def _skip_shm_comm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory collectives op (~65 s) on every first
    ``init_distributed``; gloo collectives work without it. ``TorchBackend.__init__`` looks the
    builder up in its module globals, so replacing it there is enough."""
    import deepspeed.comm.torch  # noqa: F401  (the module, not the torch attribute of deepspeed.comm)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _load_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dist.ds_config: {p} does not exist")
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"dist.ds_config: {p} must hold a mapping")
    return data


def build_ds_config(t: TrainConfig, d: DistConfig, world_size: int,
                    device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config dict of a run: ``dist.ds_config`` (if any) completed from ``train:``/``dist:``."""
    base = _load_file(d.ds_config) if d.ds_config else {}
    for key in ("optimizer", "scheduler"):
        if key in base:
            raise ValueError(f"dist.ds_config: remove its '{key}' section; the optimizer and schedule come from train.*")
    for key in ("bf16", "fp16"):
        if isinstance(base.get(key), dict) and base[key].get("enabled", False) not in (False, "auto"):
            raise ValueError(f"dist.ds_config: '{key}.enabled' would cast A, B, s to {key}; set train.dtype "
                             "instead (the frozen model computes in it, A, B, s stay fp32)")
    wanted = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip or 0.0,
    }
    out = dict(base)
    for key, value in wanted.items():
        if key in base and base[key] != "auto" and base[key] != value:
            raise ValueError(f"dist.ds_config: {key}={base[key]!r} disagrees with the YAML ({value!r}); "
                             "drop it from the file or set it to 'auto'")
        out[key] = value
    zero = dict(base.get("zero_optimization") or {})
    if "stage" in zero and zero["stage"] != d.zero_stage:
        raise ValueError(f"dist.ds_config: zero_optimization.stage={zero['stage']} disagrees with "
                         f"dist.zero_stage={d.zero_stage}")
    zero["stage"] = d.zero_stage
    if d.offload_optimizer:
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": device.type == "cuda"})
    out["zero_optimization"] = zero
    out.setdefault("zero_allow_untested_optimizer", True)
    # A torch optimizer with offload is allowed (slower than DeepSpeedCPUAdam, but nothing to compile).
    out.setdefault("zero_force_ds_cpu_optimizer", d.ds_optimizer == "deepspeed")
    out.setdefault("steps_per_print", 2**31 - 1)  # the loop does the logging
    out.setdefault("wall_clock_breakdown", False)
    return out


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    @classmethod
    def setup(cls, cfg: EngineConfig) -> DistEnv:
        import deepspeed

        device = claim_device(cfg.train)
        if device.type == "cpu" and not cfg.dist.cpu_shm_comm:
            _skip_shm_comm_op()
        backend = default_backend(device) if cfg.dist.backend == "auto" else cfg.dist.backend
        # DeepSpeed's ZeRO calls these torch collectives under their old names on every step.
        warnings.filterwarnings("ignore", r".*`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                                r"is deprecated", FutureWarning)
        os.environ.update(standalone_env())  # plain `python launch/train.py`: a one-process job
        deepspeed.init_distributed(dist_backend=backend, verbose=False,
                                   timeout=process_group_timeout(cfg.dist))
        import torch.distributed as dist

        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank(), device)

    def __init__(self, model: nn.Module, cfg: EngineConfig, env: DistEnv):
        import deepspeed

        super().__init__(model, cfg, env)
        self.ds_config = build_ds_config(cfg.train, cfg.dist, env.world_size, env.device)
        optimizer = self._optimizer(model, cfg)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config,
            lr_scheduler=lambda opt: build_scheduler(opt, cfg.train, cfg.lr_windows),
            dist_init_required=False)
        self.zero_stage = cfg.dist.zero_stage

    @staticmethod
    def _optimizer(model: nn.Module, cfg: EngineConfig) -> torch.optim.Optimizer:
        if cfg.dist.ds_optimizer == "torch":
            return build_optimizer(model, cfg.train)
        # JIT-compiled on first use (minutes); much faster for large trainable sets.
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

        cls = DeepSpeedCPUAdam if cfg.dist.offload_optimizer else FusedAdam
        return build_optimizer(model, cfg.train, cls, adamw_mode=True)

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.ds(input_ids=input_ids).logits

    def forward_backward(self, input_ids: torch.Tensor, last_micro: bool) -> torch.Tensor:
        loss = self.training_loss(input_ids)
        self.ds.backward(poison_nonfinite(loss))  # scales by 1 / gradient_accumulation_steps itself
        # DeepSpeed wants step() after every backward; it only updates at the accumulation boundary,
        # which is the last micro-batch's: that one is stepped by step().
        if not last_micro:
            self.ds.step()
        return loss.detach()

    def step(self) -> float | None:
        """The accumulation boundary's ``ds.step()``. Non-finite global grad norm: ZeRO 1-3 skip the
        update in ZeRO's own overflow path (no optimizer or scheduler step, gradients cleared; the norm
        is the same on every rank); ZeRO-0 (a plain torch optimizer over all-reduced ``p.grad``) is
        checked here and skipped by :meth:`_boundary_step_without_update`."""
        if not self.ds.is_gradient_accumulation_boundary():
            raise RuntimeError("deepspeed: the last micro-batch of a step did not reach the accumulation boundary")
        norm = None
        if self.zero_stage == 0:
            norm = float(clip_and_norm([p for _, p in self._trainable_params()], None))
            if self.env.any(not math.isfinite(norm)):
                self._boundary_step_without_update()
            else:
                self.ds.step()
        else:
            self.ds.step()
            ds_norm = self.ds.get_global_grad_norm()
            norm = None if ds_norm is None else float(ds_norm)
        applied = self.ds.was_step_applied()
        # Every rank learns every other's outcome (one all-reduce each), so a disagreement or a
        # non-finite update that DeepSpeed applied raises on all ranks together, not on some (a hang).
        self.last_step_skipped = self.env.any(not applied)
        mixed = self.last_step_skipped and self.env.any(applied)
        nan_applied = self.env.any(applied and norm is not None and not math.isfinite(norm))
        if mixed:
            raise RuntimeError("deepspeed: some ranks applied a step that another rank skipped as non-finite; "
                               "the ranks' trainable tensors now differ")
        if nan_applied:
            raise RuntimeError(f"deepspeed: a step with a non-finite gradient norm ({norm}) was applied: this "
                               "DeepSpeed version does not skip it (tested: 0.19.8); A, B, s are no longer finite")
        return norm

    def _boundary_step_without_update(self) -> None:
        """``ds.step()`` at the boundary with the optimizer's update replaced by nothing, reported as an
        overflow: DeepSpeed then skips the LR scheduler, zeroes the gradients and keeps its counters."""
        opt = self.ds.optimizer
        saved = {k: vars(opt)[k] for k in ("step", "overflow") if k in vars(opt)}
        opt.step = lambda *args, **kwargs: None
        opt.overflow = True
        try:
            self.ds.step()
        finally:
            for k in ("step", "overflow"):
                if k in saved:
                    setattr(opt, k, saved[k])
                else:
                    delattr(opt, k)

    def lrs(self) -> dict[str, float]:
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def _trainable_params(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.ds.module.named_parameters() if p.requires_grad]

    def full_params(self, names: list[str]) -> dict[str, torch.Tensor]:
        import deepspeed

        params = dict(self.ds.module.named_parameters())
        wanted = [params[n] for n in names]
        with deepspeed.zero.GatheredParameters(wanted, modifier_rank=None, enabled=self.zero_stage == 3):
            return {n: p.detach().clone() for n, p in zip(names, wanted)}

    @torch.no_grad()
    def assign_params(self, values: dict[str, torch.Tensor]) -> None:
        import deepspeed

        from .deepspeed_elastic import set_full_hp

        params = dict(self.ds.module.named_parameters())
        wanted = [params[n] for n in values]
        # The working copy (ZeRO-3: gathered, set on rank 0, re-partitioned on exit) ...
        with deepspeed.zero.GatheredParameters(wanted, modifier_rank=0, enabled=self.zero_stage == 3):
            if self.zero_stage != 3 or self.env.is_main:
                for p, v in zip(wanted, values.values()):
                    p.data.copy_(v)
        # ... and ZeRO's fp32 master partition, which would otherwise overwrite it at the next step.
        if self.zero_stage > 0:
            for p, v in zip(wanted, values.values()):
                set_full_hp(p, v.to(dtype=torch.float32))  # also when ZeRO-3 pads p's last partition

    def trainable_state(self) -> dict[str, torch.Tensor]:
        import deepspeed

        named = self._trainable_params()
        out = {}
        # ZeRO-3 holds only a partition of each parameter: gather (all ranks), copy on the main rank.
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None,
                                               enabled=self.zero_stage == 3):
            if self.env.is_main:
                out = {n: p.detach().float().cpu().clone() for n, p in named}
        return out

    def save(self, path: Path) -> dict[str, Any]:
        tag = "state"
        # Trainable parameters only in the model states: the frozen buffers (Phi0, s0, zero-points) and
        # parameters (a tied embedding's lm_head alias too) are rebuilt from the base model on resume
        # (checked against meta.json's fingerprint), LoQT's trained buffers are saved once by the
        # checkpoint layer. Under ZeRO-3 every rank writes its own model-states file, so a buffer left
        # in would be written world_size times.
        with frozen_state_left_out(self.ds.module):
            self.ds.save_checkpoint(str(path / DS_DIR), tag=tag, client_state={}, save_latest=True,
                                    exclude_frozen_parameters=True)
        return {"payload": DS_DIR, "deepspeed_tag": tag, "payload_buffers": False}

    def load(self, path: Path) -> None:
        # Frozen parameters and all buffers were left out of the payload (rebuilt from the base model,
        # LoQT's trained buffers restored by the checkpoint layer), hence not strict;
        # the checkpoint layer verifies the trainable tensors after loading.
        load_path, _ = self.ds.load_checkpoint(str(path / DS_DIR), tag=None, load_module_strict=False,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"{path / DS_DIR}: DeepSpeed found no checkpoint to load")

    def load_resharded(self, path: Path, meta: dict[str, Any], params: dict[str, torch.Tensor]) -> None:
        # A different world size: DeepSpeed's load needs the saving one; see deepspeed_elastic.
        from .deepspeed_elastic import load_resharded

        if self.zero_stage == 0:
            raise ValueError(f"{path}: elastic resume supports ZeRO stages 1-3, this run uses ZeRO-0")
        ds_dir = path / meta.get("payload", DS_DIR)
        tag = meta.get("deepspeed_tag") or (ds_dir / "latest").read_text().strip()
        load_resharded(self, ds_dir / tag, params)

    @classmethod
    def read_payload_trainable(cls, path: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
        return deepspeed_trainable(path / meta.get("payload", DS_DIR), list(meta["trainable"]),
                                   meta.get("deepspeed_tag"))

    @classmethod
    def read_payload_buffers(cls, path: Path, meta: dict[str, Any],
                             keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
        return deepspeed_buffers(path / meta.get("payload", DS_DIR), keep, meta.get("deepspeed_tag"))


# --- reading a payload offline (one CPU process, no process group) -------------------------------

def deepspeed_trainable(ds_dir: Path, names: list[str], tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 trainable tensors of a DeepSpeed checkpoint directory (the one holding ``latest``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = tag or (ds_dir / "latest").read_text().strip()
    if list((ds_dir / tag).glob("*optim_states.pt")):
        full = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag, exclude_frozen_parameters=True)
    else:  # ZeRO-0: no partitioned fp32 masters; the model-states file holds the full parameters
        full = _model_states(ds_dir / tag)["module"]
    missing = [n for n in names if n not in full]
    if missing:
        raise KeyError(f"{ds_dir}: trainable tensors missing from the DeepSpeed checkpoint: {missing[:5]}")
    return {n: full[n].detach().float().contiguous() for n in names}


def _model_states(tag_dir: Path) -> dict:
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed *model_states.pt file")
    return torch.load(files[0], map_location="cpu", weights_only=False)


def deepspeed_buffers(ds_dir: Path, keep: Callable[[str], bool], tag: str | None = None) -> dict[str, torch.Tensor]:
    """The entries of DeepSpeed's model-states file whose names ``keep`` accepts, as saved (integer
    buffers untouched)."""
    tag = tag or (ds_dir / "latest").read_text().strip()
    module = _model_states(ds_dir / tag)["module"]
    return {k: v.clone() for k, v in module.items() if keep(k)}
