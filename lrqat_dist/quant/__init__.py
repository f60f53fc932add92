"""Quantization primitives: affine grids, range initialisation, downcast operators, bit packing (bitpack.py)."""
from .affine import QuantSpec, dequantize, fake_quantize, quantize, round_ste
from .downcast import Downcast, get_downcast
from .bitpack import pack_codes, unpack_codes
from .range_init import init_range

__all__ = ["QuantSpec", "dequantize", "fake_quantize", "quantize", "round_ste", "Downcast", "get_downcast",
           "pack_codes", "unpack_codes", "init_range"]
