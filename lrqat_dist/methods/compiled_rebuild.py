"""``torch.compile`` of LR-QAT's rebuild chain (``QATConfig.compile_rebuild``), with an eager fallback.

The eager rebuild (:meth:`lrqat_dist.methods.lrqat.LRQATLinear.fused_rebuild`) runs about six
full-size elementwise passes over ``[out, in]`` per call (scale B@A, add the decoded Phi0, round,
mask, clamp, dequantize). Compiled, they become one loop over the weight. ``B@A`` stays an eager
matmul (the compiled function starts from it), so only the elementwise chain is compiled, and it is
written as the eager path's operations in the same order.

Bit-identity is not assumed: the first call of each compiled signature (shape, mask or not) is
compared with the eager rebuild of the same layer; any difference (e.g. a compiler contracting
``x * c + phi`` into a fused multiply-add) or a compile failure (no C++ compiler, no Triton) logs one
warning and switches compiling off for the process: every later rebuild is eager. So folded weights
keep equalling the training-time weights bit for bit, whichever path trained them.

Cost: one compile per distinct (shape, with mask) pair; on this project's 2-core CPU 8-26 s each and
~70 s for the first (inductor start-up). TorchDynamo's ``cache_size_limit`` (8 by default) bounds the
compiled signatures per function: a model with more than four distinct linear shapes falls back to
eager for the rest (torch logs it).
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_STATE = {"enabled": True}
_COMPILED: dict[tuple, object] = {}
_VERIFIED: set[tuple] = set()


def _make(decode, scaling: float, qmin: int, qmax: int, dequant: bool):
    def chain(pre, phi0, scale, zero_point, clipped):
        # the operations of LRQATLinear.fused_rebuild + round_clamp_dequantize_, in the same order
        r = torch.round(pre * scaling + decode(phi0))
        if clipped is not None:
            clipped.copy_((r < qmin) | (r > qmax))
        q = torch.clamp(r, qmin, qmax)
        if dequant:
            out_f, in_f = q.shape
            g = q.reshape(out_f, scale.shape[1], -1)
            if zero_point is not None:
                g = g - zero_point.unsqueeze(-1).to(scale.dtype)
            q = (g * scale.unsqueeze(-1)).reshape(out_f, in_f)
        pre.copy_(q)

    return torch.compile(chain, dynamic=False)


def disable(reason: str) -> None:
    if _STATE["enabled"]:
        logger.warning("compile_rebuild: %s; using the eager rebuild from now on", reason)
    _STATE["enabled"] = False


def enabled() -> bool:
    return _STATE["enabled"]


@torch.no_grad()
def rebuild_(layer, pre: torch.Tensor, clipped: torch.Tensor | None, dequant: bool, eager) -> bool:
    """Overwrite ``pre`` (= ``B@A``, fp32 ``[out, in]``) with the rebuilt weight (or codes) and fill
    ``clipped``, compiled. ``eager(pre, clipped)`` is the layer's eager chain, used once per compiled
    signature as the reference. Returns False (``pre`` untouched) when compiling is off or failed."""
    if not _STATE["enabled"]:
        return False
    key = (layer.downcast, layer.scaling, layer.spec.qmin, layer.spec.qmax, dequant)
    sig = (*key, tuple(pre.shape), pre.device.type, clipped is not None, layer.zero_point is not None)
    try:
        fn = _COMPILED.get(key)
        if fn is None:
            fn = _COMPILED[key] = _make(layer.downcast.decode, layer.scaling, layer.spec.qmin, layer.spec.qmax,
                                        dequant)
        if sig in _VERIFIED:
            fn(pre, layer.phi0, layer.scale, layer.zero_point, clipped)
            return True
    except Exception as e:  # noqa: BLE001 (a dynamo/inductor error of any kind: eager from now on)
        disable(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return False
    ref, ref_mask = pre.clone(), None if clipped is None else torch.empty_like(clipped)
    eager(ref, ref_mask)
    try:
        fn(pre, layer.phi0, layer.scale, layer.zero_point, clipped)  # the first call compiles
    except Exception as e:  # noqa: BLE001 no compiler toolchain, an unsupported op: training goes on, eager
        disable(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        pre.copy_(ref)
        if clipped is not None:
            clipped.copy_(ref_mask)
        return True
    if not torch.equal(pre, ref) or (clipped is not None and not torch.equal(clipped, ref_mask)):
        disable(f"the compiled rebuild of {layer.layer_name} {tuple(pre.shape)} differs from the eager one")
        pre.copy_(ref)
        if clipped is not None:
            clipped.copy_(ref_mask)
        return True
    _VERIFIED.add(sig)
    return True
