"""lstm.export_onnx: the graph written directly (opset 17, standard LSTM/GRU/RNN ops); ONNX Runtime
reproduces the layers' outputs and states (float32, max abs diff <= 1e-5 * max(1, scale)) over
layers x options x masks x state x directions, at batch sizes and lengths other than the
example's; streaming chunk by chunk with the state fed back; and every refusal names the option."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings, strategies as st

import lstm
from lstm import layers
from lstm.train.models import text_classifier

onnx = pytest.importorskip("onnx", reason="onnx is not installed")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: ONNX Runtime checks skipped")

MODELS = Path(__file__).parent / "data" / "keras_golden" / "models"
SHAPES = [(1, 3), (5, 11)]  # (batch, time) other than the export example's (2, 7)
# ONNX_EXAMPLES=N for a longer sweep (the README's numbers: 500)
SWEEP = settings(max_examples=int(os.environ.get("ONNX_EXAMPLES", 150)), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# the activations the recurrent ops take (but softplus, which ONNX Runtime's ops compute as log(1 + e^x):
# inf above x = 88, see test_softplus_in_the_ops), and those with σ(-z) = 1 - σ(z) (a coupled LSTM's)
OP_ACTIVATIONS = ["tanh", "sigmoid", "relu", "linear", "softsign", "elu", "leaky_relu", "hard_sigmoid",
                  "hard_sigmoid_tf_keras"]
SYMMETRIC = ["sigmoid", "hard_sigmoid", "hard_sigmoid_tf_keras"]
# as gates in the sweep: bounded ones (unbounded gates amplify float32 rounding past 1e-5 at random
# weights, in the layer as in ORT: test_unbounded_gates checks them at fixed seeds)
GATES = SYMMETRIC + ["tanh", "softsign"]
MASKS = ["none", "right", "left", "holes", "empty rows"]


def ops(path) -> list:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def run_onnx(path, *inputs, **named) -> dict:
    """The graph's outputs by name; `inputs` fill its first inputs in order, `named` the others."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = dict(zip([i.name for i in session.get_inputs()], inputs), **named)
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def assert_close(theirs, ours, what=""):
    ours = ours.detach().numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    assert theirs.shape == ours.shape, f"{what}: shape {theirs.shape} != {ours.shape}"
    scale = max(1.0, float(np.abs(ours).max(initial=0.0)))
    diff = float(np.abs(theirs - ours).max(initial=0.0))
    assert diff <= 1e-5 * scale, f"{what}: max abs diff {diff:.3g} (scale {scale:.3g})"


def floats(features):
    return lambda b, t: np.random.default_rng(b * 100 + t).standard_normal((b, t, features)).astype(np.float32)


