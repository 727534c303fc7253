"""The C++ LSTM kernel (fused_cpp) equals the reference kernel: outputs, states and every
gradient, over shapes, options, masks, dropout masks and dtypes; the dispatch picks it for a
plain LSTM on CPU; streaming through its C++ step equals the layer.

Every test skips with the reason when the C++ kernels are not loaded (tests/test_native.py
fails then)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import lstm.kernels
from lstm import layers
from lstm.kernels import fused_cpp, native
from test_fused_kernel import (ACTS, COMMON_PROBLEM_ARGS, TRACE_CASES, _run, check_against_reference, check_trace,
                               make_problem)


@pytest.fixture(scope="module", autouse=True)
def _extension():
    if native.extension() is None:
        pytest.skip(f"the C++ kernels are not loaded: {native.unavailable_reason()}")


def check_equal(p, in_hypothesis=False, tol=None):
    """Equal to the reference (float32 ill-conditioned problems judged against float64, see
    test_fused_kernel.check_against_reference), the no-grad path (inference; the single-step
    route for T == 1) included."""
    assert fused_cpp.supports(p)
    tol = tol or (1e-10 if p.inputs.dtype == torch.float64 else 1e-5)
    check_against_reference(fused_cpp, p, in_hypothesis, tol, no_grad=True)


problem_args = st.fixed_dictionaries({
    **COMMON_PROBLEM_ARGS,
    "kind": st.just("lstm"),
    "B": st.integers(0, 9),
    "activation": st.sampled_from(ACTS[:1] * 4 + ACTS),
    "recurrent_activation": st.sampled_from(ACTS[1:2] * 4 + ACTS),
})


@settings(max_examples=int(__import__("os").environ.get("FUSED_EXAMPLES", 150)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(problem_args)
def test_cpp_equals_reference(args):
    check_equal(make_problem(**args), in_hypothesis=True)


@pytest.mark.parametrize("B", [1, 2, 5, 17])  # <= 4 rows: register loops; more: MKL and row chunks per thread
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, 9])
def test_cpp_equals_reference_fixed(B, dtype, T):
    for rd in (False, True):
        for in_drop in ("none", "shared", "per_gate"):
            for backwards in (False, True):
                check_equal(make_problem("lstm", B, T, 5, 7, dtype=dtype, mask="holes_and_empty", recurrent_dropout=rd,
                                         input_dropout=in_drop, go_backwards=backwards, return_sequences=B % 2 == 1,
                                         seed=B))


@pytest.mark.parametrize("B, T, D, U", [(3, 120, 8, 16), (20, 40, 16, 70)])
def test_long_sequences_float32(B, T, D, U):
    p = make_problem("lstm", B, T, D, U, dtype=torch.float32, mask="holes", go_backwards=True)
    check_equal(p, tol=2e-5)


def test_thread_counts_give_the_same_numbers():
    p = make_problem("lstm", 9, 12, 5, 33, dtype=torch.float64, mask="holes", recurrent_dropout=True)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_run(fused_cpp, p))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


def test_dispatch_picks_cpp_by_default():
    p = make_problem("lstm", 2, 3, 4, 5)
    assert lstm.kernels.select(p).name == "fused_cpp"
    layer = layers.LSTM(5)
    layer(torch.randn(2, 3, 4))
    assert lstm.kernels.select(layer.cell.recurrence(torch.randn(2, 3, 4), [torch.zeros(2, 5)] * 2)).name == "fused_cpp"
    # what it does not cover goes to the next kernel
    q = make_problem("gru", 2, 3, 4, 5)
    assert not fused_cpp.supports(q)
    r = make_problem("lstm", 2, 3, 4, 5, activation="softplus")
    assert not fused_cpp.supports(r) and lstm.kernels.select(r).name == "reference"
    s = make_problem("lstm", 2, 3, 4, 5)
    s.trace = True
    assert fused_cpp.supports(s) and lstm.kernels.select(s).name == "fused_cpp"  # traces too


@pytest.mark.parametrize("case", range(len(TRACE_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trace_equals_reference(case, dtype):
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for B, T in ((3, 6), (1, 1), (6, 1), (17, 4)):  # (1, 1): the inference single-step route without a trace
        check_trace(fused_cpp, make_problem("lstm", B, T, 4, 5, dtype=dtype, seed=case, **TRACE_CASES[case]), tol)


def test_trace_of_empty_sequence_and_layer_gates():
    p = make_problem("lstm", 2, 0, 3, 4)
    p.trace = True
    got = fused_cpp.run(p).trace
    assert list(got) == ["i", "f", "c_tilde", "c", "o", "h"] and all(v.shape == (2, 0, 4) for v in got.values())
    torch.manual_seed(0)
    layer = layers.LSTM(5, go_backwards=True, return_sequences=True)
    x = torch.randn(3, 6, 4)
    mask = torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6, [0] * 6], dtype=torch.bool)
    layer.record_gates = True
    out = layer(x, mask=mask)
    gates = layer.last_gates
    with lstm.kernels.use("reference"):
        out_r = layer(x, mask=mask)
    for k, v in layer.last_gates.items():
        assert torch.allclose(gates[k], v, atol=1e-6), k
    assert torch.allclose(out, out_r, atol=1e-6)


def test_trace_with_grad_is_guarded_against_in_place_edits():
    # the gate traces are views of the buffers the backward reads: editing one in place is an error
    p = make_problem("lstm", 2, 4, 3, 5, dtype=torch.float64)
    p.trace = True
    res = fused_cpp.run(p)
    res.trace["i"].mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        res.outputs.sum().backward()


def test_cell_call_uses_cpp_and_equals_reference():
    torch.manual_seed(0)
    cell = layers.LSTMCell(6)
    x = torch.randn(2, 4)
    state = [torch.randn(2, 6), torch.randn(2, 6)]
    with torch.no_grad():
        out, new = cell(x, state)
        with lstm.kernels.use("reference"):
            out_r, new_r = cell(x, state)
    assert torch.allclose(out, out_r, atol=1e-6)
    for a, b in zip(new, new_r):
        assert torch.allclose(a, b, atol=1e-6)


def test_backward_twice_with_retain_graph():
    p = make_problem("lstm", 2, 4, 3, 5, dtype=torch.float64)
    result = fused_cpp.run(p)
    loss = result.outputs.sum()
    (g1,) = torch.autograd.grad(loss, [p.kernel], retain_graph=True)
    (g2,) = torch.autograd.grad(loss, [p.kernel])
    assert torch.equal(g1, g2)


def test_gradcheck_float64():
    p = make_problem("lstm", 2, 3, 2, 3, dtype=torch.float64, mask="holes")

    def f(x, k, r, b, h, c):
        q = make_problem("lstm", 2, 3, 2, 3, dtype=torch.float64, mask="holes")
        q.inputs, q.kernel, q.recurrent_kernel, q.bias, q.initial_state = x, k, r, b, (h, c)
        res = fused_cpp.run(q)
        return (res.outputs, *res.states)

    assert torch.autograd.gradcheck(f, (p.inputs, p.kernel, p.recurrent_kernel, p.bias, *p.initial_state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch, units", [(1, 8), (3, 8), (6, 20)])
def test_stream_via_cpp_equals_layer(dtype, batch, units):
    torch.manual_seed(1)
    layer = layers.LSTM(units, return_sequences=True, dtype="float64" if dtype == torch.float64 else "float32")
    x = torch.randn(batch, 7, 5, dtype=dtype)
    with torch.no_grad():
        full = layer(x)
    s = layer.stream(batch_size=batch)
    assert s._fast is not None  # the C++ step
    steps = [s.step(x[:, t]) for t in range(7)]
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-6 if dtype == torch.float32 else 1e-12)
    # outputs are fresh tensors, never the state buffer
    assert steps[0].data_ptr() != steps[1].data_ptr()
    h, c = s.state
    assert torch.allclose(h, full[:, -1], atol=1e-6 if dtype == torch.float32 else 1e-12)
    assert c.shape == (batch, units)


def test_stream_via_cpp_follows_in_place_weight_updates_and_reset():
    torch.manual_seed(2)
    layer = layers.LSTM(6, return_sequences=True)
    x = torch.randn(1, 4, 3)
    layer(x)
    s = layer.stream()
    a = s.step(x[0, 0])
    with torch.no_grad():
        layer.cell.recurrent_kernel.mul_(0.5)
        layer.cell.bias.add_(0.1)
        full = layer(x)
    s.reset()
    got = torch.stack([s.step(x[0, t]) for t in range(4)], 1)
    assert torch.allclose(got, full, atol=1e-6)
    assert not torch.allclose(a, got[:, 0])
    # numpy and double inputs are converted
    s.reset()
    assert torch.allclose(s.step(x[0, 0].double().numpy()), full[:, 0], atol=1e-6)


def test_torch_compile_traces_through_without_graph_breaks():
    p = make_problem("lstm", 3, 5, 4, 6, dtype=torch.float64, mask="holes", go_backwards=True, input_dropout="shared")

    def f(x, k, r, b, h, c):
        p.inputs, p.kernel, p.recurrent_kernel, p.bias, p.initial_state = x, k, r, b, (h, c)
        res = fused_cpp.run(p)
        return res.outputs.sum() + (res.states[0] * 2).sum() + res.states[1].sum()

    args = (p.inputs, p.kernel, p.recurrent_kernel, p.bias, *p.initial_state)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")  # the custom ops, no graph break
    a = compiled(*args)
    ga = torch.autograd.grad(a, args)
    b = f(*args)
    gb = torch.autograd.grad(b, args)
    assert torch.allclose(a, b, rtol=1e-12)
    for x, y in zip(ga, gb):
        assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()


@pytest.fixture
def packed_everywhere():
    """Every per-step product with more than the register-loop rows and at least 4 steps runs on
    MKL's packed GEMM (float32; float64 and a torch without the symbols keep the plain GEMM)."""
    ext = native.extension()
    previous = ext.set_pack_min_work(0)
    yield
    ext.set_pack_min_work(previous)


