"""The C++ GRU and SimpleRNN kernel (fused_gru_simple_rnn) equals the reference kernel: outputs,
states, every gradient and the traces; the helpers here serve every kernel's equality tests."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import lstm.kernels
from lstm import layers
from lstm.kernels import CellSpec, Recurrence, fused_gru_simple_rnn, native, reference

ACTS = ["tanh", "sigmoid", "relu", "linear", "hard_sigmoid", "hard_sigmoid_tf_keras"]


@pytest.fixture(scope="module", autouse=True)
def _extension():
    if native.extension() is None:
        pytest.skip(f"the C++ kernels are not loaded: {native.unavailable_reason()}")


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


def _run(kernel_module, p: Recurrence, seed=1, weight_dtype=None):
    """Outputs, states and the gradients of a random weighted sum of them (weights drawn in
    float64 and rounded to `weight_dtype`, default the problem's dtype)."""
    result = kernel_module.run(p)
    leaves = [p.inputs, p.kernel, p.recurrent_kernel, p.bias, *p.initial_state]
    leaves = [t for t in leaves if t is not None and t.requires_grad]
    g = torch.Generator().manual_seed(seed)
    outs = [result.outputs, *result.states]
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(weight_dtype or o.dtype).to(o.dtype)).sum()
               for o in outs)
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    else:
        grads = [None] * len(leaves)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
    return [o.detach() for o in outs], grads


def _max_err(a, b) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def assert_close(a, b, dtype, what, scale_tol=None, allowance=0.0):
    """|a - b| <= max(tol * scale, allowance), scale = max(1, |b|max)."""
    assert a.shape == b.shape, (what, a.shape, b.shape)
    if a.numel() == 0:
        return
    tol = scale_tol or (1e-10 if dtype == torch.float64 else 2e-5)
    scale = max(1.0, float(b.abs().max()))
    err = _max_err(a, b)
    bound = max(tol * scale, allowance)
    assert err <= bound, f"{what}: max err {err} > max({tol} * {scale}, allowance {allowance})"


# ----- float32 vs float64: how wrong may a kernel be? ---------------------------------------------
# With bounded gates (tanh/sigmoid) the recurrence is well-conditioned and a fixed tolerance
# relative to the result's scale holds. With unbounded ones (relu, linear: the state can grow
# like a product of T matrices) rounding errors are amplified, and two equally right float32
# kernels differ by more than any fixed tolerance. There the judge is the float64 reference of
# the same problem (the float32 values, cast exactly), and the allowance is the error a float32
# computation of this problem can have: the worst relative error (over the outputs, states and
# gradients: one problem, one condition) of
#   - the float32 reference against it (the rounding errors of one float32 algorithm), and
#   - the float64 reference of the problem with every input and weight perturbed by up to one
#     float32 rounding (eps32, relative): the condition itself, without the luck of the first
#     (measured: one algorithm's error can be 30x below another's on the same problem).
# A kernel's error on each value must be within max(tol * scale, REF_ERROR_FACTOR * that relative
# error * scale). For a float64 problem (no wider reference) the float64 reference is the judge
# and the relative error above (the float32 twin of the problem) is scaled by eps64 / eps32.
WELL_CONDITIONED = ("tanh", "sigmoid")
REF_ERROR_FACTOR = 8.0
_EPS32 = torch.finfo(torch.float32).eps
_EPS_RATIO = torch.finfo(torch.float64).eps / _EPS32


def well_conditioned(p: Recurrence) -> bool:
    acts = [p.cell.activation] + ([] if p.cell.kind == "simple_rnn" else [p.cell.recurrent_activation])
    return all(isinstance(a, str) and a in WELL_CONDITIONED for a in acts)


