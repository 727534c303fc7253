"""Mixed precision: bfloat16/float16 layers, Keras 3's dtype policies, torch.autocast,
inputs cast to the compute dtype, and the reference kernel's low-precision numerics.

Tolerances against float32 come from the low precision's epsilon: every step rounds h and each
product's operands to it (relative error eps/2 each), and the gates contract, so the errors of T
steps add up like a random walk: |low - float32| <= 2 * eps * sqrt(T) on outputs of size ~1, and
on gradients relative to their largest entry (measured: at most 0.82 * eps * sqrt(T) here).
"""

from __future__ import annotations

import contextlib
import json
import math
import zipfile

import numpy as np
import pytest
import torch

import lstm
from lstm import kernels, layers
from lstm.kernels import reference
from lstm.serialization import DTypePolicy
from marks import needs_cpp

LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16, "mixed_bfloat16": torch.bfloat16,
       "mixed_float16": torch.float16}
POLICIES = ["float32", "float64", *LOW]
B, T, D, U = 3, 12, 5, 6




def keras3_policy(name: str, class_name: str = "DTypePolicy") -> dict:
    return {"module": "keras", "class_name": class_name, "config": {"name": name}, "registered_name": None}


def variable_dtype(policy: str) -> torch.dtype:
    return torch.float32 if policy.startswith("mixed") else DTypePolicy(policy).variable_dtype


