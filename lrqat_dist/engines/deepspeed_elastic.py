"""Resume a DeepSpeed ZeRO 1-3 checkpoint on a different number of ranks (elastic resume).

DeepSpeed's own ``load_checkpoint`` needs the world size that saved: each rank reads its
``zero_pp_rank_<r>`` optimizer file, a flat partition of fp32 masters and Adam moments. On a different
world size this module instead rebuilds every trainable tensor's *full* optimizer state from the saved
partitions and hands it to the new engine, which keeps its own partition of it:

- parameters: the checkpoint's ``trainable.safetensors`` (the full fp32 tensors, for every engine),
  set with :meth:`DeepSpeedEngine.assign_params` (working copy and ZeRO's fp32 master partition);
- Adam ``exp_avg`` / ``exp_avg_sq``: merged from the saved partitions with the same code that
  ``zero_to_fp32`` uses to merge the fp32 masters (the moments have the masters' flat layout), then
  set per parameter with ``deepspeed.utils.safe_set_full_optimizer_state``;
- Adam ``step`` (the same for every group and rank), the LR scheduler (from the model-states file)
  and the engine's step counters.

Why this and not DeepSpeed's universal checkpoint (``ds_to_universal`` + ``load_universal``): the
conversion is a separate offline pass that writes a second copy of the optimizer state per parameter
(minutes and ~3x the trainable bytes at 70B), and the universal loader is a different code path per
ZeRO stage; the moments here are read from the checkpoint as it is, nothing extra is written at save
time, and a same-world-size resume keeps DeepSpeed's own (bit-identical) load. Every rank reads every
optimizer file of the checkpoint (they hold only the ~1% trainable tensors and their moments).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

MOMENTS = ("exp_avg", "exp_avg_sq")


def read_full_optimizer_state(tag_dir: Path, names: list[str]) -> dict[str, Any]:
    """Offline (any process, no process group): the full Adam moments of ``names`` from a ZeRO 1-3
    checkpoint tag directory, plus ``step`` and the scheduler state.

    Returns ``{"exp_avg": {name: fp32 tensor}, "exp_avg_sq": {...}, "step": tensor, "lr_scheduler": dict,
    "zero_stage": int, "world_size": int}``.
    """
    from deepspeed.utils import zero_to_fp32 as z

    optim_files = z.get_optim_files(str(tag_dir))
    model_files = z.get_model_state_files(str(tag_dir))
    model_states = z.parse_model_states(model_files)
    states = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in optim_files]
    stage = int(states[0]["zero_stage"])
    world = states[0]["partition_count"]
    world = max(world) if isinstance(world, list) else int(world)
    if len(states) != world:
        raise ValueError(f"{tag_dir}: {len(states)} optimizer files for a ZeRO partition count of {world}")
    base_key = "base_optimizer_state" if stage <= 2 else "optimizer_state_dict"
    bases = [s[base_key] for s in states]
    groups = sorted(bases[0]["state"])  # one flat partition (ZeRO-3: sub-group) per key, in order
    missing = [(k, g) for b in bases for g in groups for k in MOMENTS if k not in b["state"][g]]
    if missing:
        raise ValueError(f"{tag_dir}: the optimizer state has no {missing[0][0]!r} (not Adam?): cannot reshard it")
    out: dict[str, Any] = {"zero_stage": stage, "world_size": world}
    for key in MOMENTS:
        flat = [[b["state"][g][key].float() for g in groups] for b in bases]
        if stage <= 2:
            full = z._get_fp32_state_dict_from_zero2_checkpoint(
                world, flat, model_states, True, states[0].get("param_alignment_paddings"))
        else:
            full = z.to_torch_tensor(z._get_fp32_state_dict_from_zero3_checkpoint(world, flat, model_states, True))
        lost = [n for n in names if n not in full]
        if lost:
            raise KeyError(f"{tag_dir}: no {key} for trainable tensors {lost[:3]}")
        out[key] = {n: full[n].detach().float().contiguous() for n in names}
    steps = {float(b["state"][g]["step"]) for b in bases for g in groups}
    if len(steps) != 1:
        raise ValueError(f"{tag_dir}: the optimizer groups disagree on the Adam step count ({sorted(steps)})")
    out["step"] = steps.pop()
    out["lr_scheduler"] = torch.load(model_files[0], map_location="cpu", weights_only=False).get("lr_scheduler")
    return out


@torch.no_grad()
def set_full_hp(param: torch.nn.Parameter, value: torch.Tensor, key: str | None = None) -> None:
    """Set this rank's part of ZeRO's fp32 master (``key`` None) or of an optimizer state of ``param``
    from its full value, for ZeRO 1-3 (collective under ZeRO-3 only in that every rank must call it).

    ``deepspeed.utils.safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` do this too, but
    under ZeRO-3 (DeepSpeed 0.19) they slice ``value`` at ``rank * partition_size`` for the full
    partition size, which runs past the end on the last rank when the tensor's size is not a multiple
    of the world size (DeepSpeed pads that partition): here the slice is cut at the end instead.
    """
    if not hasattr(param, "ds_id"):  # ZeRO-1/2: the fragment mapping handles uneven partitions
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
        return
    opt = param._z3_optimizer
    part, group = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    if value.numel() != param.ds_numel:
        raise ValueError(f"a tensor of {value.numel()} values for a parameter of {param.ds_numel}")
    start = part.numel() * opt._get_param_partition_rank(param)
    chunk = value.detach().flatten()[start:start + part.numel()].to(device=part.device, dtype=part.dtype)
    part.zero_()
    part[:chunk.numel()].copy_(chunk)
    if opt._swappable_optimizer_subgroup(group):  # as DeepSpeed's own setter does (NVMe offload)
        opt._optimizer_states_and_gradient_swap_out(group)


def _set_step(state: dict[str, Any], step: float) -> None:
    old = state.get("step")
    if old is None or torch.is_tensor(old):
        state["step"] = torch.tensor(step, dtype=torch.float32)
    else:  # DeepSpeed's fused / CPU Adam keep a Python int
        state["step"] = int(step)


@torch.no_grad()
def load_resharded(engine: Any, tag_dir: Path, params: dict[str, torch.Tensor]) -> None:
    """Restore a :class:`~lrqat_dist.engines.deepspeed.DeepSpeedEngine` (ZeRO 1-3, any world size) from
    the full trainable tensors ``params`` and the optimizer state saved under ``tag_dir`` (collective)."""
    names = list(engine.trainable_names)
    saved = read_full_optimizer_state(tag_dir, names)
    engine.assign_params({n: params[n] for n in names})
    zopt = engine.ds.optimizer
    base = zopt.optimizer  # the torch (or DeepSpeed) Adam over the flat fp32 partitions
    # ZeRO-3 puts its sub-group partitions into the Adam groups only for the duration of a step.
    flats = getattr(zopt, "fp32_partitioned_groups_flat", None) or zopt.single_partition_of_fp32_groups
    for flat in flats:
        st = base.state[flat]
        for key in MOMENTS:
            if key not in st:  # torch Adam creates its state lazily at the first step
                st[key] = torch.zeros_like(flat)
        _set_step(st, saved["step"])
    if hasattr(zopt, "_hp_optimizer_states_linked"):  # ZeRO-1/2: point the per-parameter views at it
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()
    live = dict(engine.ds.module.named_parameters())
    for key in MOMENTS:
        for n in names:
            p = live[n]
            set_full_hp(p, saved[key][n], key)
    if saved["lr_scheduler"] is not None:
        engine.scheduler.load_state_dict(saved["lr_scheduler"])
        for group, lr in zip(engine.optimizer.param_groups, engine.scheduler.get_last_lr()):
            group["lr"] = lr
    engine.ds.global_steps = int(saved["step"])
    engine.ds.global_samples = int(saved["step"]) * engine.ds.train_batch_size()
    logger.info("elastic resume: DeepSpeed ZeRO-%d optimizer state of %d tensors resharded from %d to %d ranks",
                saved["zero_stage"], len(names), saved["world_size"], engine.env.world_size)