def cast_problem(p: Recurrence, dtype, perturb: float = 0.0, seed: int = 0) -> Recurrence:
    """The same problem in another dtype (leaves keep requires_grad); perturb > 0: inputs,
    weights and initial states times (1 + u), u uniform in [-perturb, perturb]."""
    g = torch.Generator().manual_seed(seed)

    def cast(t, noisy=True):
        if t is None:
            return None
        out = t.detach().to(dtype)
        if perturb and noisy:
            out = out * (1 + perturb * (2 * torch.rand(out.shape, generator=g, dtype=torch.float64) - 1)).to(dtype)
        return out.requires_grad_(t.requires_grad)

    return dataclasses.replace(p, inputs=cast(p.inputs), kernel=cast(p.kernel), recurrent_kernel=cast(p.recurrent_kernel),
                               bias=cast(p.bias), initial_state=tuple(cast(s) for s in p.initial_state),
                               input_dropout=cast(p.input_dropout, False),
                               recurrent_dropout=cast(p.recurrent_dropout, False))


def _flat(run) -> list:
    return [*run[0], *run[1]]


def _relative_error(values, truth) -> float:
    return max((_max_err(a, b) / max(1.0, float(b.abs().max())) for a, b in zip(values, truth) if b.numel()),
               default=0.0)


def reference_allowances(p: Recurrence, ref) -> tuple[list, list[float]]:
    """(the values to compare a kernel with, one error allowance per value) for an
    ill-conditioned problem; `ref` = _run(reference, p), outputs then gradients, flattened."""
    weights = torch.float32
    if p.inputs.dtype == torch.float64:
        truth = ref
        rounded = _flat(_run(reference, cast_problem(p, torch.float32), weight_dtype=weights))
    else:
        truth = _flat(_run(reference, cast_problem(p, torch.float64), weight_dtype=weights))
        rounded = ref
    perturbed = _flat(_run(reference, cast_problem(p, torch.float64, perturb=_EPS32), weight_dtype=weights))
    rel = max(_relative_error(rounded, truth), _relative_error(perturbed, truth))
    if p.inputs.dtype == torch.float64:
        rel *= _EPS_RATIO
    return truth, [REF_ERROR_FACTOR * rel * max(1.0, float(b.abs().max())) if b.numel() else 0.0 for b in truth]


def check_against_reference(kernel_module, p: Recurrence, in_hypothesis=False, tol=None, no_grad=False):
    """The kernel's outputs, states and gradients equal the reference's (see above for the
    tolerance); no_grad: also the no-grad (inference) path's outputs and states."""
    out_r, grads_r = _run(reference, p)
    if in_hypothesis:  # unbounded activations (linear, relu) can overflow: not a comparison
        assume(all(bool(torch.isfinite(t).all()) and float(t.abs().max()) < 1e6
                   for t in [*out_r, *grads_r] if t.numel()))
    out_f, grads_f = _run(kernel_module, p)
    dtype = p.inputs.dtype
    names = [f"output {i}" for i in range(len(out_f))]
    names += [n for n, t in zip(["inputs", "kernel", "recurrent_kernel", "bias", "h0", "c0"],
                                [p.inputs, p.kernel, p.recurrent_kernel, p.bias, *p.initial_state])
              if t is not None and t.requires_grad]
    names = [n if n.startswith("output") else f"grad {n}" for n in names]
    got = [*out_f, *grads_f]
    expected = [*out_r, *grads_r]
    allowances = [0.0] * len(expected)
    if not well_conditioned(p):
        expected, allowances = reference_allowances(p, expected)
    if no_grad:
        with torch.no_grad():
            res = kernel_module.run(p)
        n_out = len(out_f)
        got += [t.detach() for t in (res.outputs, *res.states)]
        names += [f"no-grad {n}" for n in names[:n_out]]
        expected += expected[:n_out]
        allowances += allowances[:n_out]
    assert len(got) == len(expected) == len(names)
    for n, a, b, allowance in zip(names, got, expected, allowances):
        assert_close(a, b, dtype, n, tol, allowance)


def check_equal(p: Recurrence, in_hypothesis=False):
    assert fused_gru_simple_rnn.supports(p)
    check_against_reference(fused_gru_simple_rnn, p, in_hypothesis, no_grad=True)


# the options every kernel's property test draws (make_problem's arguments, less kind, B and activations)
COMMON_PROBLEM_ARGS = {
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
    "input_dropout": st.sampled_from(["none", "shared", "per_gate"]),
    "recurrent_dropout": st.booleans(),
}

