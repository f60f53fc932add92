"""Building the parts a run needs from its config: tokenizer and the prepared model (device and dtype
are resolved by :mod:`lrqat_dist.engines.env`).

:func:`build_model` is the one way to get the model a run trains from a run's config: an adapter
over :func:`lrqat_dist.model.build_prepared_model` (the library's one builder). The export side calls it too, to
rebuild the frozen buffers (Phi0, s0, zero-points) from the base model, then loads the trainable
tensors of a checkpoint on top (see docs/config.md, "Checkpoint layout").
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engines.env import resolve_dtype
from ..model import build_prepared_model
from ..model.frozen_state import buffer_checksum, sharded_record
from .config import JobConfig

logger = logging.getLogger(__name__)

TOKENIZER_CACHE_MARKER = "lrqat_tokenizer_source.json"


def resolve_path(spec: str) -> Path:
    """A filesystem path, or ``pkg:PACKAGE/rel/path`` = a file inside an installed Python package."""
    if not spec.startswith("pkg:"):
        return Path(spec).expanduser()
    package, _, rel = spec[4:].partition("/")
    found = importlib.util.find_spec(package) if package else None
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{spec}: no installed package {package!r} (pip install it, or give a local path)")
    return Path(list(found.submodule_search_locations)[0]) / rel


def build_tokenizer(cfg: JobConfig, cache_dir: Path | None = None) -> Any:
    """Load the tokenizer named by ``model.tokenizer`` (default ``model.path``); offline only.

    A ``.gguf`` source is slow to parse (seconds): with ``cache_dir`` the first call saves the
    tokenizer there and later calls (other ranks, resumed runs) load that copy.
    """
    from transformers import AutoTokenizer

    source = cfg.model.tokenizer or cfg.model.path
    if cache_dir is not None:
        marker = cache_dir / TOKENIZER_CACHE_MARKER
        if marker.is_file() and json.loads(marker.read_text()).get("source") == source:
            return AutoTokenizer.from_pretrained(cache_dir, local_files_only=True)
    path = resolve_path(source)
    if not path.exists():
        raise FileNotFoundError(f"model.tokenizer: {path} does not exist")
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    else:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if cache_dir is not None and path.suffix == ".gguf":
        cache_dir.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(cache_dir)
        (cache_dir / TOKENIZER_CACHE_MARKER).write_text(json.dumps({"source": source}))
    return tok


def build_model(cfg: JobConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                shard_frozen: bool = False) -> nn.Module:
    """The prepared (quantized, frozen except A, B, s) model of ``cfg``, deterministic given ``cfg``:
    :func:`lrqat_dist.model.build_prepared_model` of the ``model:`` and ``quant:`` sections.

    ``dtype`` (default: ``train.dtype`` resolved for ``device``) is the compute dtype of the frozen
    floats. Every rank must call this with the same config: buffers are not broadcast. A local
    safetensors directory is built one weight at a time (``lrqat_dist.model.lean_load``, same result
    bit for bit): the whole float model is never on the device, nor on the host beside the result.
    ``shard_frozen`` (the trainer passes ``dist.shard_frozen``; export, consolidation and the tools
    rebuild unsharded, in one process): each decoder layer's frozen buffers are sharded over the ranks
    of the default process group as soon as the layer is built (:mod:`lrqat_dist.engines.frozen_shard`;
    call it after the engine's ``setup``).
    """
    device = torch.device(device)
    dtype = dtype or resolve_dtype(cfg.train, device)
    act = cfg.quant.activations
    if act is not None and act.mode == "static":
        # Static ranges need data (calibrate_activations) before the first step and a place in the
        # checkpoint; the trainer does neither yet, so refuse instead of training on default ranges.
        raise ValueError("quant.activations.mode: 'static' is supported by the Python API only "
                         "(prepare, lrqat_dist.model.activations.calibrate_activations, your loop); the "
                         "trainer runs mode 'dynamic'")
    m = cfg.model
    sharder = None
    if shard_frozen:  # each decoder layer keeps only this rank's shard as soon as it is built
        from ..engines.frozen_shard import FrozenSharder

        sharder = FrozenSharder(list(cfg.quant.targets))
    model = build_prepared_model(cfg.quant, path=None if m.path is None else resolve_path(m.path), config=m.config,
                                 init_seed=m.init_seed, attn_implementation=m.attn_implementation, device=device,
                                 dtype=dtype, on_converted=None if sharder is None else sharder.on_converted)
    if sharder is not None:
        sharder.finish(model)
    return model


def build_train_model(cfg: JobConfig, device: torch.device | str) -> nn.Module:
    """The model a training run builds: :func:`build_model`, sharding the frozen buffers when
    ``dist.shard_frozen`` is set."""
    return build_model(cfg, device, shard_frozen=cfg.dist.shard_frozen)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant: works under FSDP2 and ZeRO-3)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.activation_checkpointing: {type(model).__name__} does not support it")
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that train, in ``named_parameters`` order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def buffer_fingerprint(model: nn.Module) -> torch.Tensor:
    """float64 ``[n_buffers, 2]`` (sum, position-weighted sum) of every buffer: cheap to compare across ranks.
    Sharded buffers (``dist.shard_frozen``) count with the checksums of their full tensors, taken before
    sharding, so the check still compares what every rank built."""
    record = sharded_record(model)
    pre = {} if record is None else record.checksums
    rows = []
    for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
        rows.append(pre[name].to(b.device) if name in pre else buffer_checksum(b))
    return torch.stack(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)
