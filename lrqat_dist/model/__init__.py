"""Model patching and loading."""
from .loading import build_config, load_causal_lm
from .patch import fold, materialize, prepare, quantized_layers

__all__ = ["prepare", "fold", "materialize", "quantized_layers", "load_causal_lm", "build_config"]
