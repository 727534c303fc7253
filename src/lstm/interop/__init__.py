"""Interoperation: Keras model files (no TensorFlow), torch.nn recurrent modules, ONNX."""

from .keras_files import keras_config, load_keras, load_keras_weights, save_keras_weights

__all__ = ["load_keras", "load_keras_weights", "save_keras_weights", "keras_config"]