def randomized(layer, seed: int = 0, scale: float = 0.5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return layer


def same_weights(source, cls, policy, **kwargs):
    """A layer of `cls(**kwargs)` with `policy` and `source`'s weights."""
    layer = cls(dtype=policy, **kwargs)
    layer.set_weights(source.get_weights())
    return layer


def inputs(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----- (a) every layer, every policy: parameter, output and state dtypes ---------------------------
RECURRENT = [layers.LSTM, layers.GRU, layers.SimpleRNN]
CELLS = [layers.LSTMCell, layers.GRUCell, layers.SimpleRNNCell]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cls", RECURRENT)
def test_layer_dtypes(cls, policy):
    layer = cls(U, dtype=policy, return_sequences=True, return_state=True)
    out, *states = layer(inputs(B, T, D))
    compute = LOW.get(policy, variable_dtype(policy))
    assert {p.dtype for p in layer.parameters()} == {variable_dtype(policy)}
    assert out.dtype == compute and out.shape == (B, T, U) and all(s.dtype == compute for s in states)
    assert (layer.dtype_policy.name, layer.variable_dtype, layer.compute_dtype, layer.dtype) == (
        policy, variable_dtype(policy), compute, variable_dtype(policy))
    assert layer.cell.dtype_policy == layer.dtype_policy


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cls", CELLS)
def test_cell_dtypes(cls, policy):
    cell = cls(U, dtype=policy)
    out, states = cell(inputs(B, D), None)
    compute = LOW.get(policy, variable_dtype(policy))
    assert {p.dtype for p in cell.parameters()} == {variable_dtype(policy)}
    assert out.dtype == compute and all(s.dtype == compute for s in states)
    out2, _ = cell(inputs(B, D), states)  # its own states back in
    assert out2.dtype == compute


@pytest.mark.parametrize("policy", POLICIES)
def test_rnn_bidirectional_and_core_layer_dtypes(policy):
    compute = LOW.get(policy, variable_dtype(policy))
    x = inputs(B, T, D)
    rnn = layers.RNN(layers.LSTMCell(U), dtype=policy, return_sequences=True)
    assert rnn(x).dtype == compute and rnn.cell.kernel.dtype == variable_dtype(policy)
    # Keras: the wrapper's dtype casts its input and its merged output; the wrapped layers keep theirs
    both = layers.Bidirectional(layers.LSTM(U, return_sequences=True, return_state=True, dtype=policy), dtype=policy)
    out, *states = both(x)
    assert out.dtype == compute and len(states) == 4 and all(s.dtype == compute for s in states)
    assert {p.dtype for p in both.parameters()} == {variable_dtype(policy)} and both.compute_dtype == compute
    wrapper_only = layers.Bidirectional(layers.LSTM(U, return_sequences=True, return_state=True), dtype=policy)
    out, *states = wrapper_only(x)
    assert out.dtype == compute and all(s.dtype == torch.float32 for s in states)
    assert {p.dtype for p in wrapper_only.parameters()} == {torch.float32}
    assert layers.deserialize(layers.serialize(wrapper_only)).dtype_policy.name == policy
    dense = layers.Dense(3, dtype=policy)
    assert dense(x).dtype == compute and dense.kernel.dtype == variable_dtype(policy)
    embedding = layers.Embedding(10, 4, dtype=policy)
    assert embedding(torch.tensor([[1, 2, 0]])).dtype == compute
    assert embedding.embeddings.dtype == variable_dtype(policy)
    model = lstm.Sequential([layers.Embedding(10, 4, mask_zero=True, dtype=policy),
                             layers.LSTM(U, dtype=policy), layers.Dense(1, dtype=policy)])
    assert model(np.array([[1, 2, 0, 0], [3, 0, 0, 0]])).dtype == compute


def test_bfloat16_weights_come_out_as_float32_arrays():
    layer = randomized(layers.LSTM(U, input_dim=D, dtype="bfloat16"))
    arrays = layer.get_weights()
    assert all(a.dtype == np.float32 for a in arrays)
    assert torch.equal(torch.from_numpy(arrays[0]).to(torch.bfloat16), layer.cell.kernel.detach())
    copy = layers.LSTM(U, input_dim=D, dtype="bfloat16")
    copy.set_weights(arrays)
    assert all(torch.equal(a, b) for a, b in zip(copy.parameters(), layer.parameters()))


# ----- (b) the low-precision reference against float32 ------------------------------------------
VARIANTS = [
    (layers.LSTM, {}), (layers.LSTM, {"peephole": True}), (layers.LSTM, {"layer_norm": True}),
    (layers.LSTM, {"proj_size": 3}), (layers.LSTM, {"coupled": True, "cell_clip": 1.0, "forget_bias": 0.5}),
    (layers.GRU, {}), (layers.GRU, {"reset_after": False}), (layers.SimpleRNN, {}),
    # drawn in training, the same draws at every precision for one seed
    (layers.LSTM, {"zoneout": 0.2, "recurrent_dropconnect": 0.2, "dropout": 0.2, "seed": 7}),
    (layers.GRU, {"recurrent_dropout": 0.3, "seed": 7}),
]


@pytest.mark.parametrize("policy", list(LOW))
@pytest.mark.parametrize("cls, options", VARIANTS, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_low_precision_against_float32(cls, options, policy):
    eps = torch.finfo(LOW[policy]).eps
    bound = 2 * eps * math.sqrt(T)
    kwargs = dict(units=U, input_dim=D, return_sequences=True, return_state=True, **options)
    full = randomized(cls(**kwargs))
    low = same_weights(full, cls, policy, **kwargs)
    x = inputs(B, T, D).requires_grad_()
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 7:] = False
    (y_full, *s_full), (y_low, *s_low) = full(x, mask=mask, training=True), low(x, mask=mask, training=True)
    # (the fused C++ kernels run low precision too: tested against the reference below)
    expected = "fused_gru_simple_rnn" if cls is not layers.LSTM else "fused_cpp" if not options else "fused_variants"
    if kernels.native.extension() is None:
        expected = "reference"  # (without the C++ kernels: LSTM_NO_CPP=1)
    assert kernels.select(low.recurrence(x, mask)).name == expected
    for got, want in zip([y_low, *s_low], [y_full, *s_full]):
        assert got.dtype == LOW[policy]
        assert (got.float() - want).abs().max() <= bound
    weights = inputs(*y_full.shape, seed=2)
    grads_full = torch.autograd.grad((y_full * weights).sum(), [x, *full.parameters()])
    grads_low = torch.autograd.grad((y_low.float() * weights).sum(), [x, *low.parameters()])
    for got, want, param in zip(grads_low, grads_full, [x, *low.parameters()]):
        assert got.dtype == param.dtype  # float32 for a mixed policy's variables
        assert (got.float() - want).abs().max() <= bound * want.abs().max()


def test_one_step_is_the_spec():
    """Products of bfloat16-rounded operands accumulated in float32, gates and C in float32, h
    rounded: written out by hand for one LSTM step from a nonzero state."""
    cell = randomized(layers.LSTMCell(U, input_dim=D, dtype="mixed_bfloat16"))
    x, h0, c0 = inputs(B, D), inputs(B, U, seed=3), inputs(B, U, seed=4)
    out, (h, c) = cell(x, [h0, c0])
    bf = torch.bfloat16
    r = lambda t: t.to(bf).float()  # noqa: E731
    z = r(x) @ r(cell.kernel) + r(h0) @ r(cell.recurrent_kernel) + cell.bias
    i, f, g, o = z.chunk(4, dim=-1)
    c_want = torch.sigmoid(f) * r(c0) + torch.sigmoid(i) * torch.tanh(g)  # (c0 given: cast to bf16, as Keras)
    h_want = (torch.sigmoid(o) * torch.tanh(c_want)).to(bf)
    assert torch.equal(out, h_want) and torch.equal(h, h_want) and torch.equal(c, c_want.to(bf))


def test_stateful_carries_c_in_float32():
    """Two calls of a stateful mixed layer equal one call over both (C is not rounded between
    calls), and so do chunked runs and a stream."""
    full = randomized(layers.LSTM(U, input_dim=D, return_sequences=True))
    one = same_weights(full, layers.LSTM, "mixed_bfloat16", units=U, input_dim=D, return_sequences=True)
    two = same_weights(full, layers.LSTM, "mixed_bfloat16", units=U, input_dim=D, return_sequences=True,
                       stateful=True)
    x = inputs(B, T, D)
    whole = one(x)
    assert torch.equal(torch.cat([two(x[:, :5]), two(x[:, 5:])], dim=1), whole)
    assert [s.dtype for s in two.states] == [torch.float32, torch.float32]
    assert torch.equal(lstm.chunked(one, x, 4), whole)
    stream = one.stream(batch_size=B)
    assert torch.equal(torch.stack([stream.step(x[:, t]) for t in range(T)], dim=1), whole)


# ----- (c) torch.autocast ---------------------------------------------------------------------------
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", RECURRENT)
def test_autocast_is_the_mixed_policy(cls, low):
    policy = "mixed_bfloat16" if low == torch.bfloat16 else "mixed_float16"
    layer = randomized(cls(U, input_dim=D, return_sequences=True, return_state=True))
    mixed = same_weights(layer, cls, policy, units=U, input_dim=D, return_sequences=True, return_state=True)
    x = inputs(B, T, D)
    before = layer(x)
    with torch.autocast("cpu", dtype=low):
        inside = layer(x)
        float64 = layers.SimpleRNN(U, dtype="float64")(x)  # autocast lowers float32 only
    assert float64.dtype == torch.float64
    for a, b in zip(inside, mixed(x)):
        assert a.dtype == low and torch.equal(a, b)
    for a, b in zip(layer(x), before):  # outside the region: unchanged
        assert a.dtype == torch.float32 and torch.equal(a, b)
    with torch.autocast("cpu", dtype=low):
        loss = layer(x)[0].float().square().sum()
    loss.backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in layer.parameters())
    mixed(x)[0].float().square().sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(layer.parameters(), mixed.parameters()))