def randomized(module, seed=0, scale=0.5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return module.eval()


def outputs_of(result) -> list:
    return list(result) if isinstance(result, tuple) else [result]


def check(model, path, make_input, op: str):
    """Exported with a (2, 7) example, ONNX Runtime equals the model at other shapes."""
    model.eval()
    lstm.export_onnx(model, path, make_input(2, 7))
    onnx.checker.check_model(str(path))
    assert op in ops(path), f"no ONNX {op} op in {sorted(set(ops(path)))}"
    for batch, steps in SHAPES:
        x = make_input(batch, steps)
        with torch.no_grad():
            expected = outputs_of(model(torch.as_tensor(x)))
        got = list(run_onnx(path, x).values())
        assert len(got) == len(expected)
        for ours, theirs in zip(expected, got):
            assert_close(theirs, ours)


def make_mask(pattern: str, batch: int, steps: int, rng) -> np.ndarray:
    """[B, T] bool: right-padded, left-padded, with holes, or with rows of no valid step."""
    if pattern == "none":
        return np.ones((batch, steps), bool)
    if pattern in ("right", "left"):
        lengths = rng.integers(1, steps + 1, size=batch)
        mask = np.arange(steps)[None] < lengths[:, None]
        return mask if pattern == "right" else mask[:, ::-1].copy()
    mask = rng.random((batch, steps)) < 0.6
    if pattern == "empty rows":
        mask[rng.random(batch) < 0.5] = False
        mask[0] = False
    return mask


@contextlib.contextmanager
def returning_states(layer):
    """The layer returning its final states too (the exported graph's `<layer>/h` outputs)."""
    subs = [layer] + ([layer.forward_layer, layer.backward_layer] if isinstance(layer, layers.Bidirectional) else [])
    before = [sub.return_state for sub in subs]
    for sub in subs:
        sub.return_state = True
    try:
        yield layer
    finally:
        for sub, value in zip(subs, before):
            sub.return_state = value


# ---------------------------------------------------------------------------------------------- the sweep

@st.composite
def recurrent_layers(draw):
    """A recurrent layer (maybe in a Bidirectional) with options the ops express."""
    kind = draw(st.sampled_from(["lstm", "gru", "simple_rnn"]))
    units = draw(st.integers(1, 5))
    options = dict(activation=draw(st.sampled_from(OP_ACTIVATIONS)), use_bias=draw(st.booleans()),
                   return_sequences=draw(st.booleans()), zero_output_for_mask=draw(st.booleans()),
                   dropout=draw(st.sampled_from([0.0, 0.3])), recurrent_dropout=draw(st.sampled_from([0.0, 0.3])))
    bidirectional = draw(st.booleans())
    if not bidirectional:
        options["go_backwards"] = draw(st.booleans())
    if kind != "simple_rnn":
        options["recurrent_activation"] = draw(st.sampled_from(GATES))
    if kind == "gru":
        options["reset_after"] = draw(st.booleans())
    if kind == "lstm":
        options.update(peephole=draw(st.booleans()), coupled=draw(st.booleans()),
                       forget_bias=draw(st.sampled_from([0.0, 1.0])), zoneout=draw(st.sampled_from([0.0, 0.2])),
                       recurrent_dropconnect=draw(st.sampled_from([0.0, 0.3])))
        if options["coupled"]:
            options["recurrent_activation"] = draw(st.sampled_from(SYMMETRIC))
    cls = {"lstm": layers.LSTM, "gru": layers.GRU, "simple_rnn": layers.SimpleRNN}[kind]
    layer = cls(units, **options)
    if bidirectional:
        layer = layers.Bidirectional(layer, merge_mode=draw(st.sampled_from(["concat", "sum", "ave", "mul", None])))
    return layer


@SWEEP
@given(layer=recurrent_layers(), pattern=st.sampled_from(MASKS), source=st.sampled_from(["input", "Masking",
                                                                                          "Embedding"]),
       state=st.booleans(), batch=st.integers(1, 4), steps=st.integers(1, 6), features=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_sweep_equals_the_layer(tmp_path, layer, pattern, source, state, batch, steps, features, seed):
    """ORT equals the layer: outputs and final states, with the mask from a graph input, a Masking
    or an Embedding(mask_zero=True), initial states fed or zeros."""
    note(repr(lstm.layers.serialize(layer)))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    if isinstance(layer, layers.Bidirectional) and layer.merge_mode is None:
        source = "input"  # (two outputs: not a Sequential's layer)
    mask = make_mask(pattern, batch, steps, rng)
    layer.build(features)
    randomized(layer, seed)
    if source == "Embedding":
        front = randomized(layers.Embedding(7, features, mask_zero=pattern != "none"), seed + 1)
        ids = np.where(mask, rng.integers(1, 7, size=mask.shape), 0).astype(np.int64)
        graph_inputs, x = [ids], front(torch.as_tensor(ids))
    else:
        x = rng.standard_normal((batch, steps, features)).astype(np.float32)
        if source == "Masking":
            front = layers.Masking(mask_value=0.5)
            x[~mask] = 0.5
        graph_inputs, x = [x], torch.as_tensor(x)
        x = front(x) if source == "Masking" else x
    model = layer if source == "input" else lstm.Sequential([front, layer])
    if source == "input" and pattern != "none":
        graph_inputs.append(mask)
    directions = [layer.forward_layer, layer.backward_layer] if isinstance(layer, layers.Bidirectional) else [layer]
    initial = [torch.randn(batch, size) for sub in directions for size in sub.cell.state_sizes] if state else None
    path = lstm.export_onnx(model, tmp_path / "m.onnx", graph_inputs[0], state=state,
                            mask=source == "input" and pattern != "none")
    given_mask = None if pattern == "none" else torch.as_tensor(mask)
    with torch.no_grad(), returning_states(layer):
        expected = outputs_of(layer(x, mask=given_mask, initial_state=initial))
    # unbounded activations (linear, relu, ...) as gates can overflow: not a comparison
    assume(all(bool((t.abs() < 1e6).all()) for t in expected))
    got = run_onnx(path, *graph_inputs, **{f"{sub.name}/initial_{s}": h.numpy() for sub, pair in
                                           zip(directions, _pairs(initial, directions)) for s, h in zip("hc", pair)})
    count = 2 if isinstance(layer, layers.Bidirectional) and layer.merge_mode is None else 1
    names = ["outputs", "outputs_backward"][:count]
    for output, ours in zip(names, expected):
        assert_close(got[output], ours, output)
    if state or getattr(layer, "return_state", False):
        states = expected[count:]
        state_names = [f"{sub.name}/{s}" for sub in directions for s in "hc"[:sub.cell.state_count]]
        assert len(states) == len(state_names)
        for name, ours in zip(state_names, states):
            assert_close(got[name], ours, name)


def _pairs(initial, directions) -> list:
    if initial is None:
        return [[] for _ in directions]
    pairs, k = [], 0
    for sub in directions:
        pairs.append(initial[k:k + sub.cell.state_count])
        k += sub.cell.state_count
    return pairs


@pytest.mark.parametrize("gate", ["relu", "linear", "elu", "leaky_relu"])
@pytest.mark.parametrize("cls", [layers.LSTM, layers.GRU])
def test_unbounded_gates(tmp_path, cls, gate):
    layer = randomized(cls(4, recurrent_activation=gate, return_sequences=True, input_dim=3), seed=1, scale=0.3)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 6, 3)).astype(np.float32)
    mask = make_mask("holes", 3, 6, rng)
    path = lstm.export_onnx(layer, tmp_path / "u.onnx", x, mask=True)
    with torch.no_grad():
        assert_close(run_onnx(path, x, mask)["outputs"], layer(torch.as_tensor(x), mask=torch.as_tensor(mask)))


