"""Fuzzing configs and inputs with hypothesis.

Configs: a valid config of each layer class with some values replaced by junk, or unknown keys added,
through `layers.deserialize`. The contract: a layer (that then runs, or refuses its input with a
ValueError/TypeError), or a ValueError/TypeError whose message names a key that was changed.
Inputs: random shapes, dtypes, strides, masks, initial states and NaN/Inf through a layer. The
contract: the right output on every kernel (the reference's numbers), or a ValueError/TypeError
naming the argument. The tests at the end are what the fuzzing found (bugs since fixed)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import TALLY
from lstm import kernels, layers
from lstm.layers import (GRU, LSTM, RNN, Bidirectional, Dense, Dropout, Embedding, GRUCell, InputLayer, LSTMCell,
                         Masking, SimpleRNN, SimpleRNNCell, TimeDistributed)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

EXAMPLES = {
    "LSTM": lambda: LSTM(3), "GRU": lambda: GRU(3), "SimpleRNN": lambda: SimpleRNN(3),
    "LSTMCell": lambda: LSTMCell(3), "GRUCell": lambda: GRUCell(3), "SimpleRNNCell": lambda: SimpleRNNCell(3),
    "RNN": lambda: RNN(LSTMCell(3)), "Bidirectional": lambda: Bidirectional(LSTM(3)), "Dense": lambda: Dense(3),
    "Embedding": lambda: Embedding(10, 4), "Dropout": lambda: Dropout(0.5), "Masking": lambda: Masking(),
    "InputLayer": lambda: InputLayer(shape=(5, 2)), "TimeDistributed": lambda: TimeDistributed(Dense(2)),
}
CONFIGS = {name: layers.serialize(make())["config"] for name, make in EXAMPLES.items()}
UNKNOWN_KEYS = ["zzz", "units2", "return_sequence", "input_dim", "input_shape", "time_major", "cell", "layer"]

JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(-1000, 1000), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.sampled_from(["tanh", "relu", "sigmoid", "float64", "float16", "glorot_uniform", "l2",
                                          "sum", "concat", "max_norm", "zeros", "linear"]),
    st.lists(st.one_of(st.none(), st.integers(-3, 6)), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.just({"class_name": "L1", "config": {"l1": 0.1}}), st.just({"class_name": "Nope", "config": {}}),
)

# keys whose junk values are refused by torch or Python with a message that names no key
_NESTED_OBJECTS = re.compile(r"(regularizer|constraint|initializer)$")
_UNNAMED_KNOWN = {("InputLayer", "shape"), ("Bidirectional", "layer"),
                  ("Bidirectional", "backward_layer"), ("TimeDistributed", "layer"), ("RNN", "cell")}


def _names_one_of(message: str, keys) -> bool:
    return any(key in message for key in keys)


def _known_unnamed(name: str, keys) -> bool:
    return any((name, key) in _UNNAMED_KNOWN or _NESTED_OBJECTS.search(key) for key in keys)


def _run_once(module, name: str):
    """A layer that came out of a config runs on a small input, or refuses it clearly."""
    if name.endswith("Cell"):
        x = torch.randn(2, 4)
    elif name == "Embedding":
        x = torch.randint(0, 10, (2, 5))
    else:
        x = torch.randn(2, 5, 2)
    try:
        module(x)
    except (ValueError, TypeError):
        pass


@FUZZ
@given(st.sampled_from(sorted(CONFIGS)), st.data())
def test_fuzzed_configs_build_or_name_the_key(name, data):
    TALLY["fuzz: config"] += 1
    config = dict(CONFIGS[name])
    keys = data.draw(st.lists(st.sampled_from(sorted(config) + UNKNOWN_KEYS), min_size=1, max_size=3, unique=True))
    for key in keys:
        config[key] = data.draw(JUNK, label=key)
    try:
        module = layers.deserialize({"class_name": name, "config": config})
    except (ValueError, TypeError) as error:
        assert _names_one_of(str(error), keys) or _known_unnamed(name, keys), f"{type(error).__name__}: {error}"
        return
    _run_once(module, name)


@FUZZ
@given(st.sampled_from(["LSTM", "GRU", "SimpleRNN", "LSTMCell"]),
       st.dictionaries(st.sampled_from(["units", "dropout", "recurrent_dropout", "implementation", "use_bias",
                                        "activation", "recurrent_activation", "dtype", "unit_forget_bias", "reset_after",
                                        "return_sequences", "go_backwards", "input_dim", "kernel_initializer"]),
                       JUNK, min_size=1, max_size=4))
def test_fuzzed_constructor_arguments(name, kwargs):
    """The same contract for keyword arguments given to the constructor (from_config's path too)."""
    TALLY["fuzz: config"] += 1
    cls = {"LSTM": LSTM, "GRU": GRU, "SimpleRNN": SimpleRNN, "LSTMCell": LSTMCell}[name]
    units = kwargs.pop("units", 3)
    try:
        module = cls.from_config(dict(kwargs, units=units))
    except (ValueError, TypeError) as error:
        assert _names_one_of(str(error), [*kwargs, "units", "input_shape", "config"]), f"{error}"
        return
    _run_once(module, name)


# ----- inputs ------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.bool]


@st.composite
def calls(draw):
    """A layer built for D features, and one call with whatever inputs, mask and states."""
    kind = draw(st.sampled_from(["LSTM", "GRU", "SimpleRNN"]))
    units, features = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    options = draw(st.fixed_dictionaries({}, optional={"return_sequences": st.booleans(), "go_backwards": st.booleans(),
                                                        "return_state": st.booleans(),
                                                        "zero_output_for_mask": st.booleans()}))
    batch, steps = draw(st.integers(0, 4)), draw(st.integers(0, 6))
    # mostly right (so that most calls run and are compared), sometimes wrong
    width = draw(st.sampled_from([features] * 4 + [features + 1]))
    dtype = draw(st.sampled_from([torch.float32] * 8 + DTYPES[1:]))
    layout = draw(st.sampled_from(["contiguous", "strided", "transposed", "expanded"]))
    poison = draw(st.sampled_from([None, math.nan, math.inf, -math.inf]))
    mask = draw(st.sampled_from([None, "right", "strided", "int"] * 3 + ["wrong shape", "float"]))
    state = draw(st.sampled_from([None, "right"] * 5 + ["wrong count", "wrong shape", "wrong dtype"]))
    grad = draw(st.booleans())
    return kind, units, features, options, (batch, steps, width), dtype, layout, poison, mask, state, grad


def _inputs(shape, dtype, layout, poison, generator):
    batch, steps, width = shape
    big = torch.randn(2 * batch + 1, 2 * steps + 1, 2 * width, generator=generator)
    x = {"contiguous": big[:batch, :steps, :width].contiguous(), "strided": big[: 2 * batch : 2, : 2 * steps : 2, ::2],
         "transposed": big.transpose(0, 1)[:steps, :batch, :width].transpose(0, 1),
         "expanded": big[:1, :steps, :width].expand(batch, steps, width)}[layout]
    if poison is not None and x.numel():
        x = x.clone()
        x[0, 0, 0] = poison
    return (x * 3).to(dtype) if not dtype.is_floating_point else x.to(dtype)


@FUZZ
@given(calls())
def test_fuzzed_inputs_give_the_reference_numbers_or_name_the_argument(call):
    TALLY["fuzz: inputs"] += 1
    kind, units, features, options, shape, dtype, layout, poison, mask_kind, state_kind, grad = call
    generator = torch.Generator().manual_seed(0)
    layer = {"LSTM": LSTM, "GRU": GRU, "SimpleRNN": SimpleRNN}[kind](units, input_dim=features, **options)
    x = _inputs(shape, dtype, layout, poison, generator)
    batch, steps, _ = shape
    mask = {None: None, "right": torch.rand(batch, steps, generator=generator) > 0.3,
            "strided": (torch.rand(batch, 2 * steps, generator=generator) > 0.3)[:, ::2],
            "wrong shape": torch.ones(batch, steps + 1, dtype=torch.bool), "float": torch.ones(batch, steps),
            "int": torch.randint(0, 2, (batch, steps), generator=generator)}[mask_kind]
    count = layer.cell.state_count
    states = {None: None, "right": [torch.randn(batch, units, generator=generator) for _ in range(count)],
              "wrong count": [torch.zeros(batch, units)] * (count + 1), "wrong shape": [torch.zeros(batch + 1, units)] * count,
              "wrong dtype": [torch.zeros(batch, units, dtype=torch.float64)] * count}[state_kind]
    try:
        with torch.set_grad_enabled(grad):
            got = layer(x, mask=mask, initial_state=states)
    except (ValueError, TypeError) as error:
        assert re.match(r"(inputs|mask|initial_state)\b", str(error)), str(error)
        return
    # floating inputs and states are cast to the layer's float32, as Keras casts them
    assert dtype.is_floating_point and shape[2] == features and mask_kind not in ("wrong shape", "float")
    assert state_kind in (None, "right", "wrong dtype")
    TALLY["fuzz: inputs compared"] += 1
    with kernels.use("reference"):
        want = layer(x.float().contiguous(), mask=None if mask is None else mask.contiguous(), initial_state=states)
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, equal_nan=True)
        if poison is None:
            assert torch.isfinite(a).all()


# ----- found by the fuzzing (fixed) --------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: SimpleRNN(3, seed=True), lambda: Dropout(0.5, seed=False)])
def test_bool_seed_is_a_type_error(make):
    with pytest.raises(TypeError, match="seed"):
        make()


def test_embedding_sizes_name_themselves():
    with pytest.raises(ValueError, match="output_dim"):
        Embedding(10, -1)


def test_regularizer_config_value_names_the_argument():
    with pytest.raises(ValueError, match="kernel_regularizer"):
        LSTM(3, kernel_regularizer={"class_name": "L1", "config": {"l1": "a"}})


def test_shape_arguments_are_checked():
    with pytest.raises(ValueError, match="batch_shape"):
        InputLayer(batch_shape=3)
    with pytest.raises(ValueError, match="noise_shape"):
        Dropout(0.5, noise_shape=(3,))(torch.randn(2, 5, 2), training=True)


def test_impossible_sizes_are_value_errors():
    with pytest.raises(ValueError, match="units"):
        LSTM(10**9, input_dim=3)
