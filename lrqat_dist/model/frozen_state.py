"""The frozen state of a prepared model: everything rebuilt from the base model instead of checkpointed.

That is every persistent buffer training does not rewrite (LR-QAT's Phi0, s0, zero-points, biases;
DL-QAT's weight0; activation-quantizer buffers) and every frozen parameter (embeddings, norms,
lm_head). LoQT's trained buffers (``QuantLinear.trained_buffers``: merged codes, scales, P) are not
frozen state: training rewrites them and checkpoints carry them (``trained_buffers.safetensors``).

Two things here:

- :func:`frozen_state_left_out` - a context in which ``module.state_dict()`` holds the trainable
  parameters only, no buffer, no frozen parameter (used around DeepSpeed's ``save_checkpoint``,
  which saves ``module.state_dict()`` in its model-states files, one per rank under ZeRO-3);
- :func:`frozen_fingerprint` / :func:`check_frozen_fingerprint` - one sha256 per module over the
  bytes (plus names, dtypes and shapes) of its frozen tensors, computed when a run builds its model and
  stored in ``meta.json``; resume and export rebuild the frozen state and compare, so a different
  base-model file, torch version or device cannot silently change Phi0/s0 under the trained A, B, s.

Cost: hashing is linear in the frozen bytes (70B Q4.4: ~69 GB of int8 Phi0 + ~1 GB of bf16
embeddings/norms per rank). sha256 runs at ~0.5-2 GB/s per core; the modules are hashed by a thread
pool (hashlib releases the GIL) and, in a distributed run, split over the ranks (each hashes 1/W of
them, then the digests are gathered), so at 70B on 8 ranks it adds seconds to the build.
"""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .patch import quantized_layers

logger = logging.getLogger(__name__)

FINGERPRINT_FORMAT = "sha256-per-module-v1"
DIGEST_BYTES = 32
OVERRIDE_KEY = "train.accept_changed_base_model"
OVERRIDE_FLAG = "--accept-changed-base-model"


# A model whose frozen buffers are sharded (``dist.shard_frozen``, lrqat_dist/engines/frozen_shard.py) holds
# a ShardedFrozen under this attribute: what the fingerprints need from the full buffers, recorded
# before each layer was sharded (its buffers are then views of storage that is freed at rest).
SHARDED_ATTR = "lrqat_sharded_frozen"


@dataclass
class ShardedFrozen:
    """What the fingerprints read from the full buffers of a sharded model, taken before sharding.

    ``checksums``: full buffer name -> :func:`buffer_checksum` (the cross-rank "same build" check);
    ``digests``: module name -> ``(owner rank, sha256 object over the module's sharded buffers (on the
    owner only, else None), number of them)``: :func:`frozen_fingerprint` finishes it with the module's
    remaining frozen tensors (frozen parameters, which are not sharded), on the owner rank."""

    checksums: dict[str, torch.Tensor] = field(default_factory=dict)
    digests: dict[str, tuple[int, Any, int]] = field(default_factory=dict)


def sharded_record(model: nn.Module) -> ShardedFrozen | None:
    return getattr(model, SHARDED_ATTR, None)


@torch.no_grad()
def buffer_checksum(b: torch.Tensor) -> torch.Tensor:
    """float64 ``[2]``: (sum, position-weighted sum) of a tensor's values (cheap to compare across ranks)."""
    v = b.detach().reshape(-1).double()
    w = torch.arange(1, v.numel() + 1, device=v.device, dtype=torch.float64).remainder_(1021)
    return torch.stack([v.sum(), (v * w).sum()])


class FrozenStateMismatch(ValueError):
    """The frozen state rebuilt from the base model is not the one a checkpoint was trained on."""


# --- leaving buffers out of state dicts ---------------------------------------------------------

@contextmanager
def buffers_left_out(module: nn.Module) -> Iterator[None]:
    """Within the context, every buffer of ``module`` is non-persistent: ``state_dict()`` (and anything
    built on it, e.g. DeepSpeed's ``module_state_dict`` and its saved ``buffer_names``) holds none.
    Afterwards each buffer is persistent again exactly as before; ``load_state_dict(strict=False)``
    leaves the rebuilt buffers in place."""
    added: list[tuple[nn.Module, str]] = []
    for m in module.modules():
        for name, buf in m._buffers.items():
            if buf is not None and name not in m._non_persistent_buffers_set:
                m._non_persistent_buffers_set.add(name)
                added.append((m, name))
    try:
        yield
    finally:
        for m, name in added:
            m._non_persistent_buffers_set.discard(name)