def test_softplus_in_the_ops(tmp_path):
    """Softplus is the ops' function too; ONNX Runtime computes it as log(1 + e^x) there (inf for
    x > 88, where this library's gives x), so it is checked at ordinary pre-activations."""
    layer = randomized(layers.LSTM(4, activation="softplus", return_sequences=True, input_dim=3), seed=2)
    check(layer, tmp_path / "s.onnx", floats(3), "LSTM")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from([layers.LSTM, layers.GRU, layers.SimpleRNN]), chunks=st.lists(st.integers(1, 4), min_size=1,
                                                                                          max_size=4),
       masked=st.booleans(), seed=st.integers(0, 2**16))
def test_chunks_with_the_state_fed_back(tmp_path, kind, chunks, masked, seed):
    """state=True: ORT over the chunks of a sequence, each call fed the last one's state, equals a
    stateful layer called chunk by chunk (which, unmasked, equals one call over the whole)."""
    options = {"peephole": True, "forget_bias": 1.0} if kind is layers.LSTM else {}
    stateful = randomized(kind(4, return_sequences=True, stateful=True, input_dim=3, **options), seed)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, sum(chunks), 3)).astype(np.float32)
    mask = make_mask("holes" if masked else "none", 2, sum(chunks), rng)
    path = lstm.export_onnx(stateful, tmp_path / "s.onnx", x[:, :2], state=True, mask=True)
    names = [f"{stateful.name}/{s}" for s in "hc"[:stateful.cell.state_count]]
    carried = {f"{stateful.name}/initial_{s}": np.zeros((2, 4), np.float32) for s in "hc"[:len(names)]}
    start = 0
    pieces = []
    for size in chunks:
        part, part_mask = x[:, start:start + size], mask[:, start:start + size]
        got = run_onnx(path, part, part_mask, **carried)
        with torch.no_grad():
            ours = stateful(torch.as_tensor(part), mask=torch.as_tensor(part_mask))
        assert_close(got["outputs"], ours, f"chunk at {start}")
        for name, carried_state in zip(names, stateful.states):
            assert_close(got[name], carried_state, name)
        carried = {name.replace("/", "/initial_"): got[name] for name in names}
        pieces.append(got["outputs"])
        start += size
    if not masked:
        whole = kind.from_config({**stateful.get_config(), "stateful": False})
        whole.set_weights(stateful.get_weights())
        with torch.no_grad():
            assert_close(np.concatenate(pieces, axis=1), whole(torch.as_tensor(x)), "the chunks")


