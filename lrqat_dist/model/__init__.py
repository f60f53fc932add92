"""Model patching (``prepare`` / ``fold`` / ``materialize``), loading, and building a prepared model.

``build_prepared_model`` (``build.py``) is the one builder every caller uses; lean loading
(``lean_load.py``) is its one-weight-at-a-time path.
"""
from .build import build_prepared_model
from .loading import build_config, load_causal_lm
from .patch import (fold, load_trained_buffers_, materialize, prepare, quantized_layers,
                    trained_buffer_state)

__all__ = ["prepare", "fold", "materialize", "quantized_layers", "trained_buffer_state", "load_trained_buffers_",
           "load_causal_lm", "build_config", "build_prepared_model"]
