"""Interoperation: Keras model files (no TensorFlow), torch.nn recurrent modules, ONNX."""

from .keras_files import load_keras, load_keras_weights
from .keras_writing import keras_config, save_keras, save_keras_weights
from .torch_modules import from_torch, to_torch


def export_onnx(model, path, example_input, *args, **options) -> str:
    """Writes `model` as an ONNX graph (opset 17); returns the path. The arguments and the graph's
    inputs and outputs: `lstm.interop.onnx_export.export_onnx`, imported here on the first call, as
    it needs the optional `onnx` package (`pip install "lstm[onnx]"`)."""
    try:
        from .onnx_export import export_onnx as write
    except ModuleNotFoundError as error:
        if error.name != "onnx":
            raise
        raise ModuleNotFoundError('export_onnx needs the onnx package: pip install "lstm[onnx]" (or onnx>=1.23)',
                                  name="onnx") from error
    return write(model, path, example_input, *args, **options)


__all__ = ["load_keras", "load_keras_weights", "save_keras", "save_keras_weights", "keras_config", "to_torch",
           "from_torch", "export_onnx"]