# ---------------------------------------------------------------------------------------------- models

@pytest.mark.parametrize("return_sequences", [False, True])
@pytest.mark.parametrize("cls, op", [(layers.LSTM, "LSTM"), (layers.GRU, "GRU"), (layers.SimpleRNN, "RNN")])
def test_single_layer(tmp_path, cls, op, return_sequences):
    layer = randomized(cls(6, return_sequences=return_sequences, input_dim=4))
    check(layer, tmp_path / "m.onnx", floats(4), op)


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_linear_before_reset_is_reset_after(tmp_path, reset_after):
    layer = randomized(layers.GRU(3, reset_after=reset_after, input_dim=2))
    check(layer, tmp_path / "g.onnx", floats(2), "GRU")
    gru = [n for n in onnx.load(str(tmp_path / "g.onnx")).graph.node if n.op_type == "GRU"][0]
    assert {a.name: a.i for a in gru.attribute}["linear_before_reset"] == int(reset_after)


def test_the_graph_is_opset_17_without_torch_onnx(tmp_path):
    path = lstm.export_onnx(randomized(layers.LSTM(3, input_dim=2)), tmp_path / "m.onnx", floats(2)(1, 4))
    model = onnx.load(path)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)] and model.ir_version == 8
    assert model.producer_name == "lstm"


def test_bidirectional_is_one_op_and_a_different_backward_layer_two(tmp_path):
    same = randomized(layers.Bidirectional(layers.LSTM(4, return_sequences=True), input_shape=(None, 3)))
    check(same, tmp_path / "b.onnx", floats(3), "LSTM")
    (node,) = [n for n in onnx.load(str(tmp_path / "b.onnx")).graph.node if n.op_type == "LSTM"]
    assert {a.name: a.s for a in node.attribute}["direction"] == b"bidirectional"
    other = randomized(layers.Bidirectional(layers.LSTM(4, return_sequences=True),
                                            backward_layer=layers.LSTM(3, go_backwards=True, return_sequences=True,
                                                                       use_bias=False),
                                            input_shape=(None, 3)))
    check(other, tmp_path / "o.onnx", floats(3), "LSTM")
    assert ops(tmp_path / "o.onnx").count("LSTM") == 2


def test_cell_is_one_step(tmp_path):
    cell = randomized(layers.LSTMCell(4, peephole=True, input_dim=3))
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    h, c = np.full((2, 4), 0.3, np.float32), np.full((2, 4), -0.2, np.float32)
    path = lstm.export_onnx(cell, tmp_path / "c.onnx", x, state=True)
    got = run_onnx(path, x, **{f"{cell.name}/initial_h": h, f"{cell.name}/initial_c": c})
    with torch.no_grad():
        out, (h1, c1) = cell(torch.as_tensor(x), [torch.as_tensor(h), torch.as_tensor(c)])
    assert list(got) == ["outputs", f"{cell.name}/h", f"{cell.name}/c"]
    for name, ours in zip(got, (out, h1, c1)):
        assert_close(got[name], ours, name)


