"""The C++ GRU and SimpleRNN kernels (csrc/gru.cpp, csrc/simple_rnn.cpp), called through their
bindings, equal the reference kernel: outputs, final state, every gradient (against autograd
through the reference) and the trace read from the saved buffers, over the options of a plain
`Recurrence`; float64 to 1e-10, float32 to ~1e-5 (judged against the float64 reference)."""

from __future__ import annotations

import pytest
import torch

from lstm.kernels import native, reference
from test_fused_kernel import make_problem


@pytest.fixture(scope="module")
def ext():
    module = native.extension()
    if module is None:
        pytest.skip(f"the C++ kernels are not loaded: {native.unavailable_reason()}")
    return module


def _code(activation):
    return native.ACTIVATION_CODES[activation]


def _forward(ext, p, save):
    kind, x = p.cell.kind, p.inputs.detach()
    args = (x, p.kernel.detach(), p.recurrent_kernel.detach(), None if p.bias is None else p.bias.detach(),
            p.initial_state[0].detach(), p.input_dropout, p.recurrent_dropout, p.mask, None, p.go_backwards,
            p.zero_output_for_mask, p.return_sequences, _code(p.cell.activation))  # (batch_sizes None: batch-major)
    if kind == "gru":
        return ext.gru_forward(*args, _code(p.cell.recurrent_activation), p.cell.reset_after, save)
    return ext.simple_rnn_forward(*args, save)


def _backward(ext, p, saved, dy, dh_last, needs):
    bias_dim = 0 if p.bias is None else p.bias.dim()
    head = (dy, dh_last, p.inputs.detach(), p.kernel.detach(), p.recurrent_kernel.detach(), bias_dim, *saved)
    tail = (p.input_dropout, p.recurrent_dropout, p.mask, None, p.go_backwards, p.zero_output_for_mask,
            p.return_sequences, _code(p.cell.activation))
    if p.cell.kind == "gru":
        return ext.gru_backward(*head, *tail, _code(p.cell.recurrent_activation), p.cell.reset_after, needs)
    return ext.simple_rnn_backward(*head, *tail, needs)


def _trace_of_saved(p, saved):
    """The reference's trace (processing order) from the saved time-indexed buffers."""
    flip = (lambda t: t.flip(1)) if p.go_backwards else (lambda t: t)
    if p.cell.kind == "simple_rnn":
        return {"h": flip(saved[0])}
    gates, h_prev = flip(saved[0]), flip(saved[1])
    z, r, h_tilde = gates.chunk(3, dim=-1)
    return {"z": z, "r": r, "h_tilde": h_tilde, "h": z * h_prev + (1 - z) * h_tilde}


def _as_float64(p):
    """The same problem in float64 (the float32 kernel is judged against it)."""
    def up(t, leaf=True):
        return None if t is None else t.detach().double().requires_grad_(leaf)
    fields = dict(p.__dict__)
    for name in ("inputs", "kernel", "recurrent_kernel", "bias"):
        fields[name] = up(fields[name])
    for name in ("input_dropout", "recurrent_dropout"):
        fields[name] = up(fields[name], leaf=False)
    fields["initial_state"] = tuple(up(t) for t in p.initial_state)
    return type(p)(**fields)


