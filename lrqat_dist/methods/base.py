"""The shared shape of every quantized linear: ``W_hat = s * (q - z)`` for integer codes ``q``.

A method only says how its codes ``q`` (and scale ``s``) come about; this base turns them into the
training-time weight, a memory-lean forward/backward, and the folded integer checkpoint, all through
:func:`lrqat_dist.quant.affine.dequantize`, so training and export cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from ..quant.affine import QuantSpec, dequantize


@dataclass
class FoldedWeight:
    """An integer weight: ``dequantize() == scale * (codes - zero_point) (+ offset)`` expanded to ``[out, in]``.

    ``offset`` is a float per-group shift (DL-QAT folds to scale ``m*s`` and offset ``m*b``); it has
    no integer zero-point form, so formats that only store integer zero-points refuse it.
    """

    codes: torch.Tensor  # int32 [out, in], values in [qmin, qmax]
    scale: torch.Tensor  # fp32 [out, n_groups]
    zero_point: torch.Tensor | None  # int32 [out, n_groups], asymmetric only
    bits: int
    group_size: int | None
    bias: torch.Tensor | None = None
    offset: torch.Tensor | None = None  # fp32 [out, n_groups], DL-QAT only

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric, self.group_size)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.offset)


class _RecomputedLinear(torch.autograd.Function):
    """``y = x @ W^T + b`` where ``W = module.weight_hat()`` is rebuilt in backward instead of stored.

    Only ``x`` is saved, so no ``[out, in]`` intermediate (B@A, rounding masks, W_hat) outlives the
    forward of its layer. ``params`` (the module's trainable tensors) are inputs so that autograd
    routes their gradients, which come from differentiating the recomputed weight.
    """

    @staticmethod
    def forward(ctx, x, module, *params):
        with torch.no_grad():
            w = module.rebuilt_weight().to(x.dtype)
        ctx.module = module
        ctx.save_for_backward(x)
        return F.linear(x, w, module.cast_bias(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        module, need = ctx.module, ctx.needs_input_grad[2:]
        with torch.enable_grad():
            w = module.weight_hat()
        grad_x = grad_out @ w.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        if module.weight_grad_sink is not None:  # LoQT's gradient probe: dL/dW, summed over micro-batches
            module.weight_grad_sink.add_(grad_w.float())
        params, mask = module.trainable_tensors(), module.gradient_mask()
        # A masked tensor gets an exact zero gradient (not None): every engine then reduces and steps
        # the same set of tensors, whatever the phase (see DL-QAT).
        need = [n and (mask is None or m) for n, m in zip(need, mask or need)]
        wanted = [p for p, n in zip(params, need) if n]
        grads = iter(torch.autograd.grad(w, wanted, grad_w.to(w.dtype), allow_unused=True) if wanted else ())
        out = [next(grads) if n else None for n in need]
        out = [torch.zeros_like(p) if g is None and p.requires_grad and ctx.needs_input_grad[2 + i] else g
               for i, (p, g) in enumerate(zip(params, out))]
        return (grad_x, None, *out)


class QuantLinear(nn.Module):
    """Base class of all quantized linears (subclasses implement :meth:`codes` and :meth:`scale_tensor`).

    Buffers hold everything frozen (stored weight, zero-point, bias); the only ``nn.Parameter`` s are
    what the method trains, always fp32 (masters), whatever the compute dtype of the input.
    ``trained_buffers`` names the buffers a method rewrites during training (LoQT's merges); they are
    checkpointed and exported with the trainable tensors instead of being rebuilt from the base model.
    """

    trained_buffers: tuple[str, ...] = ()
    # "fast": the method's exact no-autograd backward (methods/fast_backward.py) where it has one;
    # "autograd": the plain reference path (_RecomputedLinear). Set from QATConfig.backward.
    backward: str = "fast"
    weight_grad_sink: torch.Tensor | None = None  # when set, backward adds dL/dW [out, in] (fp32) to it
    # Set (per instance) by lrqat_dist.objective.teacher_mode: forward uses teacher_weight(), no grad.
    teacher_active: bool = False

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, bias: torch.Tensor | None, name: str):
        super().__init__()
        self.in_features, self.out_features, self.spec, self.layer_name = in_features, out_features, spec, name
        self.n_groups = spec.n_groups(in_features, name)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    # --- what a method defines -------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Integer-valued float codes ``[out, in]`` in ``[qmin, qmax]``, differentiable (STE)."""
        raise NotImplementedError

    def scale_tensor(self) -> torch.Tensor:
        raise NotImplementedError

    def trainable_tensors(self) -> list[torch.Tensor]:
        """The tensors :meth:`weight_hat` reads that may need gradients."""
        return list(self.parameters(recurse=False))

    def gradient_mask(self) -> list[bool] | None:
        """Per :meth:`trainable_tensors` entry, whether it gets its gradient now (False: exact zero).
        None = all; DL-QAT uses it for its two training phases."""
        return None

    def offset_tensor(self) -> torch.Tensor | None:
        """Float per-group offset added after scaling (DL-QAT); None for integer grids."""
        return None

    def fast_function(self):
        """``f(x, module) -> y`` with an exact backward that needs no autograd graph through the
        weight (see :mod:`lrqat_dist.methods.fast_backward`); None = only the plain path. A method
        with a :meth:`gradient_mask` must honour it there (exact zeros for masked tensors)."""
        return None

    def teacher_unavailable(self) -> str | None:
        """None when :meth:`teacher_weight` gives a full-precision weight; else why not (for the error)."""
        return f"{type(self).__name__} keeps no full-precision copy of its weight"

    def teacher_weight(self) -> torch.Tensor:
        """The distillation teacher's fp32 weight ``[out, in]`` (the method's frozen full-precision copy
        of W0), for ``train.distill.teacher: phi0``; see :func:`lrqat_dist.objective.teacher_mode`."""
        raise ValueError(f"{self.layer_name}: {self.teacher_unavailable()}")

    def rebuilt_weight(self) -> torch.Tensor:
        """:meth:`weight_hat` without autograd, bit for bit (a method may fuse it)."""
        with torch.no_grad():
            return self.weight_hat()

    def rebuilt_codes(self) -> torch.Tensor:
        """:meth:`codes` without autograd, bit for bit (a method may fuse it)."""
        with torch.no_grad():
            return self.codes()

    # --- shared -------------------------------------------------------------------------------
    @property
    def zero_point_tensor(self) -> torch.Tensor | None:
        return getattr(self, "zero_point", None)

    def cast_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def weight_hat(self) -> torch.Tensor:
        """The training-time fp32 weight ``s * (q - z)``."""
        return dequantize(self.codes(), self.scale_tensor(), self.zero_point_tensor, self.offset_tensor())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.teacher_active:
            with torch.no_grad():
                return F.linear(x, self.teacher_weight().to(x.dtype), self.cast_bias(x.dtype))
        params = self.trainable_tensors()
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            fast = self.fast_function() if self.backward == "fast" else None
            if fast is not None and self.weight_grad_sink is None:
                return fast(x, self)
            return _RecomputedLinear.apply(x, self, *params)
        with torch.no_grad():
            return F.linear(x, self.rebuilt_weight().to(x.dtype), self.cast_bias(x.dtype))

    @torch.no_grad()
    def fold(self) -> FoldedWeight:
        """The integer checkpoint of this layer; ``fold().dequantize()`` equals :meth:`weight_hat` bitwise."""
        zp, offset = self.zero_point_tensor, self.offset_tensor()
        return FoldedWeight(
            codes=self.rebuilt_codes().to(torch.int32),
            scale=self.scale_tensor().detach().float().clone(),
            zero_point=None if zp is None else zp.to(torch.int32).clone(),
            bits=self.spec.bits,
            group_size=self.spec.group_size,
            bias=None if self.bias is None else self.bias.clone(),
            offset=None if offset is None else offset.detach().float().clone(),
        )

    def extra_repr(self) -> str:
        g = "per-channel" if self.spec.group_size is None else f"group={self.spec.group_size}"
        sym = "sym" if self.spec.symmetric else "asym"
        return f"in={self.in_features}, out={self.out_features}, W{self.spec.bits} {g} {sym}"

