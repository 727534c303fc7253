"""lstm.export_onnx: standard ONNX LSTM/GRU/RNN ops; ONNX Runtime reproduces the PyTorch outputs
at batch sizes and sequence lengths other than the example's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lstm
from lstm import layers

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: ONNX Runtime checks skipped")

MODELS = Path(__file__).parent / "data" / "keras_golden" / "models"
SHAPES = [(1, 3), (5, 11)]  # (batch, time) different from the export example's (2, 7)


def ops(path) -> set:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def run_onnx(path, x: np.ndarray) -> list:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


def check(model, path, make_input, op: str, atol=1e-5):
    model.eval()
    lstm.export_onnx(model, path, make_input(2, 7))
    onnx.checker.check_model(str(path))
    assert op in ops(path), f"no ONNX {op} op in {sorted(ops(path))}"
    for batch, steps in SHAPES:
        x = make_input(batch, steps)
        with torch.no_grad():
            expected = model(torch.as_tensor(x))
        expected = list(expected) if isinstance(expected, tuple) else [expected]
        got = run_onnx(path, x)
        assert len(got) == len(expected)
        for ours, theirs in zip(expected, got):
            assert theirs.shape == tuple(ours.shape)
            np.testing.assert_allclose(theirs, ours.numpy(), atol=atol, rtol=1e-5)


def floats(features):
    return lambda b, t: np.random.default_rng(b * 100 + t).standard_normal((b, t, features)).astype(np.float32)


def randomized(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module


@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("cls, op", [(layers.LSTM, "LSTM"), (layers.GRU, "GRU"), (layers.SimpleRNN, "RNN")])
def test_single_layer(tmp_path, cls, op, return_sequences):
    layer = randomized(cls(6, return_sequences=return_sequences, input_dim=4))
    check(layer, tmp_path / "m.onnx", floats(4), op)


def test_gru_is_linear_before_reset(tmp_path):
    layer = randomized(layers.GRU(3, input_dim=2))
    lstm.export_onnx(layer, tmp_path / "g.onnx", floats(2)(2, 7))
    gru = [n for n in onnx.load(str(tmp_path / "g.onnx")).graph.node if n.op_type == "GRU"][0]
    assert {a.name: a.i for a in gru.attribute}.get("linear_before_reset") == 1


def test_return_state(tmp_path):
    layer = randomized(layers.LSTM(5, return_state=True, input_dim=3))
    check(layer, tmp_path / "s.onnx", floats(3), "LSTM")


@pytest.mark.parametrize("return_sequences", [False, True])
def test_bidirectional(tmp_path, return_sequences):
    layer = randomized(layers.Bidirectional(layers.LSTM(4, return_sequences=return_sequences), input_shape=(None, 3)))
    check(layer, tmp_path / "b.onnx", floats(3), "LSTM")


def test_stacked_tagger_with_dense(tmp_path):
    model = randomized(lstm.Sequential([
        layers.Bidirectional(layers.GRU(4, return_sequences=True), input_shape=(None, 3)),
        layers.LSTM(5, return_sequences=True, input_dim=8),
        layers.Dropout(0.5),
        layers.TimeDistributed(layers.Dense(3, activation="softmax", input_dim=5)),
        layers.Dense(2, activation="tanh", input_dim=3),
    ]))
    check(model, tmp_path / "t.onnx", floats(3), "GRU")
    assert {"LSTM", "GRU"} <= ops(tmp_path / "t.onnx")


def test_embedding_model_without_mask(tmp_path):
    model = randomized(lstm.Sequential([
        layers.InputLayer(batch_shape=(None, None), dtype="int32"),
        layers.Embedding(50, 6),
        layers.LSTM(4, input_dim=6),
        layers.Dense(1, activation="sigmoid", input_dim=4),
    ]))
    ids = lambda b, t: np.random.default_rng(b + t).integers(1, 50, size=(b, t)).astype(np.int64)  # noqa: E731
    check(model, tmp_path / "e.onnx", ids, "LSTM")


def test_keras_forecaster_file(tmp_path):
    model = lstm.load_keras(MODELS / "forecaster.keras")
    check(model, tmp_path / "f.onnx", floats(3), "LSTM")
    io = np.load(MODELS / "forecaster.io.npz")
    got = run_onnx(tmp_path / "f.onnx", io["inputs"])[0]
    np.testing.assert_allclose(got, io["outputs"], atol=2e-5, rtol=1e-5)


def test_masked_models_refused(tmp_path):
    with pytest.raises(ValueError, match="mask"):
        lstm.export_onnx(lstm.load_keras(MODELS / "sentiment.keras"), tmp_path / "x.onnx", np.ones((2, 80), np.int32))
    masked = lstm.Sequential([layers.Masking(), layers.LSTM(3, input_dim=2)])
    with pytest.raises(ValueError, match="Masking"):
        lstm.export_onnx(masked, tmp_path / "y.onnx", floats(2)(2, 7))


def test_unsupported_refused(tmp_path):
    with pytest.raises(ValueError, match="stateful"):
        lstm.export_onnx(layers.LSTM(3, stateful=True, input_dim=2), tmp_path / "z.onnx", floats(2)(1, 4))
    with pytest.raises(ValueError, match="hard_sigmoid"):
        lstm.export_onnx(layers.LSTM(3, recurrent_activation="hard_sigmoid", input_dim=2), tmp_path / "z.onnx",
                         floats(2)(1, 4))
