"""Keras both ways, checked against Keras 3 itself (torch backend, no TensorFlow): `.keras` files that
`keras.saving.load_model` loads and that predict what this library predicts, configs that
`keras.layers.deserialize` reads, and the four places where this library differed from Keras 3."""

from __future__ import annotations

import json
import os
import zipfile

os.environ["KERAS_BACKEND"] = "torch"  # (before keras is imported anywhere)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import lstm  # noqa: E402
from lstm import layers  # noqa: E402

TOLERANCE = 1e-5  # float32, this library's kernels against Keras' (summation order)


def randomized(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.4)
    return model


def tokens(batch, steps, vocab, seed=1):
    """Token ids, right-padded with zeros (rows of different lengths)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, steps), generator=generator)
    lengths = torch.tensor([steps, steps - 3, 2, steps - 1])[:batch]
    return ids * (torch.arange(steps)[None, :] < lengths[:, None])


def series(batch, steps, features, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, features, generator=generator)
    x[1, -2:] = 0.0  # a masked tail for Masking
    return x


MODELS = {
    "sentiment (Embedding mask_zero, Dropout, LSTM, Dense)": (lambda: lstm.Sequential([
        layers.Embedding(50, 6, mask_zero=True), layers.Dropout(0.2), layers.LSTM(5, input_dim=6),
        layers.Dropout(0.2), layers.Dense(1, input_dim=5)], name="sentiment"), lambda: tokens(4, 9, 50)),
    "Masking, Bidirectional GRU, SimpleRNN, TimeDistributed Dense": (lambda: lstm.Sequential([
        layers.Masking(0.0), layers.Bidirectional(layers.GRU(4, return_sequences=True), merge_mode="sum"),
        layers.SimpleRNN(3, return_sequences=True, activation="relu"), layers.TimeDistributed(layers.Dense(2))]),
        lambda: series(3, 7, 5)),
    "InputLayer, LSTM options, GRU reset_after=False, RNN(LSTMCell)": (lambda: lstm.Sequential([
        layers.Input(shape=(None, 4)),
        layers.LSTM(5, return_sequences=True, go_backwards=True, unit_forget_bias=False,
                    recurrent_activation="hard_sigmoid"),
        layers.GRU(3, return_sequences=True, reset_after=False),
        layers.RNN(layers.LSTMCell(2))]), lambda: series(2, 6, 4)),
}


def built(make_model, make_inputs):
    model = make_model()
    x = make_inputs()
    model(x)  # (builds every layer)
    return randomized(model).eval(), x


def keras_predict(model, x):
    x = x.numpy().astype("int32") if not x.is_floating_point() else x.numpy()
    return keras.ops.convert_to_numpy(model(x, training=False))


@pytest.mark.parametrize("case", list(MODELS))
def test_save_keras_loads_in_keras_and_predicts_the_same(case, tmp_path):
    model, x = built(*MODELS[case])
    path = tmp_path / "model.keras"
    lstm.save_keras(model, path)
    theirs = keras.saving.load_model(path)
    ours = model(x).detach().numpy()
    assert np.abs(keras_predict(theirs, x) - ours).max() <= TOLERANCE
    assert [w.shape for w in theirs.get_weights()] == [w.shape for w in model.get_weights()]
    again = lstm.load_keras(path)
    assert all(np.array_equal(a, b) for a, b in zip(again.get_weights(), model.get_weights()))
    assert np.abs(again(x).detach().numpy() - ours).max() == 0
    with zipfile.ZipFile(path) as archive:
        assert set(archive.namelist()) == {"config.json", "metadata.json", "model.weights.h5"}
        assert json.loads(archive.read("metadata.json"))["keras_version"].startswith("3.")


def test_keras_files_of_keras_itself_round_trip(tmp_path):
    """A model Keras 3 saved: read here, saved again here, loaded by Keras: the same predictions."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "keras_golden", "models", "sentiment.keras")
    if not os.path.exists(path):
        pytest.skip("keras_golden/models not beside the repository")
    ours = lstm.load_keras(path)
    lstm.save_keras(ours, tmp_path / "again.keras")
    original, again = keras.saving.load_model(path), keras.saving.load_model(tmp_path / "again.keras")
    x = tokens(4, 80, 1000)
    assert np.abs(keras_predict(again, x) - keras_predict(original, x)).max() <= TOLERANCE