def test_stacked_tagger_with_dense(tmp_path):
    model = randomized(lstm.Sequential([
        layers.Bidirectional(layers.GRU(4, return_sequences=True), input_shape=(None, 3)),
        layers.LSTM(5, return_sequences=True, input_dim=8),
        layers.Dropout(0.5),
        layers.TimeDistributed(layers.Dense(3, activation="softmax", input_dim=5)),
        layers.Dense(2, activation="tanh", input_dim=3),
    ]))
    check(model, tmp_path / "t.onnx", floats(3), "GRU")
    assert {"LSTM", "GRU"} <= set(ops(tmp_path / "t.onnx"))


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu", "linear", "softplus", "softsign", "exponential",
                                        "hard_silu", "selu", "softmax", "elu", "leaky_relu", "hard_sigmoid",
                                        "hard_sigmoid_tf_keras", "relu6", "hard_tanh", "silu", "mish", "log_sigmoid",
                                        "gelu"])
def test_dense_activations(tmp_path, activation):
    model = randomized(lstm.Sequential([layers.Dense(5, activation=activation, input_dim=3)]), scale=1.0)
    check(model, tmp_path / "d.onnx", lambda b, t: 2 * floats(3)(b, t), "MatMul")


def test_stacked_masked_model_with_state(tmp_path):
    """A mask through two recurrent layers and a Dense; the states of both layers in and out."""
    model = randomized(lstm.Sequential([
        layers.Masking(mask_value=-1.0, input_shape=(None, 3)),
        layers.LSTM(4, return_sequences=True, input_dim=3, name="first"),
        layers.TimeDistributed(layers.Dense(3, input_dim=4)),
        layers.Bidirectional(layers.GRU(2, return_sequences=True), merge_mode="sum", input_shape=(None, 3)),
        layers.SimpleRNN(3, go_backwards=True, input_dim=2, name="last"),
    ]))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 9, 3)).astype(np.float32)
    x[~make_mask("holes", 4, 9, rng)] = -1.0
    path = lstm.export_onnx(model, tmp_path / "m.onnx", x, state=True)
    names = [i.name for i in ort.InferenceSession(path).get_inputs()]
    bi = model.layers[3]
    assert names == ["inputs", "first/initial_h", "first/initial_c", f"{bi.forward_layer.name}/initial_h",
                     f"{bi.backward_layer.name}/initial_h", "last/initial_h"]
    zeros = {name: np.zeros((4, 4 if name.startswith("first") else 2 if "gru" in name else 3), np.float32)
             for name in names[1:]}
    got = run_onnx(path, x, **zeros)
    with torch.no_grad():
        assert_close(got["outputs"], model(torch.as_tensor(x)))
    assert list(got)[1:] == ["first/h", "first/c", f"{bi.forward_layer.name}/h", f"{bi.backward_layer.name}/h",
                             "last/h"]


def test_embedding_model_without_mask(tmp_path):
    model = randomized(lstm.Sequential([
        layers.InputLayer(batch_shape=(None, None), dtype="int32"),
        layers.Embedding(50, 6),
        layers.LSTM(4, input_dim=6),
        layers.Dense(1, activation="sigmoid", input_dim=4),
    ]))
    ids = lambda b, t: np.random.default_rng(b + t).integers(1, 50, size=(b, t)).astype(np.int64)  # noqa: E731
    check(model, tmp_path / "e.onnx", ids, "LSTM")


def test_keras_files_masked_sentiment_and_forecaster(tmp_path):
    """Keras' own numbers: the sentiment model (Embedding(mask_zero=True), right-padded ids) and the
    forecaster, from their Keras files."""
    for name, atol in (("sentiment", 1e-5), ("forecaster", 2e-5)):
        model = lstm.load_keras(MODELS / f"{name}.keras")
        io = np.load(MODELS / f"{name}.io.npz")
        path = lstm.export_onnx(model, tmp_path / f"{name}.onnx", io["inputs"])
        np.testing.assert_allclose(run_onnx(path, io["inputs"])["outputs"], io["outputs"], atol=atol, rtol=1e-5)


