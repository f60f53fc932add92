"""QATConfig: what to quantize and how. The same fields form the ``quant:`` section of YAML recipes."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..quant.affine import QuantSpec
from ..quant.downcast import get_downcast
from ..quant.range_init import RANGE_INITS

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHOD_NAMES = ("lrqat", "rtn", "peqa", "full_qat")
ADAPTER_INITS = ("lora", "svd")


@dataclass
class QATConfig:
    """Quantization-aware training settings.

    method:      ``lrqat`` (low-rank adapters inside the rounding), ``rtn`` (no training),
                 ``peqa`` (codes frozen, scales trained), ``full_qat`` (LSQ: weights and scales trained).
    bits:        weight bits, 2..8.
    group_size:  groups along the input dimension; None = one scale per output channel.
    symmetric:   signed grid without zero-point, else unsigned grid with an integer zero-point.
    rank, alpha: LR-QAT adapter rank r and scaling alpha / r.
    downcast:    storage of Phi0 = W0/s0 (+z0): fp32, bf16, fp16, fixed (= Q{b}.{8-b}), q4.4..., int, int-packed.
    range_init:  ``lp`` (grid search of 100 clipping ratios minimising the Lp error) or ``minmax``.
    init:        adapter init: ``lora`` (B = 0, so step 0 is RTN) or ``svd`` (LoftQ-like, integer domain).
    train_scale: train s (LR-QAT, full QAT); PEQA always trains it, RTN never.
    targets:     names (last path component) of the nn.Linear modules to quantize.
    """

    method: str = "lrqat"
    bits: int = 4
    group_size: int | None = None
    symmetric: bool = True
    rank: int = 32
    alpha: float = 1.0
    downcast: str = "fixed"
    range_init: str = "lp"
    lp_norm: float = 4.0
    lp_grid: int = 100
    init: str = "lora"
    train_scale: bool = True
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    def __post_init__(self):
        if self.method not in METHOD_NAMES:
            raise ValueError(f"method: unknown {self.method!r}; expected one of {', '.join(METHOD_NAMES)}")
        self.spec  # validates bits and group_size
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank: expected a positive int, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha: expected > 0, got {self.alpha!r}")
        get_downcast(self.downcast, self.spec)  # validates the name against the grid
        if self.range_init not in RANGE_INITS:
            raise ValueError(f"range_init: unknown {self.range_init!r}; expected one of {', '.join(RANGE_INITS)}")
        if self.lp_norm <= 0 or self.lp_grid < 1:
            raise ValueError(f"lp_norm/lp_grid: need lp_norm > 0 and lp_grid >= 1, got {self.lp_norm}, {self.lp_grid}")
        if self.init not in ADAPTER_INITS:
            raise ValueError(f"init: unknown {self.init!r}; expected one of {', '.join(ADAPTER_INITS)}")
        if not self.targets:
            raise ValueError("targets: empty; name at least one linear (e.g. q_proj)")

    @property
    def spec(self) -> QuantSpec:
        try:
            return QuantSpec(self.bits, self.symmetric, self.group_size)
        except ValueError as e:
            raise ValueError(str(e)) from None
