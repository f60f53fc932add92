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
    """An integer weight: ``dequantize() == scale * (codes - zero_point)`` expanded to ``[out, in]``."""

    codes: torch.Tensor  # int32 [out, in], values in [qmin, qmax]
    scale: torch.Tensor  # fp32 [out, n_groups]
    zero_point: torch.Tensor | None  # int32 [out, n_groups], asymmetric only
    bits: int
    group_size: int | None
    bias: torch.Tensor | None = None

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.symmetric, self.group_size)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point)


class _RecomputedLinear(torch.autograd.Function):
    """``y = x @ W^T + b`` where ``W = module.weight_hat()`` is rebuilt in backward instead of stored.

    Only ``x`` is saved, so no ``[out, in]`` intermediate (B@A, rounding masks, W_hat) outlives the
    forward of its layer. ``params`` (the module's trainable tensors) are inputs so that autograd
    routes their gradients, which come from differentiating the recomputed weight.
    """

    @staticmethod
    def forward(ctx, x, module, *params):
        with torch.no_grad():
            w = module.weight_hat().to(x.dtype)
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
        wanted = [p for p, n in zip(module.trainable_tensors(), need) if n]
        grads = iter(torch.autograd.grad(w, wanted, grad_w.to(w.dtype), allow_unused=True) if wanted else ())
        return (grad_x, None, *[next(grads) if n else None for n in need])


class QuantLinear(nn.Module):
    """Base class of all quantized linears (subclasses implement :meth:`codes` and :meth:`scale_tensor`).

    Buffers hold everything frozen (stored weight, zero-point, bias); the only ``nn.Parameter`` s are
    what the method trains, always fp32 (masters), whatever the compute dtype of the input.
    """

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

    # --- shared -------------------------------------------------------------------------------
    @property
    def zero_point_tensor(self) -> torch.Tensor | None:
        return getattr(self, "zero_point", None)

    def cast_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def weight_hat(self) -> torch.Tensor:
        """The training-time fp32 weight ``s * (q - z)``."""
        return dequantize(self.codes(), self.scale_tensor(), self.zero_point_tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = self.trainable_tensors()
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return _RecomputedLinear.apply(x, self, *params)
        with torch.no_grad():
            return F.linear(x, self.weight_hat().to(x.dtype), self.cast_bias(x.dtype))

    @torch.no_grad()
    def fold(self) -> FoldedWeight:
        """The integer checkpoint of this layer; ``fold().dequantize()`` equals :meth:`weight_hat` bitwise."""
        zp = self.zero_point_tensor
        return FoldedWeight(
            codes=self.codes().to(torch.int32),
            scale=self.scale_tensor().detach().float().clone(),
            zero_point=None if zp is None else zp.to(torch.int32).clone(),
            bits=self.spec.bits,
            group_size=self.spec.group_size,
            bias=None if self.bias is None else self.bias.clone(),
        )

    def extra_repr(self) -> str:
        g = "per-channel" if self.spec.group_size is None else f"group={self.spec.group_size}"
        sym = "sym" if self.spec.symmetric else "asym"
        return f"in={self.in_features}, out={self.out_features}, W{self.spec.bits} {g} {sym}"

