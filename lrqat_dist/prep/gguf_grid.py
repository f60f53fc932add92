"""Which GGUF quantization grid dequantized weights still sit on (the content of ``quant_grid.json``).

A model dequantized from Q4_1 is *exactly* representable by 4-bit groups of 32 with a float offset, so
that setting must never be reported as a result on it; :func:`describe_grid` measures and records this.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# GGUF tensor kinds -> HF LLaMA module names (same for mistral/qwen2 GGUFs).
_GGUF_TO_HF = {
    "token_embd": "embed_tokens", "output": "lm_head", "output_norm": "norm",
    "attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
    "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}

# Block formats whose dequantized values we can check exactly (all blocks of 32 along in_features).
#   name: (bits, asymmetric, description)
_BLOCK_GRIDS = {
    "Q4_0": (4, False, "4-bit, groups of 32, one float scale per group, w = d*(q-8), q in 0..15"),
    "Q4_1": (4, True, "4-bit, groups of 32, float scale and float offset per group, w = d*q + m, q in 0..15"),
    "Q5_0": (5, False, "5-bit, groups of 32, one float scale per group, w = d*(q-16), q in 0..31"),
    "Q5_1": (5, True, "5-bit, groups of 32, float scale and float offset per group, w = d*q + m, q in 0..31"),
    "Q8_0": (8, False, "8-bit, groups of 32, one float scale per group, w = d*q, q in -127..127"),
}


def gguf_tensor_types(gguf_path: str | os.PathLike) -> dict[str, Any]:
    """Storage type of every weight kind in a GGUF file, keyed by HF module name (``q_proj``...)."""
    import gguf  # noqa: PLC0415 - optional dependency, only needed here

    reader = gguf.GGUFReader(str(gguf_path))
    kinds: dict[str, set[str]] = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        kind = parts[2] if parts[0] == "blk" and len(parts) > 3 else parts[0]
        kinds.setdefault(_GGUF_TO_HF.get(kind, kind), set()).add(t.tensor_type.name)
    if "lm_head" not in kinds and "embed_tokens" in kinds:  # tied embeddings
        kinds["lm_head"] = set(kinds["embed_tokens"])
    file_type = None
    if "general.file_type" in reader.fields:
        ft = int(reader.fields["general.file_type"].contents())
        try:
            file_type = gguf.LlamaFileType(ft).name
        except ValueError:
            file_type = str(ft)
    return {"file_type": file_type,
            "tensor_types": {k: "/".join(sorted(v)) for k, v in sorted(kinds.items())}}


def grid_residual(weight, fmt: str) -> float:
    """Largest distance (in grid steps) of ``weight`` from the ``fmt`` block grid it was dequantized from.

    ~0 (float rounding, < 1e-3) means the values are exactly on that grid: every group of 32 along
    in_features holds only ``2**bits`` equally spaced levels spanning the group's min..max (asymmetric)
    or symmetric around 0 (scale-only formats).
    """
    import torch  # noqa: PLC0415

    bits, asym, _ = _BLOCK_GRIDS[fmt]
    w = weight.detach().float()
    if w.ndim != 2 or w.shape[1] % 32:
        raise ValueError(f"{fmt} grids need [out, in] weights with in % 32 == 0, got {tuple(w.shape)}")
    g = w.reshape(-1, 32)
    if asym:
        lo = g.min(dim=1, keepdim=True).values
        step = (g.max(dim=1, keepdim=True).values - lo) / (2 ** bits - 1)
        pos = (g - lo) / torch.where(step > 0, step, torch.ones_like(step))
    elif fmt == "Q8_0":
        step = g.abs().max(dim=1, keepdim=True).values / 127
        pos = g / torch.where(step > 0, step, torch.ones_like(step))
    else:
        # Q4_0/Q5_0: the element of largest magnitude sits at level -2**(bits-1) exactly.
        idx = g.abs().argmax(dim=1, keepdim=True)
        step = -g.gather(1, idx) / 2 ** (bits - 1)
        pos = g / torch.where(step != 0, step, torch.ones_like(step))
    return float((pos - pos.round()).abs().max())


def describe_grid(model, gguf_path: str | os.PathLike) -> dict[str, Any]:
    """The content of ``quant_grid.json``: storage types, measured grid residuals, forbidden settings."""
    info = gguf_tensor_types(gguf_path)
    types = info["tensor_types"]
    measured: dict[str, float] = {}
    for name, param in model.named_parameters():
        kind = name.split(".")[-2] if name.endswith(".weight") else None
        fmt = types.get(kind or "")
        if fmt in _BLOCK_GRIDS and param.ndim == 2:
            r = grid_residual(param, fmt)
            measured[kind] = max(measured.get(kind, 0.0), r)
    on_grid = {k: types[k] for k, r in measured.items() if r < 1e-3}
    logger.info("grid check (max residual in grid steps): %s", measured)
    note = {
        "source_gguf": Path(gguf_path).name,
        "file_type": info["file_type"],
        "tensor_types": types,
        "grids": {f: _BLOCK_GRIDS[f][2] for f in sorted(set(types.values())) if f in _BLOCK_GRIDS},
        "measured_max_grid_residual": measured,
        "exactly_on_grid": on_grid,
    }
    linear_fmts = {types.get(k) for k in ("q_proj", "k_proj", "v_proj", "o_proj",
                                          "gate_proj", "up_proj", "down_proj")}
    if "Q4_1" in linear_fmts:
        note["lossless_settings"] = [
            "W4 g32 asymmetric (min-max, float offset) on the linear layers: reproduces the weights exactly",
            "W8 g32 asymmetric (min-max, float offset): its grid contains the 4-bit one (255 = 17 * 15)",
        ]
        note["warning"] = (
            "These weights were dequantized from Q4_1 (4-bit groups of 32 with a float offset). "
            "Quantizing them with 4-bit groups of 32 and a float offset is lossless, so never report "
            "W4 g32 results on this checkpoint: use coarser groups (64, 96, 192), per-channel, or 3-bit, "
            "and compare against this as-loaded model.")
    hidden = getattr(model.config, "hidden_size", None)
    if hidden and hidden % 128:
        note["group_size_note"] = (f"hidden size {hidden} is not divisible by 128: group-wise settings need a "
                                   f"divisor of {hidden} (e.g. 64 for 576)")
    return note