problem_args = st.fixed_dictionaries({
    **COMMON_PROBLEM_ARGS,
    "kind": st.sampled_from(["gru", "simple_rnn"]),
    "B": st.integers(0, 4),
    "reset_after": st.booleans(),
    "activation": st.sampled_from(ACTS[:2] + ACTS),
    "recurrent_activation": st.sampled_from(ACTS[:2] + ACTS),
})


@settings(max_examples=int(__import__("os").environ.get("FUSED_EXAMPLES", 150)), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problem_args)
def test_fused_equals_reference(args):
    check_equal(make_problem(**args), in_hypothesis=True)


@pytest.mark.parametrize("kind", ["gru", "simple_rnn"])
@pytest.mark.parametrize("B", [1, 3, 17])  # 17 rows: the BLAS path of the products
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_reference_fixed(kind, B, dtype):
    for reset_after in ([True, False] if kind == "gru" else [True]):
        for rd in (False, True):
            for in_drop in ("none", "per_gate"):
                check_equal(make_problem(kind, B, 9, 5, 7, dtype=dtype, mask="holes", reset_after=reset_after,
                                         recurrent_dropout=rd, input_dropout=in_drop, seed=B))


@pytest.mark.parametrize("kind", ["gru", "simple_rnn"])
def test_long_sequence_float32(kind):
    p = make_problem(kind, 2, 60, 8, 16, dtype=torch.float32, mask="holes", go_backwards=True)
    check_equal(p)


def check_trace(kernel_module, p: Recurrence, tol=None):
    """kernel_module's trace equals the reference's (keys, order, shapes, values), with and
    without grad; outputs and states the same with or without it; the trace is detached."""
    p.trace = True
    assert kernel_module.supports(p)
    dtype = p.inputs.dtype
    expected = reference.run(p)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            got = kernel_module.run(p)
        assert list(got.trace) == list(expected.trace)
        for k, v in expected.trace.items():
            assert not got.trace[k].requires_grad
            assert_close(got.trace[k], v.detach(), dtype, f"trace {k} (grad={grad})", tol)
        p.trace = False
        with torch.set_grad_enabled(grad):
            plain = kernel_module.run(p)
        p.trace = True
        for a, b in zip((got.outputs, *got.states), (plain.outputs, *plain.states)):
            # (equal up to rounding: inference without a trace may take another route)
            assert_close(a.detach(), b.detach(), dtype, "outputs with/without trace", tol)
            assert a.requires_grad == b.requires_grad


TRACE_CASES = [
    {},
    {"mask": "holes"},
    {"mask": "holes_and_empty", "go_backwards": True},
    {"mask": "holes", "go_backwards": True, "return_sequences": False, "recurrent_dropout": True,
     "input_dropout": "per_gate", "zero_output_for_mask": True},
    {"mask": "holes", "reset_after": False, "initial_state": False, "use_bias": False,
     "activation": "relu", "recurrent_activation": "hard_sigmoid"},
]


