"""lstm: the LSTM of the tutorial, exact to Keras, as a PyTorch library."""

from . import activations, constraints, initializers, kernels, layers, regularizers
from .constraints import apply_constraints
from . import models
from .models import Sequential
from .interop import (export_onnx, from_torch, keras_config, load_keras, load_keras_weights, save_keras,
                      save_keras_weights, to_torch)
from .quantization import quantize
from .serialization import clear_session
from .long_sequences import chunked, iter_chunks, recomputed, truncated_bptt

__version__ = "0.1.0"


def regularization_loss(module):
    """Every regularizer penalty in `module` (weights now, activities of the last call), summed:
    add it to the training loss, as Keras adds `model.losses`."""
    penalties = []
    for sub in module.modules():
        if isinstance(sub, layers.RecurrentCell):
            penalties += sub.losses
        elif isinstance(sub, layers.RNN):
            penalties += sub.activity_losses
    return sum(penalties) if penalties else 0.0


__all__ = ["activations", "constraints", "initializers", "kernels", "layers", "regularizers",
           "apply_constraints", "clear_session", "regularization_loss", "models", "Sequential", "load_keras",
           "load_keras_weights", "save_keras", "save_keras_weights", "keras_config", "to_torch", "from_torch",
           "export_onnx", "quantize", "chunked", "iter_chunks", "recomputed", "truncated_bptt"]
