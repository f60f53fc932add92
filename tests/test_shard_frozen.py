"""``dist.shard_frozen`` in one process (lrqat_dist/engines/frozen_shard.py): sharding at build time, the
fingerprints, the gather/free schedule (forward, backward, activation checkpointing, no-grad), bytes.

The multi-process runs (FSDP2 and ZeRO-3, 2 and 4 ranks, resume, export) are in test_shard_frozen_dist.py.
Here a 1-rank gloo group runs the hooks; sharding itself does no communication, so builds "as rank r
of W" are checked without a process group.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lrqat_dist.engines.base import decoder_layers, next_token_loss
from lrqat_dist.engines.frozen_shard import ALIGN, FrozenSharder, frozen_memory, frozen_shards, reset_frozen_peak
from lrqat_dist.methods import QuantLinear
from lrqat_dist.model import build_prepared_model, load_causal_lm
from lrqat_dist.model.frozen_state import frozen_fingerprint
from lrqat_dist.train.build import buffer_fingerprint, build_model, enable_activation_checkpointing
from lrqat_dist.train.config import config_from_dict
from train_common import job_dict

DOWNCASTS = ["fixed", "int-packed"]


@pytest.fixture
def one_rank_group():
    """A 1-rank gloo process group for the gather hooks, torn down afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _cfg(tmp_path, downcast: str, shard: bool = True, **quant):
    return config_from_dict(job_dict(tmp_path, dist={"engine": "fsdp2", "shard_frozen": shard},
                                     quant={"downcast": downcast, **quant}))


def _frozen_buffers(model):
    return {f"{n}.{b}": t for n, m in model.named_modules() if isinstance(m, QuantLinear)
            for b, t in m.named_buffers(recurse=False)}


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    loss = next_token_loss(logits, ids)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method,downcast", [("lrqat", "fixed"), ("lrqat", "int-packed"), ("dlqat", "fixed"),
                                             ("peqa", "fixed")])
def test_sharded_model_computes_the_replicated_bits(tmp_path, one_rank_group, method, downcast):
    """Same logits and gradients, bit for bit, with and without activation checkpointing and in a
    no-grad forward; the fingerprints equal the replicated build's; nothing stays gathered at rest."""
    extra = {"dlqat_phase1_steps": 0} if method == "dlqat" else {}  # phase 2: A, B, m get gradients
    cfg = _cfg(tmp_path, downcast, method=method, **extra)
    rep = build_model(cfg, "cpu")
    sh = build_model(cfg, "cpu", shard_frozen=True)
    shards = frozen_shards(sh)
    assert shards is not None and frozen_shards(rep) is None
    assert len(shards.layers) == len(decoder_layers(sh)) == 2
    assert torch.equal(buffer_fingerprint(sh), buffer_fingerprint(rep))
    assert frozen_fingerprint(sh, torch.float32) == frozen_fingerprint(rep, torch.float32)
    if downcast == "int-packed":
        assert any(t.dtype == torch.uint8 for t in _frozen_buffers(sh).values())  # packed INT4 Phi0 is sharded
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(0))
    for checkpointing in (False, True):
        if checkpointing:
            enable_activation_checkpointing(rep)
            enable_activation_checkpointing(sh)
        reset_frozen_peak(sh)
        (lr, gr), (ls, gs) = _step(rep, ids), _step(sh, ids)
        assert torch.equal(lr, ls)
        assert gr.keys() == gs.keys() and all(torch.equal(gr[n], gs[n]) for n in gr)
        mem = frozen_memory(sh)
        assert all(not s.resident for s in shards.layers)  # freed at the end of backward
        assert mem["resident"] == shards.shard_bytes()
        # prefetch: at most 2 layers gathered at once (here: both of the 2)
        assert mem["peak"] == shards.shard_bytes() + sum(s.padded for s in shards.layers)
    with torch.no_grad():
        assert torch.equal(rep(input_ids=ids).logits, sh(input_ids=ids).logits)
    assert all(not s.resident for s in shards.layers)
    # the views survive free / re-gather and a .to() to the device they are on
    sh.to("cpu")
    layer = shards.layers[0]
    layer.ensure()
    buffers = _frozen_buffers(sh)
    mine = [n for n in buffers if n.startswith(f"{layer.name}.")]
    assert len(mine) >= 7
    assert all(buffers[n].untyped_storage().data_ptr() == layer.full.untyped_storage().data_ptr() for n in mine)
    replicated = _frozen_buffers(rep)
    assert all(torch.equal(buffers[n], replicated[n]) for n in mine)
    layer.free()


def test_without_prefetch_one_layer_is_gathered_at_a_time(tmp_path, one_rank_group):
    cfg = _cfg(tmp_path, "fixed")
    rep = build_model(cfg, "cpu")
    sh = build_model(cfg, "cpu", shard_frozen=True)
    shards = frozen_shards(sh)
    shards.prefetch = False
    ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(1))
    reset_frozen_peak(sh)
    (lr, gr), (ls, gs) = _step(rep, ids), _step(sh, ids)
    assert torch.equal(lr, ls) and all(torch.equal(gr[n], gs[n]) for n in gr)
    assert frozen_memory(sh)["peak"] == shards.shard_bytes() + max(s.padded for s in shards.layers)


