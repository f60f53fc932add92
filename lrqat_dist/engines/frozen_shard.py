"""``dist.shard_frozen``: the frozen per-layer tensors sharded over the ranks, gathered per decoder layer
just in time.

What is sharded: every persistent buffer of every :class:`~lrqat_dist.methods.QuantLinear` inside a
decoder layer (LR-QAT's Phi0 in any storage format, packed INT4 included, s0, zero-points, biases;
DL-QAT's W0; PEQA's codes). Parameters are not touched (A, B, s stay the only trained tensors, sharded
by the engine). Methods whose training rewrites buffers (``trained_buffers``: LoQT) are refused.

Layout, per decoder layer: the bytes of its frozen buffers are laid out in one flat ``uint8`` tensor
``full`` (each entry at a 16-byte aligned offset, the total padded to a multiple of ``16 * world``);
each rank keeps only its contiguous chunk ``shard`` (its own storage), and each module buffer becomes a
typed view ``full[off:off + n].view(dtype).view(shape)``. Freeing a layer is
``full.untyped_storage().resize_(0)``; gathering is ``resize_`` + ``all_gather_single(full, shard)``
(torch 2.13's name of ``all_gather_into_tensor``; gloo and nccl). The views, and any reference autograd
saved to them, stay valid across free and re-gather (FSDP2's own trick for its unsharded parameters).

Building (:class:`FrozenSharder`): the layers are sharded while they are built, right after the last
quantized linear of a layer is converted (``prepare``'s ``on_converted``), with no communication
(every rank builds every layer, as in replicated mode, and keeps its chunk). Before a layer's full
bytes are dropped, the sharder records what the fingerprints need from them: the cross-rank check's
per-buffer checksums and the sha256 of each module this rank hashes
(:class:`lrqat_dist.model.frozen_state.ShardedFrozen`), so both fingerprints equal the replicated
run's and checkpoints are interchangeable between modes and world sizes.

Schedule (:class:`FrozenShards`, hooks on each decoder layer):

- forward pre-hook: the layer is gathered (waiting for its prefetch if one is in flight); with
  ``prefetch`` the next layer's gather is started asynchronously;
- forward post-hook: the layer is freed; when the forward records a graph, a hook on the layer's output
  gradient re-gathers it right before the layer's backward (and prefetches the layer before it),
  pins it (so an activation-checkpointing recompute's post-hook keeps it), and frees every other
  gathered layer;
- end of backward (an autograd engine callback): every layer is freed.

So at rest (between steps) each rank holds only its shards: ``1/world`` of the replicated bytes (plus
padding); during a forward or backward at most 1 gathered layer, 2 with prefetch (the default).
:func:`frozen_memory` reports both (resident now, peak since the last reset).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from ..methods import QuantLinear
from ..model.frozen_state import SHARDED_ATTR, ShardedFrozen, buffer_checksum, hash_items
from .base import decoder_layers

logger = logging.getLogger(__name__)

ALIGN = 16  # bytes: every entry's offset, so that any dtype view of it is aligned
SHARDS_ATTR = "_lrqat_frozen_shards"  # the FrozenShards object of a sharded model


def _frozen_buffers(module: QuantLinear) -> list[tuple[str, torch.Tensor]]:
    """The frozen per-layer tensors of ``module``: its persistent buffers that training does not rewrite."""
    return [(n, b) for n, b in module.named_buffers(recurse=False)
            if n not in module._non_persistent_buffers_set and n not in module.trained_buffers]


def _sharded_buffers(module: QuantLinear, name: str) -> list[tuple[str, torch.Tensor]]:
    """The buffers of ``module`` that are sharded: all of them, which must be frozen."""
    if module.trained_buffers:
        raise ValueError(f"dist.shard_frozen: {name} ({type(module).__name__}) rewrites its buffers "
                         f"{list(module.trained_buffers)} during training (LoQT); only frozen buffers can be "
                         "sharded: set dist.shard_frozen=false for this method")
    return _frozen_buffers(module)


@dataclass
class _Entry:
    module: nn.Module
    attr: str
    offset: int
    nbytes: int


@dataclass
class LayerShard:
    """One decoder layer's frozen buffers: ``full`` (the views' storage, freed at rest) and ``shard``."""

    index: int
    name: str
    full: torch.Tensor
    shard: torch.Tensor
    entries: list[_Entry]
    group: Any = None
    work: Any = None  # in-flight async all-gather
    pinned: bool = False  # in backward: kept gathered through a recompute's post-hook

    @property
    def padded(self) -> int:
        return self.full.numel()

    @property
    def resident(self) -> bool:
        return self.full.untyped_storage().nbytes() > 0

    def gather(self, async_op: bool = False) -> None:
        if self.resident:
            return
        self.full.untyped_storage().resize_(self.padded)
        self.work = _all_gather(self.full, self.shard, self.group, async_op)
        if not async_op:
            self.work = None

    def ensure(self) -> None:
        """Gathered and complete (waits for a prefetch); checks the buffers still view ``full``."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        elif not self.resident:
            self.gather()
        else:
            return
        self._check_views()

    def free(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.work = None
        self.pinned = False
        if self.resident:
            self.full.untyped_storage().resize_(0)

    def _check_views(self) -> None:
        ptr = self.full.untyped_storage().data_ptr()
        for e in self.entries:
            buf = e.module._buffers.get(e.attr)
            if buf is None or buf.untyped_storage().data_ptr() != ptr:
                raise RuntimeError(f"dist.shard_frozen: buffer {e.attr!r} of {self.name} no longer views the "
                                   "layer's shared storage (replaced or moved, e.g. by a .to() after sharding); "
                                   "move the model before it is sharded")


def _all_gather(out: torch.Tensor, shard: torch.Tensor, group: Any, async_op: bool) -> Any:
    """``out`` = the ranks' ``shard`` s concatenated (``all_gather_single``: torch >= 2.13's name)."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, shard, group=group, async_op=async_op)


def shard_layer(name: str, index: int, layer: nn.Module, rank: int, world: int, group: Any = None,
                record: ShardedFrozen | None = None, owner: Callable[[str], int] | None = None) -> LayerShard:
    """Shard the frozen buffers of the quantized linears of one decoder layer (no communication: this
    rank keeps its chunk of what it built). With ``record``: first store the full buffers' checksums
    and, for the modules ``owner(name) == rank``, the sha256 of their frozen buffers."""
    prefix = f"{name}." if name else ""
    modules = [(f"{prefix}{n}", m) for n, m in layer.named_modules() if isinstance(m, QuantLinear)]
    items = [(mname, m, _sharded_buffers(m, mname)) for mname, m in modules]
    device = next((b.device for _, _, bufs in items for _, b in bufs), torch.device("cpu"))
    offset, layout = 0, []
    for mname, m, bufs in items:
        for bname, b in bufs:
            n = b.numel() * b.element_size()
            layout.append((mname, m, bname, offset, n))
            offset += -(-n // ALIGN) * ALIGN
    padded = max(ALIGN * world, -(-offset // (ALIGN * world)) * (ALIGN * world))
    full = torch.zeros(padded, dtype=torch.uint8, device=device)
    if record is not None:
        for mname, m, bufs in items:
            for bname, b in bufs:
                record.checksums[f"{mname}.{bname}"] = buffer_checksum(b)
            if owner is not None and owner(mname) == rank:
                record.digests[mname] = (rank, hash_items(bufs), len(bufs))
            elif owner is not None:
                record.digests[mname] = (owner(mname), None, len(bufs))
    entries = []
    for mname, m, bname, off, n in layout:
        b = m._buffers[bname]
        view = full[off:off + n]
        view.copy_(b.detach().contiguous().reshape(-1).view(torch.uint8))
        m._buffers[bname] = view.view(b.dtype).view(b.shape)  # the built tensor is dropped here
        entries.append(_Entry(m, bname, off, n))
    chunk = padded // world
    shard = full[rank * chunk:(rank + 1) * chunk].clone()
    full.untyped_storage().resize_(0)
    return LayerShard(index, name, full, shard, entries, group)


class FrozenShards:
    """The sharded layers of one model and the hooks that gather and free them (see the module doc)."""

    def __init__(self, layers: list[tuple[nn.Module, LayerShard]], prefetch: bool = True):
        self.layers = [s for _, s in layers]
        self.prefetch = prefetch
        self.in_backward = False
        self.peak = 0
        self.handles = []
        for module, s in layers:
            self.handles.append(module.register_forward_pre_hook(self._hook_pre(s.index)))
            self.handles.append(module.register_forward_hook(self._hook_post(s.index)))

    # --- bytes ------------------------------------------------------------------------------------
    def shard_bytes(self) -> int:
        return sum(s.shard.untyped_storage().nbytes() for s in self.layers)

    def resident_bytes(self) -> int:
        """Bytes held now: every shard plus every gathered (or being gathered) layer."""
        return self.shard_bytes() + sum(s.full.untyped_storage().nbytes() for s in self.layers)

    def _track(self) -> None:
        self.peak = max(self.peak, self.resident_bytes())

    # --- hooks --------------------------------------------------------------------------------------
    def _hook_pre(self, i: int):
        def pre(module, args):
            if self.in_backward and torch._C._current_graph_task_id() == -1:
                self._reset_after_aborted_backward()
            s = self.layers[i]
            s.ensure()
            if self.prefetch and not self.in_backward and i + 1 < len(self.layers):
                self.layers[i + 1].gather(async_op=True)
            self._track()
        return pre

    def _hook_post(self, i: int):
        def post(module, args, output):
            s = self.layers[i]
            if s.pinned:  # the recompute of activation checkpointing, inside this layer's backward
                return None
            if torch.is_grad_enabled():
                t = _first_grad_tensor(output)
                if t is not None:
                    t.register_hook(self._hook_backward(i))
            s.free()
            return None
        return post

    def _hook_backward(self, i: int):
        def before_backward(grad):
            if not self.in_backward:
                self.in_backward = True
                torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
            keep = {i, i - 1} if self.prefetch else {i}
            for j, other in enumerate(self.layers):
                if j not in keep and (other.resident or other.work is not None):
                    other.free()
            s = self.layers[i]
            s.ensure()
            s.pinned = True
            if self.prefetch and i > 0:
                self.layers[i - 1].gather(async_op=True)
            self._track()
            return None
        return before_backward

    def _end_backward(self) -> None:
        self.in_backward = False
        self.free_all()

    def _reset_after_aborted_backward(self) -> None:
        # A backward that raised (e.g. out of memory) never ran _end_backward: a forward outside any
        # backward finds in_backward still set. Free (and so unpin) everything, or layers would stay
        # gathered and pinned for good and forward prefetch would stay off.
        logger.warning("frozen shards: the previous backward did not finish; freeing its gathered layers")
        self._end_backward()

    def free_all(self) -> None:
        for s in self.layers:
            s.free()

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Every layer gathered inside, freed on exit (collective: every rank enters it). For code that
        reads the frozen buffers outside a forward, e.g. an in-process ``fold`` of the trained model:
        at rest they view freed storage, and reading them there is undefined (may crash)."""
        try:
            for s in self.layers:
                s.ensure()
            yield
        finally:
            self.free_all()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _first_grad_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    if isinstance(output, (tuple, list)):
        for o in output:
            t = _first_grad_tensor(o)
            if t is not None:
                return t
    if isinstance(output, dict):
        for o in output.values():
            t = _first_grad_tensor(o)
            if t is not None:
                return t
    return None


@dataclass
class FrozenSharder:
    """Shards a model's decoder layers while it is built: pass :meth:`on_converted` to ``prepare``
    (through ``build_prepared_model``), then call :meth:`finish` on the built model.

    ``rank``/``world``/``group``: default the current process group's."""

    targets: list[str]
    prefetch: bool = True
    rank: int | None = None
    world: int | None = None
    group: Any = None
    _layers: dict[str, tuple[int, nn.Module]] = field(default_factory=dict)
    _left: dict[str, int] = field(default_factory=dict)
    _done: dict[str, LayerShard] = field(default_factory=dict)
    _ordinal: dict[str, int] = field(default_factory=dict)
    _model_id: int | None = None
    record: ShardedFrozen = field(default_factory=ShardedFrozen)

    def __post_init__(self):
        if self.rank is None:
            self.rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        if self.world is None:
            self.world = dist.get_world_size(self.group) if dist.is_initialized() else 1

    def _index(self, model: nn.Module) -> None:
        if self._layers and self._model_id == id(model):
            return
        if self._done:
            raise RuntimeError("dist.shard_frozen: the model changed after some of its layers were sharded")
        self._model_id = id(model)
        self._layers, self._left = {}, {}
        ids = {id(m): i for i, m in enumerate(decoder_layers(model))}
        targets = set(self.targets)
        for name, m in model.named_modules():
            if id(m) in ids:
                self._layers[name] = (ids[id(m)], m)
                self._left[name] = sum(1 for n, c in m.named_modules()
                                       if isinstance(c, QuantLinear)
                                       or (type(c) is nn.Linear and n.rpartition(".")[2] in targets))
        # which rank hashes which quantized linear (round robin over all of them, in model order)
        names = [n for n, m in model.named_modules()
                 if isinstance(m, QuantLinear) or (type(m) is nn.Linear and n.rpartition(".")[2] in targets)]
        self._ordinal = {n: i for i, n in enumerate(names)}

    def _layer_of(self, name: str) -> str | None:
        best = None
        for lname in self._layers:
            if name.startswith(f"{lname}.") and (best is None or len(lname) > len(best)):
                best = lname
        return best

    def _owner(self, module_name: str) -> int:
        return self._ordinal.get(module_name, 0) % self.world

    def on_converted(self, model: nn.Module, name: str) -> None:
        """``prepare``'s callback after converting the linear ``name``: shard its layer once complete."""
        self._index(model)
        lname = self._layer_of(name)
        if lname is None:
            return
        self._left[lname] -= 1
        if self._left[lname] == 0:
            self._shard(lname)

    def _shard(self, lname: str) -> None:
        index, layer = self._layers[lname]
        self._done[lname] = shard_layer(lname, index, layer, self.rank, self.world, self.group, self.record,
                                        self._owner)

    def finish(self, model: nn.Module) -> FrozenShards:
        """Shard what is left (a model built without the callback), install the hooks, mark the model."""
        self._index(model)
        for lname in self._layers:
            if lname not in self._done:
                self._shard(lname)
        outside = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and self._layer_of(n) is None]
        if outside:
            logger.warning("dist.shard_frozen: %d quantized linears outside the decoder layers stay replicated "
                           "(e.g. %s)", len(outside), outside[0])
        order = sorted(self._done.values(), key=lambda s: s.index)
        mods = {lname: m for lname, (_, m) in self._layers.items()}
        shards = FrozenShards([(mods[s.name], s) for s in order], prefetch=self.prefetch)
        setattr(model, SHARDS_ATTR, shards)
        setattr(model, SHARDED_ATTR, self.record)
        full = sum(e.nbytes for s in order for e in s.entries)
        logger.info("dist.shard_frozen: %d decoder layers, frozen per-layer bytes %.1f MiB replicated, %.1f MiB "
                    "held by this rank (shard %d of %d)", len(order), full / 2**20, shards.shard_bytes() / 2**20,
                    self.rank, self.world)
        return shards


