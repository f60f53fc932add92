"""Model patching and loading."""
from .loading import build_config, load_causal_lm
from .patch import (fold, load_trained_buffers_, materialize, prepare, quantized_layers,
                    trained_buffer_state)

__all__ = ["prepare", "fold", "materialize", "quantized_layers", "trained_buffer_state", "load_trained_buffers_", "load_causal_lm", "build_config"]