def test_save_keras_refusals(tmp_path):
    peephole = lstm.Sequential([layers.LSTM(3, peephole=True, input_dim=2, name="lstm_peep")])
    with pytest.raises(ValueError, match=r"^save_keras: 'lstm_peep'.*options \{'peephole': True\}.*Keras' LSTM"):
        lstm.save_keras(peephole, tmp_path / "a.keras")
    with pytest.raises(TypeError, match=r"^model: expected an lstm.Sequential, got LSTM"):
        lstm.save_keras(layers.LSTM(3, input_dim=2), tmp_path / "b.keras")
    with pytest.raises(ValueError, match=r"input shape is unknown.*lstm.layers.Input"):
        lstm.save_keras(lstm.Sequential([layers.LSTM(3)]), tmp_path / "c.keras")
    stateful = lstm.Sequential([layers.LSTM(3, stateful=True, input_dim=2, name="carry")])
    with pytest.raises(ValueError, match=r"'carry': a stateful layer needs a fixed batch size"):
        lstm.save_keras(stateful, tmp_path / "d.keras")
    stateful = lstm.Sequential([layers.Input(batch_shape=(2, None, 2)), layers.LSTM(3, stateful=True, input_dim=2)])
    lstm.save_keras(stateful, tmp_path / "e.keras")
    assert keras.saving.load_model(tmp_path / "e.keras").layers[0].stateful
    dense_only, x = built(lambda: lstm.Sequential([layers.Dense(3), layers.Dense(1)]), lambda: torch.randn(4, 5))
    lstm.save_keras(dense_only, tmp_path / "f.keras")  # (no recurrent layer: a [batch, features] input)
    assert np.abs(keras_predict(keras.saving.load_model(tmp_path / "f.keras"), x) -
                  dense_only(x).detach().numpy()).max() <= TOLERANCE


# ----- configs ------------------------------------------------------------------------------------
LAYERS = {
    "LSTM": lambda: layers.LSTM(4, return_sequences=True, dropout=0.1, kernel_regularizer="l2"),
    "GRU": lambda: layers.GRU(3, reset_after=False, go_backwards=True),
    "SimpleRNN": lambda: layers.SimpleRNN(2, activation="relu", dtype="float64"),
    "RNN(GRUCell)": lambda: layers.RNN(layers.GRUCell(3), return_state=True),
    "RNN(LSTMCell) mixed_bfloat16": lambda: layers.RNN(layers.LSTMCell(3), dtype="mixed_bfloat16"),
    "Bidirectional(LSTM)": lambda: layers.Bidirectional(layers.LSTM(3, return_sequences=True), merge_mode="ave"),
    "Bidirectional float64": lambda: layers.Bidirectional(layers.GRU(3), dtype="float64"),
    "TimeDistributed(Dense)": lambda: layers.TimeDistributed(layers.Dense(3, activation="tanh")),
    "Embedding": lambda: layers.Embedding(10, 3, mask_zero=True),
    "Masking": lambda: layers.Masking(-1.0),
    "Dense": lambda: layers.Dense(2, use_bias=False),
    "Dropout": lambda: layers.Dropout(0.3, seed=4),
    "LSTMCell": lambda: layers.LSTMCell(64),
}


@pytest.mark.parametrize("case", list(LAYERS))
def test_serialize_is_what_keras_deserializes(case):
    """`layers.serialize` has keras.layers.serialize's keys; Keras 3 rebuilds the layer from it
    (nested cells and layers too), and its own serialization of that layer reads back here to the
    same config."""
    layer = LAYERS[case]()
    entry = layers.serialize(layer)
    assert set(entry) == {"module", "class_name", "config", "registered_name"} and entry["module"] == "keras.layers"
    theirs = keras.layers.deserialize(entry)
    assert type(theirs).__name__ == type(layer).__name__
    again = layers.deserialize(keras.layers.serialize(theirs))
    if isinstance(layer, layers.Bidirectional):  # (Keras writes its forward and backward copies, renamed)
        unnamed = lambda sub: {k: v for k, v in sub.get_config().items() if k != "name"}  # noqa: E731
        assert unnamed(again.forward_layer) == unnamed(layer.forward_layer)
        assert unnamed(again.backward_layer) == unnamed(layer.backward_layer)
        assert again.merge_mode == layer.merge_mode and again.dtype_policy.name == layer.dtype_policy.name
    else:
        assert again.get_config() == layer.get_config()
    assert set(keras.layers.serialize(theirs)) >= set(entry)


def test_a_model_goes_through_keras_and_back():
    """A Sequential serializes as Keras 3 writes one (module 'keras'): keras.layers.deserialize
    rebuilds it, and this library reads Keras' serialization of it back to the same layers."""
    model, _ = built(*MODELS["sentiment (Embedding mask_zero, Dropout, LSTM, Dense)"])
    entry = layers.serialize(model)
    assert (entry["module"], entry["class_name"]) == ("keras", "Sequential")
    theirs = keras.layers.deserialize(entry)
    assert [type(layer).__name__ for layer in theirs.layers] == ["Embedding", "Dropout", "LSTM", "Dropout", "Dense"]
    again = layers.deserialize(keras.layers.serialize(theirs))
    assert isinstance(again, lstm.Sequential) and again.name == model.name
    assert [layer.get_config() for layer in again.layers] == [layer.get_config() for layer in model.layers]