def test_sentiment_model_predictions(tmp_path):
    """`lstm train sentiment`'s architecture (untrained weights): ORT's probabilities are the model's,
    on padded texts of every length, one with no known word."""
    hp = {"embedding": 12, "units": 8, "dropout": 0.5}
    model = randomized(text_classifier(40, 2, hp), seed=5)
    rng = np.random.default_rng(5)
    lengths = [80, 1, 17, 0, 45, 3]
    ids = np.zeros((len(lengths), 80), np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1, 40, size=length)
    path = lstm.export_onnx(model, tmp_path / "s.onnx", ids)
    got = run_onnx(path, ids)["outputs"]
    with torch.no_grad():
        ours = model(torch.as_tensor(ids), training=False)
    assert_close(got, ours)
    assert (1 / (1 + np.exp(-got)) > 0.5).tolist() == (torch.sigmoid(ours) > 0.5).tolist()


def test_output_names_and_return_state(tmp_path):
    layer = randomized(layers.LSTM(5, return_state=True, input_dim=3, name="enc"))
    path = lstm.export_onnx(layer, tmp_path / "s.onnx", floats(3)(2, 4))
    assert [o.name for o in onnx.load(path).graph.output] == ["outputs", "enc/h", "enc/c"]
    path = lstm.export_onnx(layer, tmp_path / "n.onnx", floats(3)(2, 4), input_names=["x"],
                            output_names=["y", "h", "c"])
    model = onnx.load(path)
    assert [i.name for i in model.graph.input] == ["x"] and [o.name for o in model.graph.output] == ["y", "h", "c"]
    x = floats(3)(3, 5)
    with torch.no_grad():
        for ours, theirs in zip(layer(torch.as_tensor(x)), run_onnx(path, x).values()):
            assert_close(theirs, ours)


def test_fixed_axes(tmp_path):
    path = lstm.export_onnx(randomized(layers.GRU(3, input_dim=2)), tmp_path / "f.onnx", floats(2)(2, 7),
                            dynamic_axes=False)
    dims = [d.dim_value for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 7, 2]


# ---------------------------------------------------------------------------------------------- refusals

def lstm_with(**options):
    return layers.LSTM(3, input_dim=2, name="enc", **options)


@pytest.mark.parametrize("model, match", [
    (lstm_with(cell_clip=3.0), "layer 'enc': cell_clip=3.0 clips C, which ONNX's LSTM cannot do"),
    (lstm_with(proj_size=2), "layer 'enc': proj_size=2 feeds the projected h back into the recurrence"),
    (lstm_with(layer_norm=True), "layer 'enc': layer_norm=True has no ONNX LSTM equivalent"),
    (lstm_with(coupled=True, recurrent_activation="tanh"),
     r"layer 'enc': coupled=True needs recurrent_activation with σ\(-z\) = 1 - σ\(z\) .*got 'tanh'"),
    (lstm_with(activation="gelu"), "layer 'enc': activation='gelu' has no ONNX recurrent-op equivalent"),
    (layers.GRU(3, recurrent_activation="swish", input_dim=2, name="enc"),
     "layer 'enc': recurrent_activation='swish' has no ONNX recurrent-op equivalent"),
    (lstm_with(activation=lambda x: x * 2), "layer 'enc': activation is a custom callable"),
    (lstm_with(stateful=True), r"layer 'enc' is stateful .*; export with state=True.*\(enc/initial_h, enc/initial_c\)"),
    (lstm.Sequential([lstm_with(return_state=True)]), "layer 0 \\('enc'\\) has return_state=True inside a Sequential"),
    (lstm.Sequential([layers.Bidirectional(lstm_with(return_sequences=True), merge_mode=None, input_shape=(None, 2))]),
     "merge_mode=None returns two tensors"),
    (lstm.Sequential([layers.TimeDistributed(lstm_with())]), r"TimeDistributed\(LSTM\) is not supported"),
    (lstm.Sequential([torch.nn.Linear(2, 2)]), "Linear is not supported"),
    (lstm.Sequential([layers.LSTM(3, name="lazy")]), "layer 'lazy' has no weights yet"),
    (lstm.Sequential([layers.Dense(3, activation=torch.sin, input_dim=2, name="out")]),
     "layer 0 \\('out'\\): activation 'sin' is a custom callable, which has no ONNX form"),
    (lstm.Sequential([layers.LSTM(3, input_dim=5, name="enc")]), "layer 0 \\('enc'\\) expects 5 input features, got 2"),
])
def test_refusals_name_the_layer_and_option(tmp_path, model, match):
    with pytest.raises(ValueError, match=match):
        lstm.export_onnx(model, tmp_path / "x.onnx", floats(2)(1, 4))
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("arguments, match", [
    ({"opset_version": 18}, "opset_version: this exporter writes opset 17, got 18"),
    ({"input_names": ["a", "b"]}, r"input_names: expected one name .*got \['a', 'b'\]"),
    ({"output_names": ["y", "h"]}, "output_names: the graph has 1 outputs \\(outputs\\), got 2 names"),
    ({"example_input": np.zeros((2, 3), np.float32)}, r"example_input: expected a 3-D array \[batch, time, features\]"),
    ({"example_input": np.zeros((2, 3, 2), np.complex64)}, "example_input: expected floats or int32/int64"),
    ({"state": 1}, "state: expected True or False, got 1"),
])
def test_bad_arguments(tmp_path, arguments, match):
    arguments = {"example_input": floats(2)(1, 4), **arguments}
    with pytest.raises((ValueError, TypeError), match=match):
        lstm.export_onnx(lstm_with(), tmp_path / "x.onnx", **arguments)


