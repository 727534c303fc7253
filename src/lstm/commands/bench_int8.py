"""The int8 section of `lstm bench`: inference of this library's LSTM after `lstm.quantize` (int8
weights per output column, x_t and h quantized per row at each step) against the same layer in
float32 and against ONNX Runtime running the layer as `export_onnx(..., quantize=True)` writes it
(ORT's quantize_dynamic: DynamicQuantizeLSTM); and the streaming step of B rows, int8 against
float32. The int8 outputs are checked against float32's first."""

from __future__ import annotations

import itertools
import os
import tempfile

import torch

from .. import interop, layers
from ..quantization import quantize
from .bench_cases import Contender, onnx_session, onnx_status

OURS = "lstm int8 (lstm.quantize)"
BASELINE = "lstm fp32"
ORT_INT8 = "onnxruntime int8 (quantize_dynamic)"
STREAM_OURS = "lstm int8 stream(B).step"
STREAM_BASELINE = "lstm fp32 stream(B).step"
# outputs in (-1, 1): int8's rounding (1/127 of a row's largest value per operand) carried over the steps
TOLERANCE = 0.05


def _layers(shape: tuple, seed: int):
    B, T, D, H = shape
    torch.manual_seed(seed)
    layer = layers.LSTM(H, return_sequences=True, input_dim=D)
    with torch.no_grad():  # a non-trivial bias
        layer.cell.bias.add_(0.1 * torch.randn_like(layer.cell.bias))
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed + 1))
    return layer, quantize(layer), x


def contenders(shape: tuple, seed: int = 0, threads: int = 2,
               onnx: bool = True) -> tuple[list[Contender], torch.Tensor]:
    """Rows for a sequence call (forward only): ours int8, ours float32, ORT int8 (unless not `onnx`)."""
    layer, quantized, x = _layers(shape, seed)
    rows = [Contender(OURS, lambda: quantized(x), info={"module": quantized, "float": layer}),
            Contender(BASELINE, lambda: layer(x))]
    status = onnx_status() if onnx else "n/a (skipped: --no-onnx)"
    if status is None:
        with tempfile.TemporaryDirectory() as folder:
            path = interop.export_onnx(layer, os.path.join(folder, "lstm.onnx"), x, quantize=True)
            session = onnx_session(path, threads)
        feed = {"inputs": x.numpy()}
        rows.append(Contender(ORT_INT8, lambda: torch.from_numpy(session.run(None, feed)[0])))
    else:
        rows.append(Contender(ORT_INT8, status=status))
    return rows, x


def stream_contenders(shape: tuple, seed: int = 0) -> tuple[list[Contender], torch.Tensor]:
    """Rows for one streaming step of B rows: ours int8, ours float32 (each `layer.stream(B).step`)."""
    layer, quantized, x = _layers(shape, seed)
    rows = []
    for name, model in ((STREAM_OURS, quantized), (STREAM_BASELINE, layer)):
        stream = model.stream(batch_size=x.shape[0])
        next_input = itertools.cycle([x[:, t].contiguous() for t in range(x.shape[1])]).__next__
        rows.append(Contender(name, lambda stream=stream, next_input=next_input: stream.step(next_input()),
                              info={"module": quantized, "float": layer}))
    return rows, x


def check(rows: list[Contender], x: torch.Tensor) -> dict:
    """Max |difference| of the int8 layer's outputs from float32's, and of its stream's steps from
    its own sequence call; raises ValueError past TOLERANCE."""
    quantized, layer = rows[0].info["module"], rows[0].info["float"]
    with torch.no_grad():
        int8 = quantized(x)
        stream = quantized.stream(batch_size=x.shape[0])
        steps = torch.stack([stream.step(x[:, t]) for t in range(x.shape[1])], 1)
        result = {"max_abs_diff_forward": float((int8 - layer(x)).abs().max()),
                  "max_abs_diff_stream": float((steps - int8).abs().max())}
    if not max(result.values()) <= TOLERANCE:
        raise ValueError(f"{OURS} differs from {BASELINE}: {result} (tolerance {TOLERANCE:g})")
    return result
