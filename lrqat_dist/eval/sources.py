"""What tools/eval.py can evaluate, recognised from the directory, loaded on CPU (or a device).

- ``run``: a training run's output_dir or one of its checkpoints (rebuilt, then materialized: the
  quantized linears become ``nn.Linear`` s holding ``fold().dequantize()``, the same bits the
  training-time forward uses, without recomputing ``B @ A`` on every call);
- ``native``: a native export (``lrqat_native.json``);
- ``compressed-tensors``: an HF directory whose config has a compressed-tensors quantization_config;
- ``hf``: any other local HF model directory;
- ``gguf``: a ``.gguf`` file (our GGUF export), dequantized by transformers' GGUF loader (see
  :mod:`lrqat_dist.export.gguf_runtime`; ``tools/eval.py --runtime llama.cpp`` runs it in llama.cpp).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

KINDS = ("run", "native", "compressed-tensors", "hf", "gguf")


@dataclass
class EvalModel:
    model: nn.Module
    tokenizer: Any
    kind: str
    description: str


def detect_kind(path: str | Path) -> str:
    """One of :data:`KINDS` for a local directory; a clear error for anything else."""
    from ..export.native import META_FILE
    from ..checkpoint import is_run_or_checkpoint

    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: not a directory (expected a run, a checkpoint, an export or an HF model dir) "
                                f"or a .gguf file")
    if is_run_or_checkpoint(p):
        return "run"
    if (p / META_FILE).is_file():
        return "native"
    config = p / "config.json"
    if config.is_file():
        qc = json.loads(config.read_text()).get("quantization_config") or {}
        return "compressed-tensors" if qc.get("quant_method") == "compressed-tensors" else "hf"
    raise FileNotFoundError(f"{p}: no meta.json/checkpoints (run), {META_FILE} (native export) or config.json (HF)")


def load_for_eval(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
                  step: int | None = None, trainable_file: str | Path | None = None,
                  tokenizer: str | None = None, accept_changed_base_model: bool = False) -> EvalModel:
    """Load any of :data:`KINDS` as a plain causal LM in ``dtype`` on ``device`` plus its tokenizer
    (from the model directory, the run's config, or ``tokenizer``). A run's rebuilt frozen state must
    match its checkpoint's fingerprint unless ``accept_changed_base_model``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..model import materialize

    p = Path(path)
    kind = detect_kind(p)
    if step is not None and kind != "run":
        raise ValueError(f"--step applies to a training run, not to a {kind} directory")
    tok = None
    if kind == "run":
        from ..export.run import load_run

        run = load_run(p, step=step, trainable_file=trainable_file,
                       accept_changed_base_model=accept_changed_base_model)
        model, tok, desc = materialize(run.model, dtype=dtype).to(dtype), run.tokenizer, run.describe()
    elif kind == "native":
        from ..export.native import load_native

        model, desc = load_native(p, dtype), f"native export {p}"
    elif kind == "gguf":
        from ..export.gguf_runtime import load_gguf_dequantized

        model, tok = load_gguf_dequantized(p, dtype)
        desc = f"GGUF export {p} (dequantized by transformers' GGUF loader)"
    elif kind == "compressed-tensors":
        from ..export.compressed_tensors import load_compressed_tensors

        model, desc = load_compressed_tensors(p, dtype), f"compressed-tensors export {p}"
    else:
        model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, local_files_only=True)
        desc = f"HF model {p}"
    if tokenizer is not None:
        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
    elif tok is None:
        try:
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{p}: no tokenizer files ({e}); pass --tokenizer DIR") from None
    model.requires_grad_(False)
    act = getattr(model, "act_quant_config", None)  # runs and native exports re-attach it
    if act is not None:
        desc += f", activations {act.describe()}"
    return EvalModel(model.to(device).eval(), tok, kind, desc)