def test_autocast_cell_call_bidirectional_and_dense():
    cell = randomized(layers.LSTMCell(U, input_dim=D))
    mixed = same_weights(cell, layers.LSTMCell, "mixed_bfloat16", units=U, input_dim=D)
    x, states = inputs(B, D), [inputs(B, U, seed=3), inputs(B, U, seed=4)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, new_states = cell(x, states)
    want, want_states = mixed(x, states)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)
    assert all(torch.equal(a, b) for a, b in zip(new_states, want_states))
    both = layers.Bidirectional(layers.GRU(U, return_sequences=True), input_shape=(None, D))
    both_mixed = layers.Bidirectional(layers.GRU(U, return_sequences=True), input_shape=(None, D),
                                      dtype="mixed_bfloat16")
    both_mixed.set_weights(both.get_weights())
    dense = layers.Dense(3, input_dim=D)
    xs = inputs(B, T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(both(xs), both_mixed(xs))
        y = dense(xs)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, (xs.bfloat16() @ dense.kernel.bfloat16() + dense.bias.bfloat16()))


def test_reference_numerics_ignore_the_autocast_region():
    for policy in ("float32", "mixed_bfloat16"):
        layer = randomized(layers.LSTM(U, input_dim=D, return_sequences=True, dtype=policy))
        problem = layer.recurrence(inputs(B, T, D))
        outside = reference.run(problem).outputs
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = reference.run(problem).outputs
        assert inside.dtype == layer.compute_dtype and torch.equal(inside, outside)


