"""The fused CPU kernel equals the reference kernel: outputs, states and every gradient."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import lstm.kernels
from lstm import layers
from lstm.kernels import CellSpec, Recurrence, fused_cpu, reference

ACTS = ["tanh", "sigmoid", "relu", "linear", "hard_sigmoid", "hard_sigmoid_tf_keras"]


def make_problem(kind, B, T, D, U, dtype=torch.float32, seed=0, mask="none", go_backwards=False,
                 zero_output_for_mask=False, return_sequences=True, initial_state=True, use_bias=True,
                 reset_after=True, input_dropout="none", recurrent_dropout=False, activation="tanh",
                 recurrent_activation="sigmoid"):
    g = torch.Generator().manual_seed(seed)
    G = {"lstm": 4, "gru": 3, "simple_rnn": 1}[kind]

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)

    x = rnd(B, T, D)
    kernel = rnd(D, G * U, scale=0.5)
    rec = rnd(U, G * U, scale=0.5)
    bias = None
    if use_bias:
        bias = rnd(2, G * U, scale=0.5) if (kind == "gru" and reset_after) else rnd(G * U, scale=0.5)
    n_states = 2 if kind == "lstm" else 1
    if initial_state:
        states = tuple(rnd(B, U) for _ in range(n_states))
    else:
        states = tuple(torch.zeros(B, U, dtype=dtype) for _ in range(n_states))
    m = None
    if mask != "none":
        m = torch.rand(B, T, generator=g) > 0.4
        if mask == "holes_and_empty" and B > 0:
            m[0] = False
    in_drop = None
    if input_dropout != "none":
        n = 1 if input_dropout == "shared" else G
        in_drop = ((torch.rand(n, B, D, generator=g) > 0.3).to(dtype) / 0.7)
    rec_drop = None
    if recurrent_dropout:
        rec_drop = ((torch.rand(G, B, U, generator=g) > 0.3).to(dtype) / 0.7)
    cell = CellSpec(kind, activation, recurrent_activation, reset_after=reset_after)
    return Recurrence(cell, x, kernel, rec, bias, states, mask=m, go_backwards=go_backwards,
                      zero_output_for_mask=zero_output_for_mask, return_sequences=return_sequences,
                      input_dropout=in_drop, recurrent_dropout=rec_drop)


def _run(kernel_module, p: Recurrence, seed=1):
    result = kernel_module.run(p)
    leaves = [p.inputs, p.kernel, p.recurrent_kernel, p.bias, *p.initial_state]
    leaves = [t for t in leaves if t is not None and t.requires_grad]
    g = torch.Generator().manual_seed(seed)
    outs = [result.outputs, *result.states]
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    else:
        grads = [None] * len(leaves)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
    return [o.detach() for o in outs], grads


def assert_close(a, b, dtype, what, scale_tol=None):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if a.numel() == 0:
        return
    tol = scale_tol or (1e-10 if dtype == torch.float64 else 2e-5)
    scale = max(1.0, float(b.abs().max()))
    err = float((a.double() - b.double()).abs().max())
    assert err <= tol * scale, f"{what}: max err {err} > {tol} * {scale}"


def check_equal(p: Recurrence, in_hypothesis=False):
    assert fused_cpu.supports(p)
    out_r, grads_r = _run(reference, p)
    if in_hypothesis:  # unbounded activations (linear, relu) can overflow: not a comparison
        assume(all(bool(torch.isfinite(t).all()) and float(t.abs().max()) < 1e6
                   for t in [*out_r, *grads_r] if t.numel()))
    out_f, grads_f = _run(fused_cpu, p)
    dtype = p.inputs.dtype
    for i, (a, b) in enumerate(zip(out_f, out_r)):
        assert_close(a, b, dtype, f"output {i}")
    names = ["inputs", "kernel", "recurrent_kernel", "bias", "h0", "c0"]
    if p.bias is None:
        names.remove("bias")
    for n, a, b in zip(names, grads_f, grads_r):
        assert_close(a, b, dtype, f"grad {n}")


problem_args = st.fixed_dictionaries({
    "kind": st.sampled_from(["lstm", "lstm", "gru", "simple_rnn"]),
    "B": st.integers(0, 4),
    "T": st.integers(0, 7),
    "D": st.integers(1, 6),
    "U": st.integers(1, 6),
    "dtype": st.sampled_from([torch.float32, torch.float64]),
    "seed": st.integers(0, 10_000),
    "mask": st.sampled_from(["none", "holes", "holes_and_empty"]),
    "go_backwards": st.booleans(),
    "zero_output_for_mask": st.booleans(),
    "return_sequences": st.booleans(),
    "initial_state": st.booleans(),
    "use_bias": st.booleans(),
    "reset_after": st.booleans(),
    "input_dropout": st.sampled_from(["none", "shared", "per_gate"]),
    "recurrent_dropout": st.booleans(),
    "activation": st.sampled_from(ACTS[:2] + ACTS),
    "recurrent_activation": st.sampled_from(ACTS[:2] + ACTS),
})


@settings(max_examples=int(__import__("os").environ.get("FUSED_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem_args)
def test_fused_equals_reference(args):
    check_equal(make_problem(**args), in_hypothesis=True)


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple_rnn"])
@pytest.mark.parametrize("B", [1, 3, 17])  # 17 rows: the BLAS path of the products
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_reference_fixed(kind, B, dtype):
    for reset_after in ([True, False] if kind == "gru" else [True]):
        for rd in (False, True):
            for in_drop in ("none", "per_gate"):
                check_equal(make_problem(kind, B, 9, 5, 7, dtype=dtype, mask="holes", reset_after=reset_after,
                                         recurrent_dropout=rd, input_dropout=in_drop, seed=B))


@pytest.mark.parametrize("kind", ["lstm", "gru", "simple_rnn"])
def test_long_sequence_float32(kind):
    p = make_problem(kind, 2, 60, 8, 16, dtype=torch.float32, mask="holes", go_backwards=True)
    check_equal(p)


def test_unsupported_cases_fall_back():
    p = make_problem("lstm", 2, 3, 4, 5)
    assert fused_cpu.supports(p)
    p.trace = True
    assert not fused_cpu.supports(p)
    assert lstm.kernels.select(p).name == "reference"
    q = make_problem("lstm", 2, 3, 4, 5, activation="softplus")
    assert not fused_cpu.supports(q)
    r = make_problem("lstm", 2, 3, 4, 5)
    r.cell = CellSpec("lstm", torch.tanh, "sigmoid")
    assert not fused_cpu.supports(r)


def test_dispatch_picks_fused_on_cpu():
    p = make_problem("lstm", 2, 3, 4, 5)
    assert lstm.kernels.select(p).name in ("fused_cpp", "fused_cpu")  # fused_cpp when its C++ builds
    with lstm.kernels.use("reference"):
        assert lstm.kernels.select(p).name == "reference"


def test_inference_without_grad_equals_reference():
    p = make_problem("lstm", 3, 6, 4, 5, mask="holes")
    with torch.no_grad():
        a = fused_cpu.run(p)
        b = reference.run(p)
    assert torch.allclose(a.outputs, b.outputs, atol=1e-6)
    for s, t in zip(a.states, b.states):
        assert torch.allclose(s, t, atol=1e-6)


@pytest.mark.parametrize("layer_cls, kwargs", [
    (layers.LSTM, {}),
    (layers.LSTM, {"go_backwards": True, "return_state": True}),
    (layers.GRU, {"return_state": True}),
    (layers.GRU, {"reset_after": False}),
    (layers.SimpleRNN, {"go_backwards": True}),
])
def test_layer_default_equals_reference(layer_cls, kwargs):
    torch.manual_seed(0)
    layer = layer_cls(6, return_sequences=True, **kwargs)
    x = torch.randn(3, 5, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)

    def run():
        out = layer(x, mask=mask)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum() for o in outs)
        params = [x, *layer.parameters()]
        return [o.detach() for o in outs], torch.autograd.grad(loss, params)

    outs_f, grads_f = run()
    with lstm.kernels.use("reference"):
        outs_r, grads_r = run()
    for a, b in zip(outs_f, outs_r):
        assert torch.allclose(a, b, atol=1e-5)
    for a, b in zip(grads_f, grads_r):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_layer_dropout_training_equals_reference():
    layer = layers.LSTM(5, dropout=0.3, recurrent_dropout=0.2, return_sequences=True, seed=3)
    layer.train()
    x = torch.randn(4, 6, 3, requires_grad=True)

    def run():
        layer.cell._generator.manual_seed(3)
        out = layer(x)
        return out.detach(), torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])

    out_f, grads_f = run()
    with lstm.kernels.use("reference"):
        out_r, grads_r = run()
    assert torch.allclose(out_f, out_r, atol=1e-5)
    for a, b in zip(grads_f, grads_r):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_numba_loops_are_cached_on_disk():
    from lstm.kernels import _numba_rnn

    assert _numba_rnn.lstm_forward._cache.__class__.__name__ == "FunctionCache"  # cache=True


def test_backward_twice_with_retain_graph():
    p = make_problem("lstm", 2, 4, 3, 5, dtype=torch.float64)
    result = fused_cpu.run(p)
    loss = result.outputs.sum()
    (g1,) = torch.autograd.grad(loss, [p.kernel], retain_graph=True)
    (g2,) = torch.autograd.grad(loss, [p.kernel])
    assert torch.equal(g1, g2)
