"""The distillation teacher: the student model itself in *teacher mode*, or a separate frozen model.

Teacher mode (:func:`teacher_mode`, ``train.distill.teacher: phi0``) makes every quantized linear
compute ``F.linear(x, layer.teacher_weight())`` under no_grad (the method's full-precision copy of W0:
LR-QAT's ``s0 * (decode(Phi0) - z0)``, DL-QAT's ``W0``) and bypasses every activation quantizer, so a
normal forward of the same (possibly wrapped and sharded) module is the unquantized model, with no
extra weight memory. The model's own forward runs: engine wrappers and forward hooks (FSDP2, ZeRO-3,
frozen-weight sharding) work as in the student's forward.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..methods.base import QuantLinear
from ..model.activations import activation_quantizers
from ..model.loading import load_causal_lm

logger = logging.getLogger(__name__)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def teacher_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within: ``model``'s quantized linears use their teacher weight (no grad), activation quantizers are
    the identity and every module is in eval mode (a teacher is deterministic); all restored on exit."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("teacher_mode: the model has no quantized linears")
    quantizers = list(activation_quantizers(model).values())
    modes = [(m, m.training) for m in model.modules()]
    try:
        for layer in layers:
            layer.teacher_active = True
        for q in quantizers:
            q.forward = _identity  # instance attribute: shadows the class's forward while inside
        for m, _ in modes:
            m.training = False
        yield model
    finally:
        for layer in layers:
            layer.__dict__.pop("teacher_active", None)
        for q in quantizers:
            q.__dict__.pop("forward", None)
        for m, was in modes:
            m.training = was


def check_phi0_teacher(model: nn.Module, method: str) -> None:
    """ValueError naming the method (and a layer) unless every quantized linear can give its teacher weight."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise ValueError("train.distill.teacher: 'phi0' needs a quantized model (no quantized linears found)")
    owners = [*layers, *activation_quantizers(model).items()]  # the teacher bypasses activation quantizers
    quantized = {f"{n}.{p}" if n else p for n, m in owners for p, _ in m.named_parameters()}
    moving = [n for n, p in model.named_parameters() if p.requires_grad and n not in quantized]
    if moving:  # e.g. quant.train_unquantized: the teacher would share trained embeddings/norms/lm_head
        raise ValueError(f"train.distill.teacher: 'phi0' needs every parameter outside the quantized linears "
                         f"frozen (the teacher runs the same embeddings, norms and head), but {moving[0]} "
                         f"(and {len(moving) - 1} more) are trained; set quant.train_unquantized: false or give "
                         "teacher: <a local HF model directory>")
    for name, layer in layers:
        reason = layer.teacher_unavailable()
        if reason is not None:
            raise ValueError(f"train.distill.teacher: 'phi0' is not available for quant.method {method!r} "
                             f"({name}: {reason}). The methods with a full-precision teacher are lrqat (downcast "
                             "fp32, bf16, fp16 or fixed/qI.F) and dlqat; or give teacher: <a local HF model "
                             "directory> (a separate full-precision teacher)")


def load_teacher(path: str | Path, dtype: torch.dtype, device: torch.device, attn_implementation: str = "sdpa",
                 vocab_size: int | None = None) -> nn.Module:
    """A separate frozen teacher from a local HF directory, in ``dtype`` on ``device`` (eval mode,
    no parameter requires grad). ``vocab_size``: the student's; a teacher with another is refused."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"train.distill.teacher: {path} is not a local HF model directory (no config.json); "
                                "give 'phi0' or such a directory")
    teacher = load_causal_lm(path=path, dtype=dtype, attn_implementation=attn_implementation)
    got = teacher.get_output_embeddings().weight.shape[0]
    if vocab_size is not None and got != vocab_size:
        raise ValueError(f"train.distill.teacher: {path} has a vocabulary of {got} tokens, the student {vocab_size}; "
                         "distillation needs the same tokenizer")
    teacher.requires_grad_(False)
    teacher.eval()
    teacher.config.use_cache = False  # eval mode would otherwise build a KV cache of every layer per forward
    n = sum(p.numel() for p in teacher.parameters())
    logger.info("distillation teacher %s: %.1fM parameters in %s", path, n / 1e6, dtype)
    return teacher.to(device)