# ----- (d) inputs and states cast to the compute dtype -------------------------------------------
@pytest.mark.parametrize("cls", RECURRENT)
def test_floating_inputs_are_cast(cls):
    layer = randomized(cls(U, input_dim=D, return_state=True))
    x = inputs(B, T, D)
    want = layer(x)
    states = [s.detach().double().numpy() for s in want[1:]]
    for given in (x.double(), x.double().numpy(), x.numpy().astype(np.float64)):
        assert all(torch.equal(a, b) for a, b in zip(layer(given), want))
    again = layer(x.double(), initial_state=states)
    assert all(t.dtype == torch.float32 for t in again)
    assert all(torch.equal(a, b) for a, b in zip(again, layer(x, initial_state=[torch.from_numpy(s).float()
                                                                              for s in states])))
    cell = layer.cell
    out, _ = cell(x[:, 0].double().numpy(), None)
    assert out.dtype == torch.float32 and torch.equal(out, cell(x[:, 0], None)[0])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_float_inputs_name_the_argument(dtype):
    x = torch.ones(B, T, D, dtype=dtype)
    for call in (lambda: layers.LSTM(U)(x), lambda: layers.GRUCell(U)(x[:, 0]),
                 lambda: layers.LSTM(U, dtype="mixed_bfloat16")(x.numpy() if dtype != torch.bool else x)):
        with pytest.raises(TypeError, match=r"^inputs: expected a floating-point tensor, got dtype"):
            call()
    with pytest.raises(TypeError, match=r"^initial_state\[0\]: expected a floating-point"):
        layers.SimpleRNN(U)(inputs(B, T, D), initial_state=[torch.ones(B, U, dtype=dtype)])


# ----- (e) configs ----------------------------------------------------------------------------------
def config_dtype(policy: str):
    return keras3_policy(policy) if policy.startswith("mixed") else policy


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cls", [*RECURRENT, *CELLS, layers.Dense])
def test_config_round_trip(cls, policy):
    layer = cls(U, dtype=policy)
    config = layer.get_config()
    assert config["dtype"] == config_dtype(policy)
    forms = [config["dtype"], policy, keras3_policy(policy), keras3_policy(policy, "FloatDTypePolicy"),
             {"class_name": "Policy", "config": {"name": policy}}]
    for form in forms:
        again = cls.from_config({**config, "dtype": form})
        assert again.dtype_policy.name == policy and again.get_config() == config
    assert layers.deserialize({"class_name": cls.__name__, "config": config}).dtype_policy.name == policy


@pytest.mark.parametrize("policy", POLICIES)
def test_bidirectional_and_embedding_config_round_trip(policy):
    # (the wrapper's dtype and the wrapped layer's each round-trip, as Keras 3 keeps them apart)
    for both, inner in ((layers.Bidirectional(layers.LSTM(U, dtype=policy)), policy),
                        (layers.Bidirectional(layers.LSTM(U), dtype=policy), "float32")):
        config = both.get_config()
        assert config["dtype"] == config_dtype(policy) and config["layer"]["config"]["dtype"] == config_dtype(inner)
        again = layers.Bidirectional.from_config(config)
        assert again.dtype_policy.name == policy
        assert again.forward_layer.dtype_policy.name == again.backward_layer.dtype_policy.name == inner
        assert again.get_config() == config
    embedding = layers.Embedding(10, 4, dtype=policy)
    assert layers.Embedding.from_config(embedding.get_config()).dtype_policy.name == policy


def test_unknown_policies_are_value_errors():
    with pytest.raises(ValueError, match=r"^dtype: expected one of \['float32'.*'mixed_float16'\].*got 'mixed_int8'"):
        layers.LSTM(U, dtype="mixed_int8")
    with pytest.raises(ValueError, match=r"^config\['config'\]: dtype: expected a dtype policy config of class"):
        layers.deserialize({"class_name": "GRU", "config": {"units": 3, "dtype": keras3_policy("int8", "Quantized")}})


def test_keras_files_carry_mixed_policies(tmp_path):
    """A .keras file and a tf_keras .h5 whose layers carry a mixed policy load with it."""
    lstm.clear_session()
    model = lstm.Sequential([layers.LSTM(U, input_dim=D, dtype="mixed_bfloat16", return_sequences=True),
                             layers.Dense(2, input_dim=U, dtype="mixed_bfloat16")], name="mixed")
    randomized(model)
    entries = [{"module": "keras.layers", "class_name": type(m).__name__, "config": m.get_config(),
                "registered_name": None} for m in model.layers]
    top = {"module": "keras", "class_name": "Sequential", "config": {"name": "mixed", "trainable": True,
                                                                     "layers": entries}}
    path = tmp_path / "mixed.keras"
    weights = tmp_path / "w.weights.h5"
    lstm.save_keras_weights(model, weights)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        archive.writestr("config.json", json.dumps(top))
        archive.write(weights, "model.weights.h5")
    loaded = lstm.load_keras(path)
    x = inputs(B, T, D)
    assert [m.dtype_policy.name for m in loaded.layers] == ["mixed_bfloat16"] * 2
    assert torch.equal(loaded(x), model.eval()(x)) and loaded(x).dtype == torch.bfloat16
    # tf_keras writes a mixed policy as class "Policy" and is read in its dialect (hard_sigmoid)
    config = {**model.layers[0].get_config(), "recurrent_activation": "hard_sigmoid", "time_major": False,
              "dtype": {"class_name": "Policy", "config": {"name": "mixed_float16"}}}
    layer = layers.LSTM.from_config(config)
    assert layer.dtype_policy.name == "mixed_float16" and layer.recurrent_activation == "hard_sigmoid_tf_keras"


