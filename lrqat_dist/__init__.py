"""lrqat_dist: low-rank quantization-aware training at every scale, with integer export.

    import lrqat_dist
    model = lrqat_dist.prepare(model, lrqat_dist.QATConfig(bits=4, rank=32, downcast="q4.4"))
    ...train the parameters that require grad...
    folded = lrqat_dist.fold(model)   # {name: FoldedWeight(codes, scale, zero_point, bits, group_size)}
"""
from .methods import FoldedWeight, QATConfig, QuantLinear
from .model import build_prepared_model, fold, load_causal_lm, materialize, prepare

__version__ = "0.1.0"
__all__ = ["QATConfig", "FoldedWeight", "QuantLinear", "prepare", "fold", "materialize", "load_causal_lm",
           "build_prepared_model"]
