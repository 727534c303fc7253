"""A model exported by `lstm export RUN --format onnx`, run by ONNX Runtime and called as a task's
model is (`model(x, mask=None, training=False)` -> a tensor; the character model's -> (logits,
None)), so that `lstm predict --onnx` and `lstm evaluate --onnx` serve the exported file through
the task's own pre- and post-processing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..train import TrainError

NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
               "tensor(bool)": np.bool_}


class OnnxModel(torch.nn.Module):
    """The graph's first output for its first input; a `mask` input gets the call's mask (all steps
    valid without one), state inputs (a graph exported with --state) get zeros. `returns_state`:
    answer (output, None), as the character model returns (logits, state)."""

    def __init__(self, path, returns_state: bool = False):
        super().__init__()
        self.returns_state = returns_state
        try:
            import onnxruntime
        except ImportError:
            raise TrainError("--onnx: onnxruntime is not installed (pip install onnxruntime)") from None
        self.path = Path(path)
        if not self.path.is_file():
            raise TrainError(f"--onnx {path}: no such file")
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as error:  # (onnxruntime's own exception types)
            raise TrainError(f"--onnx {path}: ONNX Runtime cannot load it ({str(error).splitlines()[0]})") from None
        self.inputs = self.session.get_inputs()

    def forward(self, x, mask=None, training=False):
        names = [i.name for i in self.inputs]
        if mask is not None and "mask" not in names:
            raise TrainError(f"--onnx {self.path}: this task passes a mask, and the graph has no `mask` input (its "
                             f"inputs: {', '.join(names)}); export the run with `lstm export RUN --format onnx`")
        data = self.inputs[0]
        x = np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x)
        feeds = {data.name: x.astype(NUMPY_TYPES.get(data.type, x.dtype))}
        for extra in self.inputs[1:]:
            if extra.name == "mask":
                feeds["mask"] = np.ones(x.shape[:2], bool) if mask is None else np.asarray(mask, bool)
            else:
                feeds[extra.name] = np.zeros((x.shape[0], extra.shape[-1]), NUMPY_TYPES.get(extra.type, np.float32))
        try:
            (output,) = self.session.run([self.session.get_outputs()[0].name], feeds)
        except Exception as error:
            raise TrainError(f"--onnx {self.path}: ONNX Runtime cannot run it on this task's input of shape "
                             f"{x.shape} ({str(error).splitlines()[0]})") from None
        return (torch.as_tensor(output), None) if self.returns_state else torch.as_tensor(output)
