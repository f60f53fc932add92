"""The YAML sections an engine runs from: ``train:`` (device, dtype, batch, optimizer, schedule) and
``dist:`` (which engine and its knobs), plus :class:`EngineConfig`, what the trainer hands an engine.

They live here, below :mod:`lrqat_dist.train`, so the engines take typed sections without importing
the trainer (which imports the engines). :mod:`lrqat_dist.train.config` puts them into ``JobConfig``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..dtypes import DTYPES as TORCH_DTYPES
from ..dtypes import dtype_name
from ..objective.config import DistillConfig
from ..typed_config import from_dict

SCHEDULES = ("linear", "cosine", "constant")
# dist.engine -> (module, class); imported on demand, so a single-process run never imports DeepSpeed.
ENGINE_CLASSES = {
    "none": ("lrqat_dist.engines.single", "SingleEngine"),
    "deepspeed": ("lrqat_dist.engines.deepspeed", "DeepSpeedEngine"),
    "fsdp2": ("lrqat_dist.engines.fsdp2", "FSDP2Engine"),
}
ENGINES = tuple(ENGINE_CLASSES)
# train.dtype: "auto" or a float dtype in its HF spelling (float32, bfloat16, float16)
DTYPES = ("auto", *(n for n, t in TORCH_DTYPES.items() if n == dtype_name(t)))
DEVICES = ("auto", "cpu", "cuda")
@dataclass
class TrainConfig:
    """Optimisation, checkpointing and validation cadence (YAML ``train:``); see docs/config.md."""

    output_dir: str | None = None
    max_steps: int = 1000
    seed: int = 0
    micro_batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-3
    scale_lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    activation_checkpointing: bool = False
    save_every: int = 500
    save_every_minutes: float | None = None
    keep_last: int = 3
    save_final: bool = True
    # Resume even if the frozen state rebuilt from the base model differs from the checkpoint's
    # fingerprint (model/frozen_state.py); off: such a resume is refused, naming the first differing layer.
    accept_changed_base_model: bool = False
    max_nonfinite: int = 10
    val_every: int = 0
    val_batches: int | None = None
    log_every: int = 10
    dtype: str = "auto"
    device: str = "auto"
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self):
        if isinstance(self.distill, dict):  # direct construction with a mapping (YAML goes through from_dict)
            self.distill = from_dict(DistillConfig, self.distill, "distill")
        if not self.output_dir:
            raise ValueError("output_dir: required (where config, checkpoints and metrics go)")
        for key in ("max_steps", "micro_batch_size", "grad_accum", "keep_last", "log_every", "max_nonfinite"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("save_every", "val_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0 (0 disables), got {getattr(self, key)}")
        if self.save_every_minutes is not None and not self.save_every_minutes > 0:
            raise ValueError(f"save_every_minutes: must be > 0 or null (off), got {self.save_every_minutes}")
        if self.val_batches is not None and self.val_batches < 1:
            raise ValueError(f"val_batches: must be >= 1 or null, got {self.val_batches}")
        if self.lr < 0 or self.scale_lr < 0 or self.weight_decay < 0:
            raise ValueError("lr/scale_lr/weight_decay: must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: expected two values in [0, 1), got {self.betas}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: unknown {self.schedule!r}; expected one of {', '.join(SCHEDULES)}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip: must be > 0 or null (no clipping), got {self.grad_clip}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: unknown {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.dtype == "float16":
            raise ValueError("dtype: float16 is refused: fp16 activations and gradients underflow without "
                             "loss scaling, which this trainer does not do; use bfloat16 (GPUs with bf16 "
                             "support, Ampere and newer) or float32 (older GPUs; what 'auto' picks there)")
        if self.device not in DEVICES:
            raise ValueError(f"device: unknown {self.device!r}; expected one of {', '.join(DEVICES)}")


@dataclass
class DistConfig:
    """Engine choice and its knobs (YAML ``dist:``).

    engine:            ``none`` (one process), ``deepspeed`` (ZeRO 0-3) or ``fsdp2`` (``fully_shard``).
    backend:           torch.distributed backend; ``auto`` = nccl on CUDA, gloo on CPU.
    zero_stage:        DeepSpeed ZeRO stage 0..3 (ignored by the other engines).
    ds_config:         optional DeepSpeed JSON/YAML file; batch sizes, clipping and the optimizer are
                       still taken from ``train:`` (a file that disagrees is an error, not a silent override).
    offload_optimizer: DeepSpeed ZeRO optimizer state (and fp32 masters) on CPU memory.
    ds_optimizer:      ``torch`` (torch.optim.AdamW, nothing compiled) or ``deepspeed`` (FusedAdam on GPU,
                       DeepSpeedCPUAdam when offloaded: faster, JIT-compiled on first use).
    cpu_shm_comm:      build DeepSpeed's shared-memory collectives on CPU (a ~65 s JIT compile on first use).
    reshard_after_forward: FSDP2: free unsharded parameters after forward (re-gathered for backward).
    shard_frozen:      shard the frozen per-layer tensors (Phi0, s0, zero-points) across ranks and gather
                       them per decoder layer just in time (FSDP2 and DeepSpeed ZeRO-3 only); false =
                       replicated on every rank, no communication for frozen weights.
    timeout_minutes:   how long any collective may wait for the other ranks (every engine's process group,
                       gloo and nccl); a rank that died or hangs ends the job after at most this long.
    """

    engine: str = "none"
    backend: str = "auto"
    zero_stage: int = 2
    ds_config: str | None = None
    offload_optimizer: bool = False
    ds_optimizer: str = "torch"
    cpu_shm_comm: bool = False
    reshard_after_forward: bool = True
    shard_frozen: bool = False
    timeout_minutes: float = 30.0

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine: unknown {self.engine!r}; expected one of {', '.join(ENGINES)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.backend not in ("auto", "gloo", "nccl", "mpi", "ccl", "xccl"):
            raise ValueError(f"backend: unknown {self.backend!r}")
        if self.ds_optimizer not in ("torch", "deepspeed"):
            raise ValueError(f"ds_optimizer: expected 'torch' or 'deepspeed', got {self.ds_optimizer!r}")
        if not self.timeout_minutes > 0:
            raise ValueError(f"timeout_minutes: must be > 0, got {self.timeout_minutes}")
        if self.shard_frozen and not (self.engine == "fsdp2" or (self.engine == "deepspeed" and self.zero_stage == 3)):
            where = "one process" if self.engine == "none" else f"deepspeed ZeRO-{self.zero_stage}"
            raise ValueError(f"shard_frozen: needs dist.engine fsdp2 or deepspeed with zero_stage 3, not {where} "
                             "(the frozen weights are only sharded where the trainable ones are fully sharded)")
        if self.offload_optimizer and self.engine == "deepspeed" and self.zero_stage == 0:
            raise ValueError("offload_optimizer: needs dist.zero_stage >= 1")


@dataclass
class EngineConfig:
    """What an engine is built from: the run's ``train:`` and ``dist:`` sections and, per optimizer
    group name, the window ``[start, end)`` of 0-based steps in which its learning rate is on (a
    method's phases, :func:`lrqat_dist.methods.hooks.group_windows`; groups not listed: always on)."""

    train: TrainConfig
    dist: DistConfig = field(default_factory=DistConfig)
    # Required (keyword): an engine built without its method's windows would silently train every
    # group in every phase. Pass ``group_windows(quant)``; ``{}`` for methods without phases.
    lr_windows: dict[str, tuple[int, int | None]] = field(kw_only=True)
