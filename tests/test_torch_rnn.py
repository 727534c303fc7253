"""The plain cells on torch's fused RNN ops (kernels/torch_rnn.py: cuDNN on CUDA; here torch's CPU
ops): every call they take equals the reference kernel, outputs, states and every gradient, with
lengths, resets, go_backwards, Keras' output rules and input dropout; the calls they cannot run
exactly go elsewhere."""

from __future__ import annotations

import itertools

import pytest
import torch

import lstm.kernels
from lstm import layers
from lstm.kernels import native, torch_rnn
from test_resets import outputs_and_gradients

CELLS = {
    "lstm": (layers.LSTM, {}),
    "lstm without bias": (layers.LSTM, {"use_bias": False}),
    "gru": (layers.GRU, {}),
    "gru without bias": (layers.GRU, {"use_bias": False}),
    "simple_rnn tanh": (layers.SimpleRNN, {}),
    "simple_rnn relu": (layers.SimpleRNN, {"activation": "relu"}),
}
B, T, D, U = 4, 7, 3, 5


def _assert_equal_to_the_reference(layer, x, **call):
    (got, got_grads), (expected, expected_grads) = (outputs_and_gradients(layer, x, kernel, **call)
                                                    for kernel in ("torch_rnn", "reference"))
    got, expected = got + list(got_grads), expected + list(expected_grads)
    assert len(got) == len(expected)
    for k, (u, v) in enumerate(zip(got, expected)):
        if u is None or v is None:  # (no gradient: a weight the outputs do not read)
            assert u is None and v is None, f"tensor {k}"
            continue
        scale = max(1.0, float(v.abs().max()))
        assert float((u - v).abs().max()) <= 1e-10 * scale, f"tensor {k}: {float((u - v).abs().max())}"


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("return_sequences, go_backwards, zero_output_for_mask",
                         list(itertools.product([True, False], [False, True], [False, True])))
def test_equals_the_reference_with_and_without_lengths(cell, return_sequences, go_backwards, zero_output_for_mask):
    layer_class, options = CELLS[cell]
    torch.manual_seed(0)
    layer = layer_class(U, return_sequences=return_sequences, return_state=True, go_backwards=go_backwards,
                        zero_output_for_mask=zero_output_for_mask, dtype="float64", **options)
    x = torch.randn(B, T, D, dtype=torch.float64)
    initial = [torch.randn(B, U, dtype=torch.float64) for _ in layer.cell.state_sizes]
    _assert_equal_to_the_reference(layer, x)
    _assert_equal_to_the_reference(layer, x, initial_state=initial)
    if native.extension() is None:
        return  # (the packed layout is the C++ extension's)
    lengths = torch.tensor([7, 2, 0, 5])
    _assert_equal_to_the_reference(layer, x, lengths=lengths, initial_state=initial)
    _assert_equal_to_the_reference(layer, x, mask=torch.arange(T) < lengths[:, None])  # (a right-padded mask)
    reset = torch.rand(B, T, generator=torch.Generator().manual_seed(1)) < 0.3
    _assert_equal_to_the_reference(layer, x, lengths=lengths, reset=reset, initial_state=initial)


@pytest.mark.parametrize("cell", ["lstm", "gru", "simple_rnn tanh"])
def test_input_dropout_in_training_equals_the_reference(cell):
    layer_class, options = CELLS[cell]
    torch.manual_seed(0)
    layer = layer_class(U, return_sequences=True, dropout=0.4, input_dim=D, dtype="float64", **options)
    layer.train()  # (built above: both calls draw the same masks after the same seed)
    x = torch.randn(B, T, D, dtype=torch.float64)
    _assert_equal_to_the_reference(layer, x)
    if native.extension() is not None:
        _assert_equal_to_the_reference(layer, x, lengths=torch.tensor([7, 3, 1, 6]))


