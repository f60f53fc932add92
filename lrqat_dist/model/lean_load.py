"""Lean construction of a prepared model: host memory = the prepared model + one weight in flight.

Loading the whole base model, moving it to the device and only then preparing it (the eager path
of :func:`~lrqat_dist.model.build.build_prepared_model`) holds the base model *and* the new Phi0
buffers at once (``prepare`` keeps every replaced ``nn.Linear`` alive until it returns): 13.5 GB
(fp16 LLaMA-2 7B) + 6.5 GB of Q4.4 on a 24 GB GPU before training starts; a 70B model (138 GB in
bf16) cannot be built at all on one 80 GB device, and 8 ranks on one node would each hold it in host
memory. :func:`lean_build` builds the same model without that:

1. the HF model is constructed on the ``meta`` device (no memory);
2. the parameters that are not quantized (embeddings, norms, lm_head) are read straight into their
   final dtype, in row chunks of 8 MiB (so the stored copy of the embedding never exists whole beside
   it), and moved to ``device``; the rotary embedding is rebuilt;
3. :func:`lrqat_dist.prepare` itself runs on that model, with a ``load_linear`` hook: right before
   each quantized linear is converted, only its weight is read from the safetensors file(s) (or, for
   a ``config`` model, drawn from a per-tensor seeded generator) and moved to ``device``, where the
   method's ``from_linear`` range-initialises and downcasts it; the base weight is dropped right away.
   Everything else ``prepare`` does (freezing, activation quantizers, the adapters' random init in
   the same order under the same seed) is the same code as for the eager path.

Peak memory beyond the result: one base weight and its conversion temporaries (measured: about 7x
the weight in fp32 for LR-QAT with min-max range init), or one 8 MiB chunk. For a model directory the
result equals the eager path's bit for bit (parameters, buffers, names, ``requires_grad``;
``tests/test_model_build.py``). A ``config`` model is random-initialised differently from
``from_config`` (normal(0, initializer_range) per tensor from ``(seed, name)``, norms 1) but
deterministically on every rank, one tensor at a time: that is what measurement runs of 7B-70B shapes
need (``build_prepared_model`` random-inits a ``config`` model eagerly, in fp32, to keep its values,
unless asked for ``lean=True``).
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..dtypes import DTYPES, SAFETENSORS_DTYPES
from ..methods import QATConfig
from .loading import build_config
from .patch import prepare


_CHUNK_BYTES = 8 << 20  # casting reads go in row chunks of at most this many (source) bytes


class LeanLoadUnsupported(ValueError):
    """The directory cannot be read tensor by tensor (no safetensors, or keys that differ from the
    model's state dict): load it the ordinary way (``build_prepared_model`` falls back by itself)."""


def lean_loadable(path: str | Path) -> bool:
    """Whether ``path`` is a local HF directory whose weights are safetensors (what lean loading reads)."""
    p = Path(path).expanduser()
    return (p / "config.json").is_file() and ((p / "model.safetensors").is_file()
                                              or (p / "model.safetensors.index.json").is_file())


class _TensorSource:
    """Tensors by state-dict key from a local HF directory's safetensors file(s), opened per read
    (so no file mapping outlives a tensor or chunk and the page cache is not billed to the process)."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: path / f for k, f in weight_map.items()}
        else:
            single = path / "model.safetensors"
            if not single.is_file():
                raise LeanLoadUnsupported(f"{path}: no model.safetensors(.index.json); "
                                          "lean loading reads safetensors only")
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.files = {k: single for k in f.keys()}

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def get(self, key: str, via: torch.dtype | None = None, to: torch.dtype | None = None,
            copy: bool = False) -> torch.Tensor:
        """The tensor cast to ``via`` then ``to`` (float tensors only; each cast skipped when None).

        With a cast, or ``copy`` (for tensors the model keeps), the rows are read in chunks into a
        fresh tensor, so the stored copy of a large tensor (the embedding) never exists whole beside
        it and the result does not hold a mapping of the file (safetensors maps the file lazily: a
        tensor returned as read would keep the file mapped and its pages unread until first use)."""
        from safetensors import safe_open

        path = str(self.files[key])
        with safe_open(path, framework="pt") as f:
            sl = f.get_slice(key)
            shape, stored = sl.get_shape(), SAFETENSORS_DTYPES.get(sl.get_dtype())
            same = via in (None, stored) and to in (None, stored)
            if stored is None or not stored.is_floating_point or (same and not copy):
                return f.get_tensor(key) if not copy else f.get_tensor(key).clone()
        final = to or via or stored
        out = torch.empty(shape, dtype=final)
        row_bytes = max(1, stored.itemsize * (out[0].numel() if out.dim() > 1 else 1))
        step = max(1, _CHUNK_BYTES // row_bytes) if out.dim() > 1 else max(1, _CHUNK_BYTES // stored.itemsize)
        for a in range(0, shape[0] if shape else 1, step):
            with safe_open(path, framework="pt") as f:  # reopened: the mapping of one chunk at a time
                chunk = f.get_slice(key)[a:a + step] if shape else f.get_tensor(key)
            if via is not None:
                chunk = chunk.to(via)
            if shape:
                out[a:a + step] = chunk.to(final)
            else:
                out = chunk.to(final)
        return out


class _RandomSource:
    """Deterministic random weights of a ``config`` model: normal(0, std) per tensor from (seed, key)."""

    def __init__(self, model: nn.Module, std: float, seed: int):
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
        self.std, self.seed = std, seed

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def get(self, key: str, via: torch.dtype | None = None, to: torch.dtype | None = None,
            copy: bool = False) -> torch.Tensor:
        t = self._draw(key)
        return t if to is None else t.to(to)  # drawn in fp32, the stored dtype of a random init

    def _draw(self, key: str) -> torch.Tensor:
        shape = self.shapes[key]
        if key.endswith("norm.weight") or ".norm." in key or key.endswith("layernorm.weight"):
            return torch.ones(shape)
        if key.endswith(".bias"):
            return torch.zeros(shape)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))
        return torch.empty(shape).normal_(0.0, self.std, generator=g)


def _meta_model(config: Any, attn_implementation: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


@torch.no_grad()
def lean_build(quant: QATConfig, path: str | Path | None = None, config: dict | str | Path | None = None,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, init_seed: int = 0,
               attn_implementation: str = "sdpa",
               on_converted: Callable[[nn.Module, str], None] | None = None) -> nn.Module:
    """The prepared model of ``build_prepared_model`` (same arguments), built one
    linear at a time: peak host memory = the prepared model (when ``device`` is the CPU) + one base
    weight (and its range-init temporaries) in flight; on a GPU the host holds one tensor at a time.

    ``path``: a local HF directory with safetensors weights (the result equals the eager build's bit
    for bit); ``config``: a config dict / config.json for a deterministic random init (normal(0,
    initializer_range) per tensor from ``(init_seed, name)``, norms 1; not ``from_config``'s values).
    """
    if (path is None) == (config is None):
        raise ValueError("lean_build: give exactly one of path (local HF directory) or config (random init)")
    device = torch.device(device)
    if path is not None:
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"lean_build: path {path} is not a local HF model directory (no config.json)")
        cfg = build_config(path)
        source: Any = _TensorSource(path)
        # what from_pretrained(dtype="auto") holds: the config's dtype (None: as stored in the file)
        stored = cfg.dtype if isinstance(cfg.dtype, torch.dtype) else DTYPES.get(str(cfg.dtype), None)
    else:
        cfg = build_config(config)
        source = None
        stored = torch.float32  # the eager build random-inits in fp32
    model = _meta_model(cfg, attn_implementation)
    if path is not None:  # what from_pretrained also sets (exports write generation_config.json from it)
        model.config._name_or_path = str(path)
        if (path / "generation_config.json").is_file():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(path)
    if source is None:
        source = _RandomSource(model, float(getattr(cfg, "initializer_range", 0.02)), init_seed)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    missing = [k for k, _ in list(model.named_parameters(remove_duplicate=False))
               if k not in source and not (tied and k == "lm_head.weight")]
    if missing:
        raise LeanLoadUnsupported(f"lean_build: {path}: weights missing under the model's names: {missing[:5]}")

    # 1. everything prepare does not convert, straight into its final dtype (frozen: the compute dtype,
    #    as the eager build casts after prepare; trained with train_unquantized: kept in the stored dtype)
    targets = set(quant.targets)
    keep_stored = bool(getattr(quant, "train_unquantized", False))
    for pname, p in list(model.named_parameters(remove_duplicate=False)):
        mod_name, _, attr = pname.rpartition(".")
        module = model.get_submodule(mod_name)
        if type(module) is nn.Linear and mod_name.rpartition(".")[2] in targets:
            continue  # converted by prepare below
        if tied and pname == "lm_head.weight" and pname not in source:
            continue  # tied below
        t = source.get(pname, via=stored, to=None if keep_stored else dtype, copy=True)
        setattr(module, attr, nn.Parameter(t.to(device), requires_grad=False))
    if tied and hasattr(model, "lm_head"):
        model.lm_head.weight = model.get_input_embeddings().weight
    for mod_name, module in list(model.named_modules()):
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            if "rotary" not in type(module).__name__.lower():
                raise ValueError(f"lean_build: cannot rebuild the meta buffers of {mod_name} ({type(module).__name__})")
            # built on the CPU then moved, as from_pretrained + .to(device) does (a GPU pow may differ by an ulp)
            model.set_submodule(mod_name, type(module)(config=module.config).to(device))

    # 2. prepare, reading each quantized linear's weight only when it is converted
    def load_linear(name: str, meta: nn.Linear) -> nn.Linear:
        linear = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None, device="meta")
        linear.weight = nn.Parameter(source.get(f"{name}.weight", via=stored).to(device), requires_grad=False)
        if meta.bias is not None:
            linear.bias = nn.Parameter(source.get(f"{name}.bias", via=stored).to(device), requires_grad=False)
        return linear

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)  # the adapters' random init, as the eager build
        prepare(model, quant, load_linear=load_linear, on_converted=on_converted)
    for p in model.parameters():  # as the eager build: remaining frozen floats in the compute dtype
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise ValueError(f"lean_build: tensors left on the meta device: {leftovers[:5]}")
    model.config.use_cache = False
    return model
