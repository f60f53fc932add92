"""ActQuantConfig: which activations are fake-quantized, at how many bits (``quant.activations``).

YAML accepts a preset name or a mapping (a mapping may start from a preset and override fields)::

    quant: {activations: a8kv4}
    quant: {activations: {preset: a4kv4, kv_granularity: head}}
    quant: {activations: {bits: 8, kv_bits: 8, query_bits: 8}}      # the paper's W4-A8-KV8

See docs/activation-quant.md for what each placement quantizes and what each export format carries.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

from ..quant.activation import ACT_BITS

logger = logging.getLogger(__name__)

ACT_MODES = ("dynamic", "static")
STATIC_RANGES = ("learned", "calibrated")
KV_GRANULARITIES = ("token", "head")

# name -> field values. a8 touches only the linears' inputs, symmetric dynamic per-token int8: the
# scheme vLLM's int-activation kernels serve (W4A8 / W8A8 int; its loader rejects asymmetric int8
# inputs next to int4 weights). a8asym is the same with asymmetric inputs (transformers runs it; vLLM
# does not). The kv presets also quantize keys / values (the KV cache) and the queries, after RoPE,
# as in LR-QAT Table 5 (following LLM-QAT / OmniQuant), asymmetric as there.
PRESETS: dict[str, dict[str, Any]] = {
    "a8": {"bits": 8, "kv_bits": None, "query_bits": None, "symmetric": True},
    "a8asym": {"bits": 8, "kv_bits": None, "query_bits": None, "symmetric": False},
    "a8kv8": {"bits": 8, "kv_bits": 8, "query_bits": 8, "symmetric": False},
    "a8kv4": {"bits": 8, "kv_bits": 4, "query_bits": 8, "symmetric": False},
    "a4kv4": {"bits": 4, "kv_bits": 4, "query_bits": 4, "symmetric": False},
}

# Every field a saved config (dump_config, native export metadata) held before ``symmetric`` existed,
# when all inputs were asymmetric: such a mapping without ``symmetric`` is an old run's exact grid.
PRE_SYMMETRIC_FIELDS = frozenset({"bits", "kv_bits", "query_bits", "mode", "static_range", "kv_granularity"})


@dataclass
class ActQuantConfig:
    """Activation quantization placement and grids.

    preset:         optional starting point (``a8``, ``a8asym``, ``a8kv8``, ``a8kv4``, ``a4kv4``); the other keys
                    given next to it override the preset's values.
    bits:           inputs of every quantized linear (q/k/v/o/gate/up/down, i.e. also those after
                    the norms); null = leave them in full precision.
    kv_bits:        keys after RoPE and values, as the attention (and a KV cache) sees them; null = off.
    query_bits:     queries after RoPE (the other operand of Q K^T); null = off.
    symmetric:      the linears' inputs (``bits``) on the signed grid with ``s = max|x| / ((2^b-1)/2)``
                    and no zero-point (what vLLM's int8-activation kernels run, dynamic);
                    false = asymmetric min-max with an integer zero-point. Keys / values / queries
                    are always asymmetric.
    mode:           ``dynamic`` (per-token min-max at run time, nothing learned; the paper's setting)
                    or ``static`` (one calibrated range per tensor; needs calibrate_activations).
    static_range:   ``learned`` (fp32 scale trained with LSQ's gradient, in the scale lr group) or
                    ``calibrated`` (frozen); static mode only.
    kv_granularity: dynamic keys / queries / values: one range per ``token`` over all heads (a cache
                    row) or per token and ``head``.
    """

    preset: str | None = None
    bits: int | None = 8
    kv_bits: int | None = None
    query_bits: int | None = None
    symmetric: bool = False
    mode: str = "dynamic"
    static_range: str = "learned"
    kv_granularity: str = "token"

    def __post_init__(self):
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"preset: unknown {self.preset!r}; expected one of {', '.join(PRESETS)}")
        for key in ("bits", "kv_bits", "query_bits"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or value not in ACT_BITS):
                raise ValueError(f"{key}: expected one of {ACT_BITS} or null, got {value!r}")
        if self.mode not in ACT_MODES:
            raise ValueError(f"mode: unknown {self.mode!r}; expected one of {', '.join(ACT_MODES)}")
        if self.static_range not in STATIC_RANGES:
            raise ValueError(f"static_range: unknown {self.static_range!r}; expected one of {', '.join(STATIC_RANGES)}")
        if self.kv_granularity not in KV_GRANULARITIES:
            raise ValueError(f"kv_granularity: unknown {self.kv_granularity!r}; expected one of "
                             f"{', '.join(KV_GRANULARITIES)}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric: expected true or false, got {self.symmetric!r}")
        if self.symmetric and self.bits is None:
            raise ValueError("symmetric: applies to the linears' inputs, but bits is null")
        if self.bits is None and self.kv_bits is None and self.query_bits is None:
            raise ValueError("bits: bits, kv_bits and query_bits are all null; drop quant.activations instead")

    @classmethod
    def from_value(cls, value: "ActQuantConfig | str | dict | None", section: str = "activations"
                   ) -> "ActQuantConfig | None":
        """Normalise what a config holds: a preset name, a mapping (optionally with ``preset``), or None."""
        from ..typed_config import from_dict

        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            if value not in PRESETS:
                raise ValueError(f"{section}: unknown preset {value!r}; expected one of {', '.join(PRESETS)} "
                                 f"or a mapping")
            return cls(preset=value, **PRESETS[value])
        if isinstance(value, dict):
            preset = value.get("preset")
            merged = {**PRESETS.get(preset, {}), **value} if isinstance(preset, str) else dict(value)
            if "symmetric" not in value and PRE_SYMMETRIC_FIELDS <= value.keys() and merged.get("symmetric"):
                # A saved, fully expanded config from before 'a8' became symmetric: keep its trained grid.
                # (A recipe's plain 'a8' or a partial mapping means the current preset.)
                logger.warning("%s: preset %r saved without 'symmetric' (a config from before a8 became "
                               "symmetric): keeping the asymmetric int8 inputs it was trained with "
                               "(symmetric: false); re-save the config to silence this", section, preset)
                merged["symmetric"] = False
            return from_dict(cls, merged, section)
        raise ValueError(f"{section}: expected a preset name ({', '.join(PRESETS)}) or a mapping, "
                         f"got {type(value).__name__}")

    def describe(self) -> str:
        parts = [f"A{self.bits}" if self.bits else "A16"]
        if self.kv_bits:
            parts.append(f"KV{self.kv_bits}")
        if self.query_bits:
            parts.append(f"Q{self.query_bits}")
        how = "dynamic per-token" if self.mode == "dynamic" else f"static per-tensor ({self.static_range})"
        sym = "symmetric inputs" if self.symmetric else "asymmetric"
        if self.symmetric and (self.kv_bits or self.query_bits):
            sym += ", asymmetric q/k/v"
        return f"{'-'.join(parts)} {how} {sym}"


ACT_FIELDS = tuple(f.name for f in fields(ActQuantConfig))
