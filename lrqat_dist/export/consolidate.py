"""Consolidation: the trainable state of a checkpoint (A, B, s ...) from an engine's sharded payload,
in one CPU process, whatever the world size the run had.

- DeepSpeed ZeRO 1-3 (``<ckpt>/deepspeed``): the fp32 master partitions in the optimizer-state
  shards, merged by ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``
  (parameters only). ZeRO-0 keeps full parameters in the model-states file.
- FSDP2 (``<ckpt>/dcp``): the ``model.*`` entries of the torch.distributed.checkpoint, loaded with
  ``no_dist=True`` (no process group; optimizer state is not read).

Integer buffers never go through those converters. Zero-points (asymmetric grids) are read as saved
from DeepSpeed's model-states file, or rebuilt from the base model (:func:`build_model`), which is
also what FSDP2 checkpoints need since their payload holds trainable tensors only.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..train.checkpoint import TRAINABLE_FILE, TRAINED_BUFFERS_FILE, read_meta
from .run import checkpoint_config
from .verify import same_bits, stderr_log

ZERO_POINT_SUFFIX = ".zero_point"


@dataclass
class ConsolidationReport:
    checkpoint: Path
    engine: str
    step: int
    tensors: int
    zero_points: str
    checks: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"consolidated {self.checkpoint} (engine {self.engine}, step {self.step}): {self.tensors} "
                 f"trainable tensors; zero-points: {self.zero_points} ({self.seconds:.1f} s)"]
        return "\n".join(lines + [f"  check passed: {c}" for c in self.checks])


def _meta(ckpt: Path) -> dict:
    meta = read_meta(ckpt)
    if meta is None:
        raise FileNotFoundError(f"{ckpt}: not a complete checkpoint (no meta.json with complete: true)")
    return meta


def deepspeed_trainable(ds_dir: Path, names: list[str], tag: str | None = None) -> dict[str, torch.Tensor]:
    """fp32 trainable tensors of a DeepSpeed checkpoint directory (the one holding ``latest``)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = tag or (ds_dir / "latest").read_text().strip()
    if list((ds_dir / tag).glob("*optim_states.pt")):
        full = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag, exclude_frozen_parameters=True)
    else:  # ZeRO-0: no partitioned fp32 masters; the model-states file holds the full parameters
        full = _ds_model_states(ds_dir / tag)["module"]
    missing = [n for n in names if n not in full]
    if missing:
        raise KeyError(f"{ds_dir}: trainable tensors missing from the DeepSpeed checkpoint: {missing[:5]}")
    return {n: full[n].detach().float().contiguous() for n in names}


def _ds_model_states(tag_dir: Path) -> dict:
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no DeepSpeed *model_states.pt file")
    return torch.load(files[0], map_location="cpu", weights_only=False)