@pytest.mark.parametrize("B", [5, 17])  # 4 rows and fewer: the register loop, never packed
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [3, 9])  # fewer than 4 steps: not worth packing
def test_packed_step_products_equal_reference(packed_everywhere, step_products, B, dtype, T):
    for rd in (False, True):  # recurrent dropout: four plain products per step
        for backwards in (False, True):
            for mask in ("holes_and_empty", "none"):
                check_equal(make_problem("lstm", B, T, 5, 7, dtype=dtype, mask=mask, recurrent_dropout=rd,
                                         go_backwards=backwards, return_sequences=B % 2 == 1, seed=B + T))


@pytest.mark.parametrize("B, T, D, U", [(6, 30, 8, 40), (9, 12, 50, 16)])  # [x_t, h] route (D <= U), projection route
def test_packed_long_sequences_float32(packed_everywhere, step_products, B, T, D, U):
    check_equal(make_problem("lstm", B, T, D, U, dtype=torch.float32, mask="holes", go_backwards=True), tol=2e-5)


@pytest.mark.parametrize("B", [7, 8])  # a step's rows in the panels' blocks (3 rows in AVX2, 4 in AVX-512) and every remainder
@pytest.mark.parametrize("U", [5, 6, 7, 8])  # 4U columns forwards, U backwards: the last panel cut in either 8-column half
def test_step_products_of_every_block_shape_equal_reference(step_products, B, U):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # (one chunk of all B rows: the per-step products take the panels or MKL)
    try:
        check_equal(make_problem("lstm", B, 6, 9, U, dtype=torch.float32, mask="holes"), tol=2e-5)
    finally:
        torch.set_num_threads(before)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(problem_args)
def test_packed_cpp_equals_reference(packed_everywhere, args):
    check_equal(make_problem(**args), in_hypothesis=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_big_steps_on_mkl_threads_equal_reference(step_products, dtype):
    # steps too big for a thread's row chunk: MKL's threads run each step's (packed, in float32)
    # product and the rows' gate math is split over the threads
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for backwards in (False, True):
            check_equal(make_problem("lstm", 54, 6, 32, 128, dtype=dtype, mask="holes", go_backwards=backwards),
                        tol=2e-5)
    finally:
        torch.set_num_threads(before)