def test_a_backward_that_raised_leaves_nothing_gathered_for_the_next_step(tmp_path, one_rank_group):
    """A backward aborted mid-way (an exception in a gradient hook, as an OOM would be) never reaches its
    end-of-backward callback; the next forward notices, frees and unpins, and the next step is exact."""
    cfg = _cfg(tmp_path, "fixed")
    rep, sh = build_model(cfg, "cpu"), build_model(cfg, "cpu", shard_frozen=True)
    shards = frozen_shards(sh)
    ids = torch.randint(0, 1024, (1, 16), generator=torch.Generator().manual_seed(2))

    def boom(grad):
        raise RuntimeError("simulated failure in backward")

    loss = next_token_loss(sh(input_ids=ids).logits, ids)
    sh.model.layers[0].self_attn.q_proj.lora_B.register_hook(boom)  # fires after the layer hooks ran
    with pytest.raises(RuntimeError, match="simulated failure"):
        loss.backward()
    assert shards.in_backward and any(s.resident for s in shards.layers)  # the stuck state
    sh.model.layers[0].self_attn.q_proj.lora_B._backward_hooks.clear()
    (lr, gr), (ls, gs) = _step(rep, ids), _step(sh, ids)
    assert torch.equal(lr, ls) and all(torch.equal(gr[n], gs[n]) for n in gr)
    assert not shards.in_backward and not any(s.resident or s.pinned for s in shards.layers)
    assert frozen_memory(sh)["resident"] == shards.shard_bytes()


def test_fold_inside_gathered_equals_the_replicated_fold(tmp_path, one_rank_group):
    from lrqat_dist import fold

    cfg = _cfg(tmp_path, "int-packed")
    rep, sh = build_model(cfg, "cpu"), build_model(cfg, "cpu", shard_frozen=True)
    shards = frozen_shards(sh)
    with shards.gathered():
        assert all(s.resident for s in shards.layers)
        got = fold(sh)
    want = fold(rep)
    assert got.keys() == want.keys() and all(torch.equal(got[n].codes, want[n].codes) for n in want)
    assert not any(s.resident for s in shards.layers)


def test_a_buffer_moved_off_the_shared_storage_is_refused(tmp_path, one_rank_group):
    sh = build_model(_cfg(tmp_path, "fixed"), "cpu", shard_frozen=True)
    q = sh.model.layers[1].self_attn.q_proj
    q._buffers["s0"] = torch.ones_like(q.s0)  # what a .to(other device) after sharding would do
    with pytest.raises(RuntimeError, match=r"'s0' of model\.layers\.1 no longer views"):
        sh(input_ids=torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.parametrize("world", [2, 3])
def test_lean_build_keeps_only_shards_layer_by_layer(tmp_path, world):
    """Built from a safetensors directory (lean loading) as each rank of ``world``: after each layer's
    last linear is converted, that layer holds only its shard (no communication needed), and the
    built buffers of earlier layers are gone; the ranks' shards put together are the replicated bytes."""
    base = tmp_path / "base"
    load_causal_lm(config=job_dict(tmp_path)["model"]["config"], dtype=torch.float32, seed=1).save_pretrained(base)
    cfg = _cfg(tmp_path, "int-packed")
    rep = build_prepared_model(cfg.quant, path=base)
    full = _frozen_buffers(rep)
    shards_by_rank = []
    for rank in range(world):
        sharder = FrozenSharder(list(cfg.quant.targets), rank=rank, world=world)
        seen = []

        def watch(model, name, sharder=sharder, seen=seen):
            sharder.on_converted(model, name)
            # every layer sharded so far holds its shard only; the layer being built at most itself
            held = sum(b.untyped_storage().nbytes() for m in model.modules() if isinstance(m, QuantLinear)
                       for b in m.buffers(recurse=False))
            done = sum(s.padded for s in sharder._done.values())
            built = sum(b.numel() * b.element_size() for lname, (_, layer) in sharder._layers.items()
                        if lname not in sharder._done for m in layer.modules() if isinstance(m, QuantLinear)
                        for b in m.buffers(recurse=False))
            seen.append((len(sharder._done), held, built, done))

        model = build_prepared_model(cfg.quant, path=base, lean=True, on_converted=watch)
        shards = sharder.finish(model)
        assert [d for d, *_ in seen] == [0] * 6 + [1] + [1] * 6 + [2]  # 7 linears per layer
        assert all(held == built for _, held, built, _ in seen)  # sharded layers hold no full bytes
        shards_by_rank.append(shards)
        assert torch.equal(buffer_fingerprint(model), buffer_fingerprint(rep))
        assert frozen_memory(model)["resident"] == shards.shard_bytes()
        layer_bytes = [s.padded for s in shards.layers]
        assert shards.shard_bytes() == sum(layer_bytes) // world
        assert sum(layer_bytes) - frozen_memory(model)["full"] < 2 * ALIGN * world * 7 * 4
    for i, layer in enumerate(shards_by_rank[0].layers):
        data = torch.cat([s.layers[i].shard for s in shards_by_rank])
        assert len(layer.entries) == 14  # phi0 and s0 of 7 linears (symmetric, no bias)
        for e in layer.entries:
            name = f"{e.module.layer_name}.{e.attr}"
            want = full[name].contiguous().reshape(-1).view(torch.uint8)
            assert torch.equal(data[e.offset:e.offset + e.nbytes], want), name


def test_loqt_is_refused(tmp_path):
    with pytest.raises(ValueError, match="dist.shard_frozen: quant.method loqt"):
        config_from_dict(job_dict(tmp_path, dist={"engine": "fsdp2", "shard_frozen": True},
                                  quant={"method": "loqt", "train_unquantized": True}))
