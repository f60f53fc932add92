"""The one table of floating-point dtype names: config / CLI spelling <-> ``torch.dtype``.

Every module that turns a name such as ``"bf16"`` or ``"bfloat16"`` into a dtype (the trainer's
``train.dtype``, export ``--dtype``, the memory planner's ``dtype``, lean loading's stored dtype)
uses this table, so the accepted spellings cannot drift apart.
"""
from __future__ import annotations

import torch

# name -> dtype; both spellings (HF/torch "bfloat16" and short "bf16") of the three float dtypes
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "fp32": torch.float32,
                                  "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                                  "float16": torch.float16, "fp16": torch.float16}
# the long spellings, as command lines offer them (--dtype choices)
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
# safetensors' dtype codes (the file header's spelling), for reading tensors one at a time
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.float32 | "float32" | "fp32" | "bf16" | "torch.bfloat16" ...`` -> torch dtype (float32,
    bfloat16 or float16); anything else is a ValueError naming the accepted spellings."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {dtype}")
        return dtype
    try:
        return DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the spelling of HF's config.json ``dtype``)."""
    return str(dtype).removeprefix("torch.")


def dtype_bytes(name: str | torch.dtype) -> int:
    """Bytes per element of a float dtype given by name or dtype."""
    return parse_dtype(name).itemsize
