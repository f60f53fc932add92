"""Packing low-bit integer codes into bytes (two 4-bit or four 2-bit codes per uint8, low bits first)."""
from __future__ import annotations

import torch

from .affine import QuantSpec


def codes_per_byte(bits: int) -> int:
    if bits <= 2:
        return 4
    if bits <= 4:
        return 2
    raise ValueError(f"bits: byte packing holds 2- to 4-bit codes, got {bits}")


def pack_codes(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Pack integer-valued codes ``[out, in]`` (in [qmin, qmax]) into uint8 ``[out, in / k]``.

    Codes are stored unsigned (``q - qmin``) in fields of 2 or 4 bits (3-bit codes use 4-bit fields).
    """
    k = codes_per_byte(spec.bits)
    width = 8 // k
    out, inp = q.shape
    if inp % k:
        raise ValueError(f"packing: input dimension {inp} is not divisible by {k} codes per byte")
    u = (q.to(torch.int32) - spec.qmin).reshape(out, inp // k, k)
    shifts = torch.arange(k, dtype=torch.int32, device=q.device) * width
    return (u << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 codes ``[out, in]``."""
    k = codes_per_byte(spec.bits)
    width = 8 // k
    shifts = torch.arange(k, dtype=torch.int32, device=packed.device) * width
    u = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**width - 1)
    return u.reshape(packed.shape[0], -1) + spec.qmin