def deepspeed_zero_points(ds_dir: Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Zero-point buffers as saved in DeepSpeed's model-states file (integer, untouched)."""
    tag = tag or (ds_dir / "latest").read_text().strip()
    module = _ds_model_states(ds_dir / tag)["module"]
    return {k: v.clone() for k, v in module.items() if k.endswith(ZERO_POINT_SUFFIX)}


def dcp_trainable(dcp_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """fp32 trainable tensors (``model.<name>`` entries) of a DCP checkpoint, read without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(dcp_dir))
    meta = reader.read_metadata().state_dict_metadata
    state = {}
    for n in names:
        entry = meta.get(f"model.{n}")
        if not isinstance(entry, TensorStorageMetadata):
            raise KeyError(f"{dcp_dir}: no tensor 'model.{n}' in the DCP checkpoint")
        state[n] = torch.empty(entry.size, dtype=entry.properties.dtype)
    dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    return {n: t.float().contiguous() for n, t in state.items()}


def payload_trainable(ckpt: Path, meta: dict) -> dict[str, torch.Tensor]:
    """The trainable tensors from the engine's own payload (not from trainable.safetensors)."""
    engine, names = meta["engine"], list(meta["trainable"])
    if engine == "deepspeed":
        return deepspeed_trainable(ckpt / meta.get("payload", "deepspeed"), names, meta.get("deepspeed_tag"))
    if engine == "fsdp2":
        return dcp_trainable(ckpt / meta.get("payload", "dcp"), names)
    raise ValueError(f"{ckpt}: engine {engine!r} has no sharded payload; its {TRAINABLE_FILE} is the full "
                     f"trainable state already")


def rebuilt_zero_points(ckpt: Path, log: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Zero-points rebuilt from the base model with the checkpoint's config (deterministic range init)."""
    from ..train.build import build_model

    cfg = checkpoint_config(ckpt)
    if log:
        log(f"[consolidate] rebuilding zero-points from the base model ({cfg.model.path or 'random init'})")
    model = build_model(cfg, device="cpu", dtype=torch.float32)
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(ZERO_POINT_SUFFIX)}


def consolidate(checkpoint: str | Path, out_file: str | Path, *, zero_points: str = "auto",
                log: Callable[[str], None] | None = stderr_log) -> ConsolidationReport:
    """Write the trainable state of a DeepSpeed/FSDP2 checkpoint as one safetensors file.

    ``zero_points``: ``auto`` (asymmetric grids only: DeepSpeed's saved buffers, else rebuilt from
    the base model), ``payload`` (DeepSpeed only), ``rebuild``, or ``skip``. When the checkpoint also
    has ``trainable.safetensors`` (gathered from the live model at save time), the consolidated
    tensors must equal it bit for bit.
    """
    t0 = time.time()
    log = log or (lambda msg: None)
    ckpt = Path(checkpoint)
    meta = _meta(ckpt)
    if zero_points not in ("auto", "payload", "rebuild", "skip"):
        raise ValueError(f"zero_points: expected auto, payload, rebuild or skip, got {zero_points!r}")
    log(f"[consolidate] reading the {meta['engine']} payload of {ckpt} (saved by {meta['world_size']} processes)")
    state = payload_trainable(ckpt, meta)
    report = ConsolidationReport(ckpt, meta["engine"], int(meta["step"]), len(state), "none")

    live_file = ckpt / TRAINABLE_FILE
    if live_file.is_file():
        live = load_file(str(live_file))
        bad = [n for n in state if n not in live or not same_bits(state[n], live[n].float())]
        if bad or set(live) != set(state):
            raise RuntimeError(f"{ckpt}: the {meta['engine']} payload disagrees with {live_file.name} "
                               f"(e.g. {(bad or sorted(set(live) ^ set(state)))[0]})")
        report.checks.append(f"{len(state)} tensors equal {live_file.name} (gathered from the live model) bit for bit")

    symmetric = checkpoint_config(ckpt).quant.symmetric
    mode = zero_points
    if mode == "auto":
        mode = "skip" if symmetric else ("payload" if meta["engine"] == "deepspeed" else "rebuild")
    if mode == "payload" and meta["engine"] != "deepspeed":
        raise ValueError(f"zero_points='payload': the {meta['engine']} payload holds no buffers; use 'rebuild'")
    if (ckpt / TRAINED_BUFFERS_FILE).is_file():  # LoQT: merges rewrote the zero-points; load_run reads that file
        if mode == "rebuild":
            raise ValueError(f"zero_points='rebuild': {ckpt} holds {TRAINED_BUFFERS_FILE} (buffers rewritten by "
                             "training, zero-points included); the base model cannot rebuild them, use 'auto'")
        if mode == "auto" or mode == "skip":
            mode, report.zero_points = "skip", f"in {TRAINED_BUFFERS_FILE} (read by load_run)"
    if mode != "skip":
        zps = (deepspeed_zero_points(ckpt / meta.get("payload", "deepspeed"), meta.get("deepspeed_tag"))
               if mode == "payload" else rebuilt_zero_points(ckpt, log))
        if not zps and not symmetric:
            raise RuntimeError(f"{ckpt}: asymmetric config but no zero-point buffers found ({mode})")
        state.update(zps)
        origin = "the DeepSpeed model states" if mode == "payload" else "the base model"
        report.zero_points = f"{len(zps)} from {origin}"

    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt", "lrqat_step": str(meta["step"]),
                                         "lrqat_engine": meta["engine"], "lrqat_source": str(ckpt),
                                         "lrqat_world_size": str(meta["world_size"]),
                                         "lrqat_zero_stage": json.dumps(meta.get("zero_stage"))})
    reread = load_file(str(out))
    if set(reread) != set(state) or not all(same_bits(reread[k], state[k]) for k in state):
        raise RuntimeError(f"{out}: read-back differs from what was written")
    report.checks.append(f"{out} read back bit-identical")
    report.seconds = time.time() - t0
    return report
