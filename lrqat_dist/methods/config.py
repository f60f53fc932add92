"""QATConfig: what to quantize and how. The same fields form the ``quant:`` section of YAML recipes."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..quant.affine import QuantSpec
from ..quant.downcast import get_downcast
from ..quant.range_init import RANGE_INITS
from .act_config import ActQuantConfig

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BACKWARDS = ("fast", "autograd")
METHOD_NAMES = ("lrqat", "rtn", "peqa", "full_qat", "dlqat", "loqt")
ADAPTER_INITS = ("lora", "svd")


@dataclass
class QATConfig:
    """Quantization-aware training settings.

    method:      ``lrqat`` (low-rank adapters inside the rounding), ``rtn`` (no training),
                 ``peqa`` (codes frozen, scales trained), ``full_qat`` (LSQ: weights and scales trained),
                 ``dlqat`` (DL-QAT, docs/dlqat.md), ``loqt`` (LoQT, docs/loqt.md).
    bits:        weight bits, 2..8.
    group_size:  groups along the input dimension; None = one scale per output channel.
    symmetric:   signed grid without zero-point, else unsigned grid with an integer zero-point.
    rank, alpha: LR-QAT adapter rank r and scaling alpha / r.
    downcast:    storage of Phi0 = W0/s0 (+z0): fp32, bf16, fp16, fixed (= Q{b}.{8-b}), q4.4..., int, int-packed.
    range_init:  ``lp`` (grid search of 100 clipping ratios minimising the Lp error) or ``minmax``.
    init:        adapter init: ``lora`` (B = 0, so step 0 is RTN) or ``svd`` (LoftQ-like, integer domain).
    train_scale: train s (LR-QAT, full QAT); PEQA always trains it, RTN never.
    targets:     names (last path component) of the nn.Linear modules to quantize.
    train_unquantized: also train what prepare would freeze (embeddings, norms, lm_head), at train.lr;
                 needed to pretrain from random init (LoQT's pretraining setting).
    dlqat_phase1_steps: DL-QAT: optimizer steps that train only s and b; then s, b freeze and m, A, B train.
    loqt_scale:  LoQT's s in W = Q(W) + s P @ B.
    loqt_tau, loqt_psi: LoQT's merge schedule u_{i+1} = u_i + tau + floor(psi^i), u_0 = 1.
    loqt_error_comp: LoQT error-compensation iterations at each merge (0: B re-initialised to zero).
    loqt_final_merge: LoQT: merge B into the quantized weights after the last step (fold is then exact).
    backward:    ``fast`` (exact gradients without an autograd graph through the weight, where the
                 method has them: LR-QAT, PEQA, full QAT, DL-QAT) or ``autograd`` (the plain reference path).
    compile_rebuild: LR-QAT with ``backward: fast`` only: rebuild the weight in forward/backward through
                 ``torch.compile`` (one fused loop; each shape's first result checked bit-equal to the
                 eager rebuild, else eager with a warning). Compile warm-up: tens of seconds per shape
                 on CPU; pays on long runs of large layers (docs/bench-speed.md).
    activations: activation / KV-cache quantization (:class:`ActQuantConfig`, a preset name such as
                 ``a8``, ``a8kv4``, ``a4kv4``, or a mapping); None = weight-only.
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
    train_unquantized: bool = False
    dlqat_phase1_steps: int = 1000
    loqt_scale: float = 0.25
    loqt_tau: int = 100
    loqt_psi: float = 1.2
    loqt_error_comp: int = 0
    loqt_final_merge: bool = True
    backward: str = "fast"
    compile_rebuild: bool = False
    activations: ActQuantConfig | str | dict | None = None

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
        if not isinstance(self.dlqat_phase1_steps, int) or self.dlqat_phase1_steps < 0:
            raise ValueError(f"dlqat_phase1_steps: expected an int >= 0, got {self.dlqat_phase1_steps!r}")
        if self.method == "dlqat" and not self.symmetric:
            raise ValueError("symmetric: dlqat always uses the signed grid with a float offset b; set symmetric: true")
        if self.loqt_scale <= 0:
            raise ValueError(f"loqt_scale: expected > 0, got {self.loqt_scale!r}")
        if not isinstance(self.loqt_tau, int) or self.loqt_tau < 1:
            raise ValueError(f"loqt_tau: expected an int >= 1, got {self.loqt_tau!r}")
        if self.loqt_psi < 1:
            raise ValueError(f"loqt_psi: expected >= 1 (intervals must not shrink), got {self.loqt_psi!r}")
        if not isinstance(self.loqt_error_comp, int) or self.loqt_error_comp < 0:
            raise ValueError(f"loqt_error_comp: expected an int >= 0, got {self.loqt_error_comp!r}")
        if self.backward not in BACKWARDS:
            raise ValueError(f"backward: unknown {self.backward!r}; expected one of {', '.join(BACKWARDS)}")
        if not isinstance(self.compile_rebuild, bool):
            raise ValueError(f"compile_rebuild: expected true or false, got {self.compile_rebuild!r}")
        if self.compile_rebuild and (self.method != "lrqat" or self.backward != "fast"):
            raise ValueError("compile_rebuild: only LR-QAT's fast backward has the compiled rebuild "
                             f"(method: {self.method}, backward: {self.backward}); set compile_rebuild: false")
        self.activations = ActQuantConfig.from_value(self.activations)

    @property
    def spec(self) -> QuantSpec:
        try:
            return QuantSpec(self.bits, self.symmetric, self.group_size)
        except ValueError as e:
            raise ValueError(str(e)) from None