def test_a_cell_takes_no_mask(tmp_path):
    with pytest.raises(ValueError, match="mask: a cell runs one step"):
        lstm.export_onnx(layers.GRUCell(3, input_dim=2), tmp_path / "x.onnx", np.zeros((1, 2), np.float32), mask=True)


def test_variant_options_identity_at_inference_export(tmp_path):
    """zoneout, recurrent_dropconnect and the dropouts change nothing at inference: exported."""
    layer = randomized(lstm_with(zoneout=0.3, recurrent_dropconnect=0.2, dropout=0.1, recurrent_dropout=0.1,
                                 return_sequences=True))
    check(layer, tmp_path / "z.onnx", floats(2), "LSTM")


def test_the_library_imports_without_onnx_and_export_says_what_to_install():
    """onnx is an optional extra: `import lstm` works without it, and export_onnx names the package."""
    script = """
import sys
sys.modules["onnx"] = None  # (as if not installed)
import torch
import lstm
from lstm import layers
model = lstm.models.Sequential([layers.LSTM(3, input_dim=2)])
model(torch.zeros(1, 2, 2))
try:
    lstm.export_onnx(model, "unused.onnx", torch.zeros(1, 2, 2))
except ModuleNotFoundError as error:
    print(error)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'pip install "lstm[onnx]"' in result.stdout


def test_quantized_export_runs_int8_ops_within_quantization_error(tmp_path):
    """quantize=True: ONNX Runtime's quantize_dynamic, per output channel: the LSTM runs as
    DynamicQuantizeLSTM, Dense as MatMulInteger, and the outputs stay within int8's error."""
    ort = pytest.importorskip("onnxruntime")
    import onnx

    torch.manual_seed(0)
    model = lstm.models.Sequential([layers.LSTM(32, return_sequences=True, input_dim=8), layers.Dense(4)])
    x = torch.randn(3, 10, 8)
    with torch.no_grad():
        expected = model(x).numpy()
    path = lstm.export_onnx(model, tmp_path / "int8.onnx", x, quantize=True)
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert {"DynamicQuantizeLSTM", "MatMulInteger"} <= ops and "LSTM" not in ops
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"inputs": x.numpy()})[0]
    error = float(np.abs(got - expected).max())
    assert 0 < error <= 0.05 * max(1.0, float(np.abs(expected).max())), error