# ----- (f) against torch.nn under autocast ----------------------------------------------------------
@pytest.mark.parametrize("cls", [layers.LSTM, layers.SimpleRNN])
def test_equals_torch_under_autocast(cls):
    """torch.nn.LSTM/RNN run all in bfloat16 (oneDNN), this library's gates in float32: equal within
    2 * eps * sqrt(T); both in bfloat16 and the same with float32 weight gradients."""
    layer = randomized(cls(U, input_dim=D, return_sequences=True))
    module = lstm.to_torch(layer)
    x = inputs(B, T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            theirs, _ = module(x)
        except RuntimeError as error:  # (oneDNN's bf16 LSTM needs AVX-512: an AVX2 AMD EPYC raises)
            pytest.skip(f"torch's {type(module).__name__} under CPU autocast fails on this CPU: {error}")
        ours = layer(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert (ours.float() - theirs.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * math.sqrt(T)
    assert lstm.from_torch(module.bfloat16()).dtype_policy.name == "bfloat16"


# ----- the fused C++ LSTM in low precision against the reference ------------------------------------
# Both compute the same roundings (operands, h at every step); only the products' summation order
# differs, and the backward rounds each step's dz for its products (as torch.autocast's backward
# does) where the reference rounds none. Bounds: outputs eps * sqrt(T), gradients 2 * eps * sqrt(T)
# relative to the largest (measured: outputs <= 1 rounding, gradients <= 0.3 * eps * sqrt(T)).
def assert_matches_the_reference(results, grads, parameters, low):
    """results, grads: [the reference's, the fused kernel's] outputs and parameter gradients (grads
    empty for an inference call). Outputs in `low` within eps * sqrt(T), gradients in each
    parameter's dtype within 2 * eps * sqrt(T) of the largest."""
    eps = torch.finfo(low).eps
    for got, want in zip(results[1], results[0]):
        assert got.dtype == want.dtype == low
        assert (got.float() - want.float()).abs().max() <= eps * math.sqrt(T)
    for got, want, param in zip(grads[1], grads[0], parameters) if grads else ():
        assert got.dtype == param.dtype
        assert (got.float() - want.float()).abs().max() <= 2 * eps * math.sqrt(T) * want.float().abs().max()


@pytest.fixture
def one_thread():
    """One thread: a call's batch is one chunk of rows, so its size picks the route (16+ rows: the
    low-precision products per step; fewer: float's on the rounded values)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def low_step_products(mode: int):
    """The products with low-precision operands (per step over 16+ rows, and over all steps): 1 on
    those types (AMX tiles or MKL's GEMM), 0 float32's on the rounded values (what CPUs without
    AVX512-BF16/FP16 run), -1 as this CPU chooses."""
    extension = kernels.native.extension()
    previous = extension.set_low_products(mode)
    try:
        yield
    finally:
        extension.set_low_products(previous)


FUSED_ROUTES = {  # batch, features, training, low_step_products: which C++ route runs (on one thread)
    "few rows (float products of the rounded values)": (3, 5, True, -1),
    "16+ rows (low-precision products: AMX tiles or MKL)": (20, 5, True, 1),
    "16+ rows, float products (a CPU without bf16/f16 instructions)": (20, 5, True, 0),
    "inference, input fused into each step's product": (20, 5, False, -1),
    "inference, input projected first (D > U)": (20, 9, False, -1),
}


@needs_cpp
@pytest.mark.parametrize("policy", ["bfloat16", "mixed_bfloat16", "float16", "mixed_float16"])
@pytest.mark.parametrize("route", list(FUSED_ROUTES))
@pytest.mark.parametrize("options", [
    {"return_sequences": True}, {"return_sequences": False, "go_backwards": True},
    {"return_sequences": True, "zero_output_for_mask": True, "masked": True},
    {"return_sequences": False, "masked": True}], ids=str)
@pytest.mark.usefixtures("one_thread")
def test_fused_low_precision_against_the_reference(policy, route, options):
    batch, features, training, products = FUSED_ROUTES[route]
    options = dict(options)
    masked = options.pop("masked", False)
    layer = randomized(layers.LSTM(U, input_dim=features, return_state=True, dtype=policy, **options))
    x = inputs(batch, T, features)
    mask = None
    if masked:
        mask = torch.rand(batch, T, generator=torch.Generator().manual_seed(5)) > 0.3
    assert kernels.select(layer.recurrence(x, mask)).name == "fused_cpp"
    results, grads = [], []
    for kernel in ("reference", "fused_cpp"):
        with kernels.use(kernel), low_step_products(products):
            if training:
                outputs = layer(x, mask=mask)
                loss = (outputs[0].float() * inputs(*outputs[0].shape, seed=2)).sum() + outputs[2].float().sum()
                grads.append(torch.autograd.grad(loss, list(layer.parameters())))
            else:
                with torch.no_grad():
                    outputs = layer(x, mask=mask)
        results.append(outputs)
    assert_matches_the_reference(results, grads, layer.parameters(), LOW[policy])


@needs_cpp
@pytest.mark.parametrize("policy", ["bfloat16", "mixed_float16"])
@pytest.mark.parametrize("options", [
    {"peephole": True}, {"layer_norm": True}, {"proj_size": 3, "go_backwards": True},
    {"coupled": True, "cell_clip": 0.5, "forget_bias": 0.5, "return_sequences": False}], ids=str)
def test_fused_variants_low_precision_against_the_reference(policy, options):
    """The variants' C++ recurrence rounds h (and a projection's input) as the reference does, on
    float32 products of rounded operands: outputs within eps * sqrt(T), gradients 2 * eps * sqrt(T)."""
    options = {"return_sequences": True, **options}
    layer = randomized(layers.LSTM(U, input_dim=D, return_state=True, dtype=policy, **options))
    x = inputs(20, T, D)
    mask = torch.rand(20, T, generator=torch.Generator().manual_seed(5)) > 0.3
    assert kernels.select(layer.recurrence(x, mask)).name == "fused_variants"
    results, grads = [], []
    for kernel in ("reference", "fused_variants"):
        with kernels.use(kernel):
            outputs = layer(x, mask=mask)
            loss = (outputs[0].float() * inputs(*outputs[0].shape, seed=2)).sum() + outputs[2].float().sum()
            grads.append(torch.autograd.grad(loss, list(layer.parameters())))
        results.append(outputs)
    assert_matches_the_reference(results, grads, layer.parameters(), LOW[policy])


@needs_cpp
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "float16"])
@pytest.mark.parametrize("cls, options", [
    (layers.GRU, {}), (layers.GRU, {"reset_after": False, "go_backwards": True}),
    (layers.GRU, {"reset_after": False, "recurrent_dropout": 0.3, "seed": 3}),
    (layers.SimpleRNN, {"return_sequences": False}), (layers.SimpleRNN, {"recurrent_dropout": 0.3, "seed": 3}),
    (layers.GRU, {"dropout": 0.3, "seed": 3}), (layers.SimpleRNN, {"dropout": 0.2, "recurrent_dropout": 0.3, "seed": 3}),
    (layers.GRU, {"dropout": 0.3, "implementation": 1, "reset_after": False, "seed": 3})],  # (a mask per gate)
    ids=str)
@pytest.mark.parametrize("batch, products", [(3, -1), (20, 1), (20, 0)],
                         ids=["few rows", "16+ rows", "16+ rows, float products"])
@pytest.mark.usefixtures("one_thread")
def test_fused_gru_simple_rnn_low_precision_against_the_reference(cls, options, policy, batch, products):
    """The GRU's and SimpleRNN's C++ loops round h (and r * h, h after its dropout mask) as the
    reference does, their per-step products float's on the rounded values (few rows; 16+ rows on a
    CPU without bf16/f16 instructions) or low-precision products (16+ rows: AMX tiles in bf16 where
    the CPU has them, else MKL's GEMM): outputs within eps * sqrt(T), gradients 2 * eps * sqrt(T)
    of the largest. The weights come in float32 (mixed) and in the low precision (float16)."""
    options = {"return_sequences": True, **options}
    x = inputs(batch, T, D).requires_grad_()  # (dx too: input dropout's mask is in it)
    mask = torch.rand(batch, T, generator=torch.Generator().manual_seed(5)) > 0.3
    results, grads = [], []
    for kernel in ("reference", "fused_gru_simple_rnn"):
        layer = randomized(cls(U, input_dim=D, return_state=True, dtype=policy, **options))  # (the same draws)
        with kernels.use(kernel), low_step_products(products):
            outputs = layer(x, mask=mask, training=True)
            loss = (outputs[0].float() * inputs(*outputs[0].shape, seed=2)).sum() + outputs[1].float().sum()
            grads.append(torch.autograd.grad(loss, [x, *layer.parameters()]))
        results.append(outputs)
    assert_matches_the_reference(results, grads, [x, *layer.parameters()], LOW[policy])


TILE_SHAPES = {  # batch, units, features, threads: the bf16 products' tiles of 16 rows x 16 columns x 32 deep
    "partial tiles (37 rows, 20 units: K = 20, N = 80)": (37, 20, 5, 1),
    "whole tiles, the columns spread over 2 threads": (64, 128, 32, 2),
}


@needs_cpp
@pytest.mark.parametrize("shape", list(TILE_SHAPES))
@pytest.mark.parametrize("cls", RECURRENT)
def test_fused_low_precision_tiles_against_the_reference(cls, shape):
    """The bf16 per-step products (AMX tiles where the CPU has them, else MKL's GEMM) at shapes that leave partial
    tiles in every dimension, and one big enough to spread over the threads: training and inference
    within the bounds above."""
    batch, units, features, threads = TILE_SHAPES[shape]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = inputs(batch, 6, features)
        results, grads = [], []
        for kernel in ("reference", "fused"):
            layer = randomized(cls(units, input_dim=features, return_sequences=True, return_state=True,
                                   dtype="mixed_bfloat16"), scale=0.2)
            with kernels.use("reference") if kernel == "reference" else low_step_products(1):
                assert kernel == "reference" or kernels.select(layer.recurrence(x)).name != "reference"
                with torch.no_grad():
                    inference = layer(x)
                outputs = layer(x)
                loss = (outputs[0].float() * inputs(*outputs[0].shape, seed=2)).sum()
                grads.append(torch.autograd.grad(loss, list(layer.parameters())))
            results.append([*outputs, *inference])
        assert_matches_the_reference(results, grads, layer.parameters(), torch.bfloat16)
    finally:
        torch.set_num_threads(previous)


@needs_cpp
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "float16"])
@pytest.mark.parametrize("cls", RECURRENT)
@pytest.mark.usefixtures("one_thread", "step_products")
def test_fused_widened_products_against_the_reference(cls, policy):
    """Without the type's instructions (low_step_products(0)) every product takes float32's on the
    operands widened, on the panels or on MKL (the step_products fixture): the input projection, dx
    and the weight gradients over all steps, each step's product, and the LSTM's inference with the
    input fused into each step's product (D <= U). Within the bounds above."""
    x = inputs(20, T, D).requires_grad_()
    mask = torch.rand(20, T, generator=torch.Generator().manual_seed(5)) > 0.3
    results, grads = [], []
    for kernel in ("reference", "fused"):
        layer = randomized(cls(U, input_dim=D, return_sequences=True, return_state=True, dtype=policy))
        with kernels.use("reference") if kernel == "reference" else low_step_products(0):
            assert kernel == "reference" or kernels.select(layer.recurrence(x, mask)).name != "reference"
            with torch.no_grad():
                inference = layer(x, mask=mask)
            outputs = layer(x, mask=mask)
            loss = (outputs[0].float() * inputs(*outputs[0].shape, seed=2)).sum() + outputs[1].float().sum()
            grads.append(torch.autograd.grad(loss, [x, *layer.parameters()]))
        results.append([*outputs, *inference])
    assert_matches_the_reference(results, grads, [x, *layer.parameters()], LOW[policy])


@needs_cpp
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_operands_rounded_by_the_cpp_equal_torchs_dtype_copies(low):
    """The fused ops' operands on the CPU (one C++ call): each marked tensor rounded exactly as
    `t.to(low).float()` rounds it (ties to even, subnormals, overflow to inf, NaN), the others
    in float32, integer and bool tensors as they are."""
    values = torch.cat([torch.randn(1000) * 4, torch.tensor([0.0, -0.0, 1e-40, 3e-8, 1e-5, 65520.0, 1e39, -1e39,
                                                            float("inf"), float("nan"), 1 + 2 ** -8, 1 + 3 * 2 ** -8])])
    mask = torch.rand(7) > 0.5
    tensors = [values, values.to(low), values.double(), values, values.to(low), mask, torch.arange(3)]
    rounded = [True, True, True, False, False, False, False]
    got = kernels.native.extension().operands_in_float32(tensors, rounded, kernels.fused.OPERAND_CODES[low])
    want = [values.to(low).float(), values.to(low).float(), values.double().to(low).float(), values,
            values.to(low).float(), mask, torch.arange(3)]
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g.nan_to_num(7.0), w.nan_to_num(7.0))
        assert torch.equal(g.isnan(), w.isnan()) if g.is_floating_point() else True


@needs_cpp
def test_fused_low_precision_under_autocast_and_compile():
    """A float32 layer under autocast takes the fused kernel and equals the mixed policy exactly;
    torch.compile traces the bf16 custom op (its fake kernel's dtypes) and gives the eager numbers."""
    mixed = randomized(layers.LSTM(U, input_dim=D, return_sequences=True, return_state=True, dtype="mixed_bfloat16"))
    full = same_weights(mixed, layers.LSTM, "float32", units=U, input_dim=D, return_sequences=True,
                        return_state=True)
    x = inputs(20, T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.select(full.recurrence(x)).name == "fused_cpp"
        got = full(x)
    want = mixed(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    compiled = torch.compile(mixed, fullgraph=True)
    outputs = compiled(x)
    assert all(torch.equal(a, b) for a, b in zip(outputs, want))
    grad = torch.autograd.grad(outputs[0].float().sum(), mixed.cell.kernel)[0]
    want_grad = torch.autograd.grad(mixed(x)[0].float().sum(), mixed.cell.kernel)[0]
    assert grad.dtype == torch.float32 and torch.equal(grad, want_grad)


@needs_cpp
@pytest.mark.parametrize("cls", [layers.GRU, layers.SimpleRNN])
def test_fused_gru_simple_rnn_low_precision_compile(cls):
    """torch.compile traces the GRU's and SimpleRNN's bf16 custom ops (their fake kernels' dtypes)
    and gives the eager numbers, forward and gradient."""
    layer = randomized(cls(U, input_dim=D, return_sequences=True, return_state=True, dtype="mixed_bfloat16"))
    x = inputs(20, T, D)
    assert kernels.select(layer.recurrence(x)).name == "fused_gru_simple_rnn"
    want = layer(x)
    got = torch.compile(layer, fullgraph=True)(x)
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want))
    grad = torch.autograd.grad(got[0].float().sum(), layer.cell.kernel)[0]
    assert grad.dtype == torch.float32
    assert torch.equal(grad, torch.autograd.grad(layer(x)[0].float().sum(), layer.cell.kernel)[0])


# ----- dispatch: the other low-precision routes run on the reference kernel ---------------------------
@pytest.mark.parametrize("cls", CELLS)
def test_fused_routes_decline_low_precision(cls):
    for policy in LOW:
        cell = randomized(cls(U, input_dim=D, dtype=policy))
        if not policy.startswith("mixed"):  # (a mixed cell's fused steps would compute in float32)
            assert kernels.stream_step(cell, B) is None
        x = inputs(B, D)
        out, _ = cell(x, None)  # the fused cell calls are not taken (float32 weights, bf16 compute)
        with kernels.use("reference"):
            want, _ = cell(x, None)
        assert torch.equal(out, want)
        stream = cell.stream(batch_size=B)
        assert torch.equal(stream.step(x), want) and "fused=False" in repr(stream)


# ----- lstm train --precision -------------------------------------------------------------------------
def test_train_precisions_and_exact_fp16_resume(tmp_path):
    from lstm.cli import main
    from lstm.train import TrainError
    from lstm.train.loop import train

    tiny = {"epochs": 2, "steps_per_epoch": 3, "batch_size": 16, "units": 8, "length": 10, "val_size": 32,
            "test_size": 32}
    quiet = dict(progress=False, log=lambda *_: None)
    results = {p: train(dict(tiny, precision=p), task_name="adding", out=str(tmp_path / p), **quiet)
               for p in ("fp32", "bf16", "fp16")}
    for p, result in results.items():
        assert math.isfinite(result["test"]["mse"]) and result["hp"]["precision"] == p
    assert results["bf16"]["test"] != results["fp32"]["test"]  # (the forward ran in bfloat16)
    state = json.loads((tmp_path / "fp16" / "checkpoints" / "epoch-002" / "state.json").read_text())
    assert state["loss_scale"]["scale"] > 0
    def crash_in_epoch_2(done):
        if done == 4:  # (3 steps an epoch: the last checkpoint is epoch 1's, with its loss scale)
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train(dict(tiny, precision="fp16"), task_name="adding", out=str(tmp_path / "cut"), _after_step=crash_in_epoch_2,
              **quiet)
    assert main(["train", "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert resumed["test"] == results["fp16"]["test"]
    with pytest.raises(TrainError, match=r"^--precision: expected one of fp32, bf16, fp16, got 'fp8'"):
        train(dict(tiny, precision="fp8"), task_name="adding", out=str(tmp_path / "bad"), **quiet)