@contextmanager
def frozen_state_left_out(module: nn.Module) -> Iterator[None]:
    """Within the context, ``module.state_dict()`` holds the trainable parameters only: no buffer
    (:func:`buffers_left_out`) and no frozen parameter, tied aliases included. DeepSpeed's
    ``exclude_frozen_parameters`` drops frozen parameters by their ``named_parameters`` name, so the
    alias of a tied frozen embedding (``lm_head.weight``) would stay in its model-states file."""
    keep = {n for n, p in module.named_parameters() if p.requires_grad}

    def drop(mod: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
        for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in keep]:
            del state_dict[key]

    handle = module.register_state_dict_post_hook(drop)
    try:
        with buffers_left_out(module):
            yield
    finally:
        handle.remove()


# --- what is frozen -----------------------------------------------------------------------------

def _trained_buffer_names(model: nn.Module) -> set[str]:
    return {f"{name}.{b}" for name, layer in quantized_layers(model).items() for b in layer.trained_buffers}


def frozen_tensors(model: nn.Module) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """``{module name: [(tensor name, tensor)]}`` of the frozen state each module owns directly, in
    ``named_modules`` order (a tied parameter counts once, at its first owner)."""
    trained = _trained_buffer_names(model)
    seen: set[int] = set()
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for mod_name, mod in model.named_modules():
        items = []
        for n, b in mod.named_buffers(recurse=False):
            full = f"{mod_name}.{n}" if mod_name else n
            if n in mod._non_persistent_buffers_set or full in trained:
                continue  # non-persistent: derived from the config (e.g. rotary inv_freq)
            items.append((n, b))
        for n, p in mod.named_parameters(recurse=False):
            if p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            items.append((n, p))
        if items:
            groups[mod_name or "<root>"] = items
    return groups


def frozen_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for items in frozen_tensors(model).values() for _, t in items)


# --- fingerprint --------------------------------------------------------------------------------

@torch.no_grad()
def hash_items(items: list[tuple[str, torch.Tensor]], h: Any = None) -> Any:
    """``h`` (default a new sha256) updated with each named tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256() if h is None else h
    for name, t in items:
        t = t.detach()
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}|".encode())
        flat = t.reshape(-1).contiguous().cpu()
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h


def _digest(items: list[tuple[str, torch.Tensor]], start: tuple[int, Any, int] | None = None) -> bytes:
    """sha256 of ``items``; ``start``: a :class:`ShardedFrozen` digest entry that already covers the
    first items (hashed before sharding)."""
    if start is None:
        return hash_items(items).digest()
    _, h, done = start
    return hash_items(items[done:], h.copy()).digest()


def _canonical(items: list[tuple[str, torch.Tensor]], param_dtype: torch.dtype | None
               ) -> list[tuple[str, torch.Tensor]]:
    """Frozen float parameters cast to ``param_dtype`` (the dtype the run trained them in): a run
    trained in bf16 and rebuilt in fp32 for export then hashes the same bytes. Buffers do not depend
    on the compute dtype (see :func:`lrqat_dist.model.build_prepared_model`) and are hashed as built."""
    if param_dtype is None:
        return items
    return [(n, t.detach().to(param_dtype) if isinstance(t, nn.Parameter) and t.is_floating_point() else t)
            for n, t in items]


def frozen_fingerprint(model: nn.Module, param_dtype: torch.dtype | None = None, rank: int = 0, world_size: int = 1,
                       all_gather: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
                       threads: int | None = None) -> dict[str, Any]:
    """``{"format", "param_dtype", "modules": {module name: sha256 hex}}`` of the frozen state of an
    unsharded model (call it before an engine shards the parameters).

    ``param_dtype``: the dtype frozen float parameters are hashed in (default: as they are).
    Distributed: rank ``r`` of ``world_size`` hashes modules ``r, r + W, ...`` and ``all_gather``
    (e.g. :meth:`lrqat_dist.engines.DistEnv.all_gather`) collects the digests; every rank returns the
    whole fingerprint. A model with sharded frozen buffers (:class:`ShardedFrozen`) gets the same
    fingerprint as unsharded: its modules' buffer bytes were hashed before sharding, by their owner rank."""
    groups = list(frozen_tensors(model).items())
    record = sharded_record(model)
    pre = {} if record is None else record.digests
    if param_dtype is None:
        floats = {t.dtype for _, items in groups for _, t in items if isinstance(t, nn.Parameter)
                  and t.is_floating_point()}
        param_dtype = next(iter(floats)) if len(floats) == 1 else None
    owner = [pre[name][0] if name in pre else i % world_size for i, (name, _) in enumerate(groups)]
    if any(o >= world_size for o in owner):
        raise ValueError(f"frozen_fingerprint: the frozen buffers were sharded over more than {world_size} ranks")
    mine = [i for i in range(len(groups)) if owner[i] == rank]
    workers = threads or max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        digests = dict(zip(mine, pool.map(
            lambda i: _digest(_canonical(groups[i][1], param_dtype), pre.get(groups[i][0])), mine)))
    table = torch.zeros(len(groups), DIGEST_BYTES, dtype=torch.uint8)
    for i, d in digests.items():
        table[i] = torch.frombuffer(bytearray(d), dtype=torch.uint8)
    if world_size > 1:
        if all_gather is None:
            raise ValueError("frozen_fingerprint: world_size > 1 needs all_gather")
        tables = all_gather(table)
        table = torch.stack([tables[owner[i]][i] for i in range(len(groups))]) if groups else table
    return {"format": FINGERPRINT_FORMAT,
            "param_dtype": None if param_dtype is None else str(param_dtype).replace("torch.", ""),
            "modules": {name: bytes(table[i].tolist()).hex() for i, (name, _) in enumerate(groups)}}