def test_the_tutorials_flat_configs_stay_flat():
    config = layers.LSTMCell(64).get_config()
    assert "module" not in config and config["units"] == 64 and config["activation"] == "tanh"
    assert "module" not in layers.LSTM(64).get_config()


def test_keras_config_is_a_keras_model_json(tmp_path):
    model, x = built(*MODELS["sentiment (Embedding mask_zero, Dropout, LSTM, Dense)"])
    theirs = keras.models.model_from_json(json.dumps(lstm.keras_config(model)))
    assert [type(layer).__name__ for layer in theirs.layers] == ["Embedding", "Dropout", "LSTM", "Dropout", "Dense"]
    lstm.save_keras_weights(model, tmp_path / "w.weights.h5")
    theirs.load_weights(tmp_path / "w.weights.h5")
    assert np.abs(keras_predict(theirs, x) - model(x).detach().numpy()).max() <= TOLERANCE


# ----- the four exactness fixes -------------------------------------------------------------------
@pytest.mark.parametrize("cls", [layers.GRUCell, layers.SimpleRNNCell])
@pytest.mark.parametrize("kernel", ["reference", None])
def test_a_bare_state_in_is_a_bare_state_out(cls, kernel):
    """Keras' GRUCell/SimpleRNNCell return `[h] if nested else h`."""
    cell = cls(3)
    x, h = torch.randn(2, 4), torch.randn(2, 3)
    with lstm.kernels.use(kernel) if kernel else torch.no_grad():  # (None: the fused cell call)
        _, state = cell(x, h)
        _, nested = cell(x, [h])
    assert isinstance(state, torch.Tensor) and isinstance(nested, list) and torch.equal(state, nested[0])
    keras_cell = getattr(keras.layers, cls.__name__)(3)
    _, keras_state = keras_cell(x.numpy(), h.numpy())
    _, keras_nested = keras_cell(x.numpy(), [h.numpy()])
    assert not isinstance(keras_state, (list, tuple)) and isinstance(keras_nested, (list, tuple))


@pytest.mark.parametrize("cls", [layers.SimpleRNN, layers.LSTM])
def test_frozen_layers_report_no_weight_penalties(cls):
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype("float32")
    for trainable in (True, False):
        ours = cls(3, kernel_regularizer="l2", trainable=trainable)
        ours(torch.as_tensor(x))
        theirs = getattr(keras.layers, cls.__name__)(3, kernel_regularizer="l2", trainable=trainable)
        theirs(x)
        assert len(ours.losses) == len(theirs.losses) == (1 if trainable else 0)
    frozen = cls(3, kernel_regularizer="l2", activity_regularizer="l1", trainable=False)
    frozen(torch.as_tensor(x))
    assert len(frozen.losses) == 1  # (the activity penalty stays, as in Keras)


def test_bidirectional_keeps_its_own_dtype():
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype("float32")
    ours = layers.Bidirectional(layers.LSTM(3), dtype="float64")
    theirs = keras.layers.Bidirectional(keras.layers.LSTM(3), dtype="float64")
    assert ours(torch.as_tensor(x)).dtype == torch.float64 and theirs(x).dtype == torch.float64
    assert ours.forward_layer.dtype == torch.float32 and theirs.forward_layer.dtype_policy.name == "float32"
    again = layers.Bidirectional.from_config(ours.get_config())
    assert again.dtype_policy.name == "float64" and again.forward_layer.dtype_policy.name == "float32"
    from_keras = layers.deserialize(keras.layers.serialize(theirs))
    assert from_keras.dtype_policy.name == "float64" and from_keras(torch.as_tensor(x)).dtype == torch.float64


@pytest.mark.parametrize("build, argument", [
    (lambda: layers.GRU(8, reset_after="maybe"), "reset_after"),
    (lambda: layers.LSTM(8, return_sequences=1), "return_sequences"),
    (lambda: layers.LSTM(8, unit_forget_bias="yes"), "unit_forget_bias"),
    (lambda: layers.SimpleRNN(8, go_backwards=None), "go_backwards"),
    (lambda: layers.Dense(3, use_bias="false"), "use_bias"),
    (lambda: layers.Embedding(5, 2, mask_zero=0), "mask_zero"),
    (lambda: layers.LSTM(8, stateful="True"), "stateful")])
def test_bool_arguments_reject_other_values(build, argument):
    with pytest.raises(TypeError, match=rf"^{argument}: expected True or False, got "):
        build()
    assert layers.LSTM(8, return_sequences=np.bool_(True)).return_sequences is True