def frozen_shards(model: nn.Module) -> FrozenShards | None:
    """The :class:`FrozenShards` of a model built with ``dist.shard_frozen`` (None: replicated)."""
    return getattr(model, SHARDS_ATTR, None)


def frozen_memory(model: nn.Module) -> dict[str, int]:
    """This rank's bytes of frozen per-layer tensors (the persistent buffers of the quantized linears):

    - ``resident``: the storage held now (sharded: the shards plus any gathered layer; replicated: the
      buffers' storages), each storage counted once;
    - ``peak``: the most held at once since :func:`reset_frozen_peak` (sharded: measured at every
      gather; replicated: = ``resident``, nothing changes);
    - ``full``: the bytes of those tensors, unsharded (what replicated mode holds on every rank).
    """
    full = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantLinear)
               for _, b in _frozen_buffers(m))
    shards = frozen_shards(model)
    if shards is None:
        seen: dict[int, int] = {}
        for m in model.modules():
            if isinstance(m, QuantLinear):
                for _, b in _frozen_buffers(m):
                    st = b.untyped_storage()
                    seen[st.data_ptr()] = st.nbytes()
        resident = sum(seen.values())
        return {"resident": resident, "peak": resident, "full": full}
    return {"resident": shards.resident_bytes(), "peak": max(shards.peak, shards.resident_bytes()), "full": full}


def reset_frozen_peak(model: nn.Module) -> None:
    shards = frozen_shards(model)
    if shards is not None:
        shards.peak = shards.resident_bytes()


__all__ = ["FrozenSharder", "FrozenShards", "LayerShard", "frozen_memory", "frozen_shards", "reset_frozen_peak",
           "shard_layer"]
