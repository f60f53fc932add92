"""Writing and reading HF-style checkpoint directories: sharded safetensors, config, tokenizer.

Every export format writes through :class:`ShardWriter` (memory stays at about one shard plus one
layer, whatever the model size) into a staging directory that is renamed into place only after the
export has been verified, so a refused or failed export never leaves a half-written checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import json
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..dtypes import dtype_name

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class ShardWriter:
    """Streams named tensors into ``<basename>.safetensors`` or, past ``max_shard_bytes``,
    ``<basename>-0000i-of-0000N.safetensors`` plus ``<basename>.safetensors.index.json`` (HF layout)."""

    def __init__(self, out_dir: Path, basename: str = "model", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir, self.basename, self.max_shard_bytes = Path(out_dir), basename, max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._total_bytes = 0
        self._names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"export: tensor {name!r} written twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # Own contiguous CPU copy: safetensors refuses shared or strided storage.
        self._pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += nbytes
        self._total_bytes += nbytes

    def _flush(self) -> None:
        i = len(self._shards)
        save_file(self._pending, str(self.out_dir / f".{self.basename}-shard{i}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard, give the shards their final names; returns the file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        names = ([f"{self.basename}.safetensors"] if n == 1 else
                 [f"{self.basename}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        for i, final in enumerate(names):
            (self.out_dir / f".{self.basename}-shard{i}.tmp").rename(self.out_dir / final)
        if n > 1:
            index = {"metadata": {"total_size": self._total_bytes},
                     "weight_map": {t: names[i] for i, shard in enumerate(self._shards) for t in shard}}
            (self.out_dir / f"{self.basename}.safetensors.index.json").write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names


class SafetensorsDir:
    """Read access by name to the tensors of ``<basename>.safetensors`` (single file or sharded)."""

    def __init__(self, directory: str | Path, basename: str = "model"):
        self.dir = Path(directory)
        index = self.dir / f"{basename}.safetensors.index.json"
        single = self.dir / f"{basename}.safetensors"
        if index.is_file():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(str(single), "pt") as f:
                self.weight_map = {k: single.name for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.dir}: no {single.name} or {index.name}")
        self._open: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: no tensor {name!r} in the checkpoint")
        fname = self.weight_map[name]
        if fname not in self._open:  # one (memory-mapped) handle per file, not one per tensor
            self._open[fname] = safe_open(str(self.dir / fname), "pt")
        return self._open[fname].get_tensor(name)


def dense_state_dict(model: nn.Module, quantized: list[str]) -> dict[str, torch.Tensor]:
    """The model's state dict without the quantized layers' own entries and without tied duplicates,
    keyed as the HF checkpoint expects (the name transformers keeps for a tied weight)."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from ..model.activations import activation_state_prefixes

    # Activation quantizers' state (static ranges) is no HF weight: formats that carry it store it apart.
    prefixes = tuple(f"{n}." for n in quantized) + activation_state_prefixes(model)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    return remove_tied_weights_from_state_dict(sd, model)


def unquantized_linears(model: nn.Module, quantized: list[str]) -> list[str]:
    """Names of the plain ``nn.Linear`` modules left in full precision (e.g. ``lm_head``)."""
    done = set(quantized)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in done]


def save_config(model: nn.Module, out_dir: Path, dtype: torch.dtype) -> None:
    """``config.json`` (no quantization_config, ``dtype`` = export dtype) and ``generation_config.json``."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # e.g. left over from a GGUF import
    config.dtype = dtype_name(dtype)
    config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(out_dir)


def save_tokenizer(tokenizer, out_dir: Path) -> str:
    """Save a tokenizer object, or the tokenizer found in a local directory; returns a one-line note."""
    if tokenizer is None:
        return "no tokenizer given: the export has no tokenizer files"
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
    files = tokenizer.save_pretrained(str(out_dir))
    return f"tokenizer saved ({', '.join(sorted(Path(f).name for f in files))})"


@contextlib.contextmanager
def staging_dir(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield ``<out>.partial``; on success it replaces ``out``, on any exception it is removed."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"export: {out} exists and is not empty; choose another --out or pass overwrite")
    stage = out.with_name(out.name + ".partial")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)