def test_bidirectional_and_float32_equal_the_reference():
    torch.manual_seed(0)
    layer = layers.Bidirectional(layers.LSTM(U, return_sequences=True))
    x = torch.randn(B, T, D)
    with lstm.kernels.use("reference"):
        expected = layer(x)
    with lstm.kernels.use("torch_rnn"):
        got = layer(x)
    assert torch.allclose(got, expected, atol=1e-6)


EPS = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "bfloat16", "mixed_float16"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "simple_rnn tanh"])
def test_low_precision_is_near_the_reference(cell, policy):
    """bfloat16/float16 (a GPU's cuDNN under autocast; torch's CPU ops here, forced): the compute
    dtype's outputs and states, C in float32, within 2 roundings of the reference kernel's rules
    (torch's ops may hold C and the gates in the low precision between steps); gradients within 16
    (torch's CPU ops also sum them over the steps in the low precision)."""
    layer_class, options = CELLS[cell]
    torch.manual_seed(0)
    layer = layer_class(U, return_sequences=True, return_state=True, input_dim=D, dtype=policy, **options)
    x = torch.randn(B, 12, D)
    calls = [{}] if native.extension() is None else [{}, {"lengths": torch.tensor([12, 3, 0, 8])}]
    eps = EPS[policy.removeprefix("mixed_")]
    for call in calls:
        results = {}
        for kernel in ("torch_rnn", "reference"):
            with lstm.kernels.use(kernel):
                inputs = x.clone().requires_grad_()
                outputs = layer(inputs, **call)
                weights = [torch.linspace(-1, 1, o.numel()).reshape(o.shape) for o in outputs]
                loss = sum((o.float() * w).sum() for o, w in zip(outputs, weights))
                grads = torch.autograd.grad(loss, [inputs, *layer.parameters()])
            results[kernel] = ([o.detach() for o in outputs], grads)
        (got, got_grads), (expected, expected_grads) = results["torch_rnn"], results["reference"]
        assert [o.dtype for o in got] == [o.dtype for o in expected]
        for what, pairs, tolerance in (("output or state", zip(got, expected), 2 * eps),
                                       ("gradient", zip(got_grads, expected_grads), 16 * eps)):
            for k, (u, v) in enumerate(pairs):
                scale = max(1.0, float(v.float().abs().max()))
                difference = float((u.float() - v.float()).abs().max())
                assert difference <= tolerance * scale, f"{call}, {what} {k}: {difference:.3g}"


def _problem(layer_class=layers.LSTM, call=None, training=False, **options):
    layer = layer_class(U, input_dim=D, **options)
    layer.train(training)
    return layer.recurrence(torch.randn(B, T, D), **(call or {}))


def test_takes_only_what_it_runs_exactly():
    assert torch_rnn.supports(_problem())
    holes = torch.tensor([[True, False, True, True, True, True, True]] * B)
    refused = {
        "a mask with holes": _problem(call={"mask": holes}),
        "recurrent dropout": _problem(training=True, recurrent_dropout=0.3),
        "per-gate input dropout": _problem(training=True, dropout=0.3, implementation=1),
        "a trace": _problem(call={"trace": True}),
        "hard_sigmoid": _problem(recurrent_activation="hard_sigmoid"),
        "a variant": _problem(peephole=True),
        "GRU reset_after=False": _problem(layers.GRU, reset_after=False),
        "SimpleRNN sigmoid": _problem(layers.SimpleRNN, activation="sigmoid"),
        "float16 inputs": _problem(dtype="float16"),
    }
    for what, p in refused.items():
        assert not torch_rnn.supports(p), what


def test_the_cpu_runs_the_cpp_kernels_first():
    if native.extension() is None:
        pytest.skip(f"the C++ kernels are not loaded: {native.unavailable_reason()}")
    assert lstm.kernels.select(_problem()).name == "fused_cpp"
    assert lstm.kernels.select(_problem(layers.GRU)).name == "fused_gru_simple_rnn"
