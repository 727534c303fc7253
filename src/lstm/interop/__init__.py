"""Interoperation: Keras model files (no TensorFlow), torch.nn recurrent modules, ONNX."""

from .keras_files import load_keras, load_keras_weights
from .keras_writing import keras_config, save_keras, save_keras_weights
from .onnx_export import export_onnx
from .torch_modules import from_torch, to_torch

__all__ = ["load_keras", "load_keras_weights", "save_keras", "save_keras_weights", "keras_config", "to_torch",
           "from_torch", "export_onnx"]