def fingerprint_param_dtype(saved: dict[str, Any] | None) -> torch.dtype | None:
    """The dtype a saved fingerprint hashed frozen float parameters in (to rebuild it comparably)."""
    name = (saved or {}).get("param_dtype")
    return None if name is None else getattr(torch, name)


def first_difference(saved: dict[str, Any], rebuilt: dict[str, Any]) -> tuple[str, int] | None:
    """``(first differing module, number of differing modules)`` in the saved order, or None."""
    a, b = saved.get("modules", {}), rebuilt.get("modules", {})
    bad = [n for n in a if a[n] != b.get(n)] + [n for n in b if n not in a]
    return (bad[0], len(bad)) if bad else None


def check_frozen_fingerprint(saved: dict[str, Any] | None, rebuilt: dict[str, Any] | Callable[[], dict[str, Any]],
                             where: str, accept_changed: bool = False, override: str = OVERRIDE_KEY) -> None:
    """Refuse (:class:`FrozenStateMismatch`) when the rebuilt frozen state differs from the saved
    fingerprint, naming the first differing module and how to override; ``accept_changed``: warn
    instead. ``saved`` None (a checkpoint written before fingerprints existed): warn, do not refuse.
    ``rebuilt`` may be a callable (not called when there is nothing to compare)."""
    if saved is None:
        logger.warning("%s: no frozen-state fingerprint in its meta.json (saved by an older version); cannot "
                       "verify that the frozen buffers rebuilt from the base model are the ones it was trained on",
                       where)
        return
    if saved.get("format") != FINGERPRINT_FORMAT:
        raise FrozenStateMismatch(f"{where}: unknown frozen-state fingerprint format {saved.get('format')!r} "
                                  f"(this version writes {FINGERPRINT_FORMAT!r}); set {override} to skip the check")
    rebuilt = rebuilt() if callable(rebuilt) else rebuilt
    diff = first_difference(saved, rebuilt)
    if diff is None:
        logger.info("%s: frozen state rebuilt from the base model matches the checkpoint's fingerprint "
                    "(%d modules)", where, len(saved["modules"]))
        return
    layer, n = diff
    dtypes = ""
    if saved.get("param_dtype") != rebuilt.get("param_dtype"):
        dtypes = (f" (frozen float parameters were {saved.get('param_dtype')} then, {rebuilt.get('param_dtype')} "
                  "now: train.dtype changed?)")
    msg = (f"{where}: the frozen state rebuilt from the base model (Phi0, s0, zero-points, frozen weights) "
           f"differs from the one this checkpoint was trained on, first at layer {layer!r} ({n} of "
           f"{len(saved['modules'])} modules differ){dtypes}. The base-model file, the quant config, the torch version "
           f"or the device changed; the trained A, B, s would sit on different frozen weights. If you know "
           f"the change is harmless, set {override} to continue anyway")
    if not accept_changed:
        raise FrozenStateMismatch(msg)
    logger.warning("%s (%s is set: continuing)", msg, override)