@pytest.mark.parametrize("kind", ["gru", "simple_rnn"])
@pytest.mark.parametrize("case", range(len(TRACE_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trace_equals_reference(kind, case, dtype):
    for B, T in ((3, 6), (1, 1), (17, 4)):
        check_trace(fused_gru_simple_rnn, make_problem(kind, B, T, 4, 5, dtype=dtype, seed=case, **TRACE_CASES[case]))


@pytest.mark.parametrize("kind", ["gru", "simple_rnn"])
def test_trace_of_empty_sequence(kind):
    p = make_problem(kind, 2, 0, 3, 4)
    p.trace = True
    got, expected = fused_gru_simple_rnn.run(p).trace, reference.run(p).trace
    assert list(got) == list(expected) and all(got[k].shape == (2, 0, 4) for k in got)


def test_trace_runs_on_the_fused_kernel():
    p = make_problem("gru", 2, 3, 4, 5)
    p.trace = True
    assert lstm.kernels.select(p).name == "fused_gru_simple_rnn"
    layer = layers.SimpleRNN(4, return_sequences=True)
    x = torch.randn(2, 5, 3)
    out, gates = layer(x, return_gates=True)
    with lstm.kernels.use("reference"):
        out_r, gates_r = layer(x, return_gates=True)
    assert torch.allclose(out, out_r, atol=1e-6) and torch.allclose(gates["h"], gates_r["h"], atol=1e-6)


def test_unsupported_cases_fall_back():
    q = make_problem("gru", 2, 3, 4, 5, activation="softplus")
    assert not fused_gru_simple_rnn.supports(q) and lstm.kernels.select(q).name == "reference"
    r = make_problem("simple_rnn", 2, 3, 4, 5)
    r.cell = CellSpec("simple_rnn", torch.tanh, "sigmoid")
    assert not fused_gru_simple_rnn.supports(r)
    assert not fused_gru_simple_rnn.supports(make_problem("lstm", 2, 3, 4, 5))


def test_dispatch_picks_fused_on_cpu():
    for kind, kernel in (("lstm", "fused_cpp"), ("gru", fused_gru_simple_rnn.name),
                         ("simple_rnn", fused_gru_simple_rnn.name)):
        p = make_problem(kind, 2, 3, 4, 5)
        assert lstm.kernels.select(p).name == kernel
        with lstm.kernels.use("reference"):
            assert lstm.kernels.select(p).name == "reference"


@pytest.mark.parametrize("kind", ["gru", "simple_rnn"])
def test_inference_without_grad_equals_reference(kind):
    p = make_problem(kind, 3, 6, 4, 5, mask="holes")
    with torch.no_grad():
        a = fused_gru_simple_rnn.run(p)
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


@pytest.mark.parametrize("layer_cls", [layers.GRU, layers.SimpleRNN])
def test_layer_dropout_training_equals_reference(layer_cls):
    layer = layer_cls(5, dropout=0.3, recurrent_dropout=0.2, return_sequences=True, seed=3)
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


@pytest.mark.parametrize("kind", ["gru", "simple_rnn"])
def test_backward_twice_with_retain_graph(kind):
    p = make_problem(kind, 2, 4, 3, 5, dtype=torch.float64)
    result = fused_gru_simple_rnn.run(p)
    loss = result.outputs.sum()
    (g1,) = torch.autograd.grad(loss, [p.kernel], retain_graph=True)
    (g2,) = torch.autograd.grad(loss, [p.kernel])
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("layer_cls, kwargs", [(layers.GRU, {}), (layers.GRU, {"reset_after": False}),
                                               (layers.SimpleRNN, {"activation": "relu"})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stream_and_cell_call_equal_reference(layer_cls, kwargs, dtype):
    """The kernel's streaming step and cell call (T = 1 forwards called directly) equal the
    reference, with autograd through the cell call; bad inputs take the full route's errors."""
    torch.manual_seed(2)
    layer = layer_cls(5, return_sequences=True, input_shape=(None, 3), dtype=str(dtype).split(".")[1], **kwargs)
    x = torch.randn(2, 6, 3, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    with torch.no_grad(), lstm.kernels.use("reference"):
        expected = layer(x)
    s = layer.stream(batch_size=2)
    assert s._fast is not None
    got = torch.stack([s.step(x[:, t]) for t in range(x.shape[1])], dim=1)
    assert torch.allclose(got, expected, atol=tol) and torch.allclose(s.state[0], expected[:, -1], atol=tol)
    cell = layer.cell
    h = torch.randn(2, 5, dtype=dtype, requires_grad=True)
    out, states = cell(x[:, 0], [h])
    assert isinstance(cell._lean_call, fused_gru_simple_rnn.CellCall)
    with lstm.kernels.use("reference"):
        out_r, h_r = cell(x[:, 0], h)  # (a bare state in, a bare state out, as Keras)
    grads = torch.autograd.grad((out * 2 + states[0]).sum(), [h, *cell.parameters()])
    grads_r = torch.autograd.grad((out_r * 2 + h_r).sum(), [h, *cell.parameters()])
    for a, b in zip((out, *grads), (out_r, *grads_r)):
        assert torch.allclose(a, b, atol=tol)
    with pytest.raises(ValueError, match=r"states\[0\]: expected shape"):
        cell(x[:, 0], [h[:1]])
    with pytest.raises(ValueError, match="x_t: expected shape"):
        s.step(x[:1, 0])