def check(ext, p):
    p = p.masked()  # (as the kernels get it: zeros at the steps that do not count)
    tol = 1e-10 if p.inputs.dtype == torch.float64 else 1e-5
    ref_p = _as_float64(p)
    ref_p.trace = True
    result = reference.run(ref_p)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(result.outputs.shape, generator=g, dtype=torch.float64)
    dh_last = torch.randn(result.states[0].shape, generator=g, dtype=torch.float64)
    leaves = [ref_p.inputs, ref_p.kernel, ref_p.recurrent_kernel, ref_p.bias, ref_p.initial_state[0]]
    loss = (result.outputs * dy).sum() + (result.states[0] * dh_last).sum()
    wanted = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(loss, wanted, allow_unused=True))
    expected = [None if t is None else next(grads) for t in leaves]
    expected = [torch.zeros_like(t) if e is None and t is not None else e for e, t in zip(expected, leaves)]

    def close(name, got, want):
        assert got.shape == want.shape, (name, got.shape, want.shape)
        scale = 1.0 + float(want.abs().max()) if want.numel() else 1.0
        err = float((got.double() - want).abs().max()) if want.numel() else 0.0
        assert err <= tol * scale, f"{name}: max error {err:.3g} (scale {scale:.3g})"

    outs = _forward(ext, p, save=True)
    y, h_last, saved = outs[0], outs[1], outs[2:]
    close("y", y, result.outputs.detach())
    close("h_last", h_last, result.states[0].detach())
    for name, got in _trace_of_saved(p, saved).items():
        close(f"trace {name}", got, result.trace[name].detach())
    y_inference, h_inference = _forward(ext, p, save=False)
    close("y (inference)", y_inference, result.outputs.detach())
    close("h_last (inference)", h_inference, result.states[0].detach())

    dtype = p.inputs.dtype
    needs = [True, True, True, p.bias is not None, True]
    got = _backward(ext, p, saved, dy.to(dtype), dh_last.to(dtype), needs)
    for name, g_, e in zip(("dx", "dkernel", "drecurrent_kernel", "dbias", "dh0"), got, expected):
        if e is not None:
            close(name, g_, e)


KINDS = [("gru", True), ("gru", False), ("simple_rnn", True)]
OPTIONS = [
    {},
    {"mask": "holes_and_empty", "go_backwards": True, "return_sequences": False},
    {"mask": "holes", "zero_output_for_mask": True, "input_dropout": "shared", "recurrent_dropout": True},
    {"input_dropout": "per_gate", "recurrent_dropout": True, "go_backwards": True, "use_bias": False,
     "initial_state": False},
    {"mask": "holes_and_empty", "activation": "relu", "recurrent_activation": "hard_sigmoid",
     "recurrent_dropout": True, "return_sequences": False, "zero_output_for_mask": True},
    {"mask": "holes", "activation": "hard_sigmoid_tf_keras", "recurrent_activation": "tanh", "go_backwards": True,
     "input_dropout": "per_gate"},
    {"activation": "linear", "recurrent_activation": "sigmoid", "input_dropout": "shared"},
]


@pytest.mark.parametrize("kind,reset_after", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B", [1, 2, 5])  # <= 4 rows: register loops; more: BLAS; >= 2: a chunk per thread
@pytest.mark.parametrize("options", range(len(OPTIONS)))
def test_equals_reference(ext, kind, reset_after, dtype, B, options):
    check(ext, make_problem(kind, B, 7, 5, 6, dtype=dtype, seed=options, reset_after=reset_after,
                            **OPTIONS[options]))


@pytest.mark.parametrize("kind,reset_after", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_big_steps(ext, step_products, kind, reset_after, dtype):
    """Steps big enough for MKL's threads, rows split over the threads and packed weights."""
    p = make_problem(kind, 96, 4, 8, 128, dtype=dtype, mask="holes", reset_after=reset_after,
                     recurrent_dropout=kind == "simple_rnn")
    # weights of a usual initialisation's scale (make_problem's 0.5 makes 128 units ill-conditioned in float32)
    p.recurrent_kernel = (p.recurrent_kernel.detach() / 8).requires_grad_()
    check(ext, p)


@pytest.mark.parametrize("kind,reset_after", KINDS)
def test_no_steps(ext, kind, reset_after):
    check(ext, make_problem(kind, 3, 0, 4, 5, dtype=torch.float64, reset_after=reset_after))


@pytest.mark.parametrize("kind", ["gru", "simple_rnn"])
def test_only_what_is_needed(ext, kind):
    p = make_problem(kind, 3, 4, 5, 6, dtype=torch.float64)
    saved = _forward(ext, p, save=True)[2:]
    grads = _backward(ext, p, saved, None, torch.ones(3, 6, dtype=torch.float64), [True, False, False, False, True])
    assert [g is not None for g in grads] == [True, False, False, False, True]
