"""Numerical edges on every kernel: saturated pre-activations, NaN/Inf in inputs, states and weights
(the policy: README, Reliability), float64 against float32, repeatable bits, strided inputs."""

from __future__ import annotations

import math
import platform

import pytest
import torch

from conftest import TALLY
from lstm import kernels
from lstm.layers import GRU, LSTM, SimpleRNN
from marks import needs_cpp

LAYERS = {"LSTM": LSTM, "GRU": GRU, "SimpleRNN": SimpleRNN}


def run_on(kernel: str, layer, x, **kwargs):
    """layer(x) forced onto `kernel`; None when that kernel does not cover this call."""
    with kernels.use(kernel):
        try:
            return layer(x, **kwargs)
        except ValueError as error:
            if "does not support" in str(error):
                return None
            raise


def as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


def cases(kinds=LAYERS):
    return [(k, kind) for kind in kinds for k in kernels.available() if k != "fused_variants"]


# ----- saturation -------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel,kind", cases())
def test_saturated_preactivations_stay_finite(kernel, kind, dtype):
    torch.manual_seed(0)
    layer = LAYERS[kind](16, return_sequences=True, return_state=True, dtype=str(dtype).split(".")[1])
    x = (100 * torch.randn(8, 30, 5, dtype=dtype)).requires_grad_(True)
    layer(x)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(100 * torch.randn_like(p))
    assert (x @ layer.cell.kernel).abs().max() > 1e4  # |z| well past where sigmoid and tanh saturate
    result = run_on(kernel, layer, x)
    if result is None:
        pytest.skip(f"{kernel} does not cover {kind}")
    grads = torch.autograd.grad(sum(t.sum() for t in result), [x, *layer.parameters()])
    assert all(torch.isfinite(t).all() for t in (*result, *grads))
    assert result[0].abs().max() <= 1.0  # h = o * tanh(C) (LSTM), or a tanh
    with torch.no_grad():
        assert all(torch.isfinite(t).all() for t in run_on(kernel, layer, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", [k for k, _ in cases(["LSTM"])])
def test_saturated_lstm_hits_the_exact_limits(kernel, dtype):
    """z = +1e4 on every gate: i = f = o = 1 and C~ = 1, so C_t = t and h_t = tanh(t); z = -1e4:
    i = f = o = 0 and C~ = -1, so C_t = 0 and h_t = 0."""
    layer = LSTM(3, input_dim=1, return_sequences=True, dtype=str(dtype).split(".")[1], unit_forget_bias=False)
    x = torch.ones(2, 4, 1, dtype=dtype)
    with torch.no_grad():
        layer.cell.kernel.fill_(1e4)
        layer.cell.recurrent_kernel.zero_()
    up = run_on(kernel, layer, x)
    if up is None:
        pytest.skip(f"{kernel} does not cover LSTM")
    with torch.no_grad():
        layer.cell.kernel.fill_(-1e4)
    down = run_on(kernel, layer, x)
    expected = torch.tanh(torch.arange(1, 5, dtype=dtype))[None, :, None].expand(2, 4, 3)
    torch.testing.assert_close(up, expected, rtol=0, atol=1e-6)
    assert torch.equal(down, torch.zeros_like(down))


# ----- NaN / Inf --------------------------------------------------------------------------------
def _layer_and_input(kind):
    torch.manual_seed(1)
    layer = LAYERS[kind](4, return_sequences=True, return_state=True)
    x = torch.randn(3, 6, 2)
    layer(x)
    return layer, x


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("kernel,kind", cases())
def test_nonfinite_input_stays_in_its_row_from_its_step(kernel, kind, bad):
    """Policy: NaN/Inf in an input is not an error (as torch.nn.LSTM); what follows in that row is
    undefined (NaN), nothing else changes: other rows, and the row's earlier steps, are as before."""
    TALLY["bad input"] += 1
    layer, x = _layer_and_input(kind)
    clean = run_on(kernel, layer, x)
    if clean is None:
        pytest.skip(f"{kernel} does not cover {kind}")
    poisoned = x.clone()
    poisoned[1, 2, :] = bad
    out, *states = run_on(kernel, layer, poisoned)
    assert torch.equal(out[[0, 2]], clean[0][[0, 2]]) and torch.equal(out[1, :2], clean[0][1, :2])
    for state, clean_state in zip(states, clean[1:]):
        assert torch.equal(state[[0, 2]], clean_state[[0, 2]])
    if math.isnan(bad):
        assert torch.isnan(out[1, 2:]).all() and all(torch.isnan(s[1]).all() for s in states)


@pytest.mark.parametrize("kernel,kind", cases())
def test_nan_initial_state_row_and_nan_weight(kernel, kind):
    TALLY["bad input"] += 2
    layer, x = _layer_and_input(kind)
    clean = run_on(kernel, layer, x)
    if clean is None:
        pytest.skip(f"{kernel} does not cover {kind}")
    states = [torch.zeros(3, 4) for _ in clean[1:]]
    states[0][2, 1] = math.nan
    out = run_on(kernel, layer, x, initial_state=states)[0]
    assert torch.isnan(out[2]).all() and torch.equal(out[:2], clean[0][:2])
    with torch.no_grad():
        layer.cell.kernel[0, :] = math.nan  # a NaN weight that every gate reads: every row, every step
    assert torch.isnan(run_on(kernel, layer, x)[0]).all()


@pytest.mark.parametrize("kernel,kind", cases())
def test_masked_steps_ignore_nan_padding(kernel, kind):
    """Padding steps (mask False) never reach the outputs, whatever they hold."""
    TALLY["bad input"] += 1
    layer, x = _layer_and_input(kind)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    padded = x.clone()
    padded[1, 4:] = math.nan
    clean = run_on(kernel, layer, x, mask=mask)
    if clean is None:
        pytest.skip(f"{kernel} does not cover {kind}")
    assert all(torch.equal(a, b) for a, b in zip(run_on(kernel, layer, padded, mask=mask), clean))


@pytest.mark.parametrize("kernel,kind", cases())
def test_masked_nan_padding_leaves_gradients_finite(kernel, kind):
    layer, x = _layer_and_input(kind)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    x[1, 4:] = math.nan
    out = run_on(kernel, layer, x, mask=mask)
    if out is None:
        pytest.skip(f"{kernel} does not cover {kind}")
    grads = torch.autograd.grad(out[0].sum(), list(layer.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


# ----- precision and repeatability -------------------------------------------------------------
@pytest.mark.parametrize("kernel,kind", cases())
def test_float64_agrees_with_float32(kernel, kind):
    torch.manual_seed(2)
    single = LAYERS[kind](32, return_sequences=True)
    double = LAYERS[kind](32, return_sequences=True, dtype="float64")
    x = torch.randn(4, 50, 8)
    single(x)
    double(x.double())
    double.load_state_dict({k: v.double() for k, v in single.state_dict().items()})
    x32, x64 = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    y32, y64 = run_on(kernel, single, x32), run_on(kernel, double, x64)
    if y32 is None or y64 is None:
        pytest.skip(f"{kernel} does not cover {kind}")
    assert (y32.double() - y64).abs().max() < 1e-5
    (g32,), (g64,) = torch.autograd.grad(y32.sum(), [x32]), torch.autograd.grad(y64.sum(), [x64])
    assert (g32.double() - g64).abs().max() / g64.abs().max() < 1e-5


@pytest.mark.parametrize("kernel,kind", cases())
def test_same_seed_same_bits(kernel, kind):
    """Weights from torch.manual_seed, dropout masks from the layer's seed: two runs, the same bits."""

    def once():
        torch.manual_seed(3)
        layer = LAYERS[kind](16, dropout=0.3, recurrent_dropout=0.2, seed=7, return_sequences=True)
        x = torch.randn(5, 40, 6, requires_grad=True)
        layer(x[:, :1], training=True)  # build
        with kernels.use(kernel):
            try:
                out = layer(x, training=True)
            except ValueError as error:
                pytest.skip(str(error))
        return [out.detach(), *torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])]

    first, second = once(), once()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert first[0].count_nonzero() > 0


def test_dropout_masks_follow_the_global_seed_without_a_layer_seed():
    def once(seed):
        torch.manual_seed(seed)
        layer = LSTM(8, dropout=0.5, return_sequences=True)
        return layer(torch.ones(2, 5, 3), training=True)

    assert torch.equal(once(4), once(4)) and not torch.equal(once(4), once(5))


# ----- strided inputs ---------------------------------------------------------------------------
STRIDED = {
    "every other step": lambda big, B, T, D: big[:B, : 2 * T : 2, :D],
    "every other feature": lambda big, B, T, D: big[:B, :T, : 2 * D : 2],
    "every other row": lambda big, B, T, D: big[: 2 * B : 2, :T, :D],
    "time-major transposed": lambda big, B, T, D: big[:T, :B, :D].transpose(0, 1),
    "broadcast row (stride 0)": lambda big, B, T, D: big[:1, :T, :D].expand(B, T, D),
}


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("how", list(STRIDED))
@pytest.mark.parametrize("kernel,kind", cases())
def test_strided_inputs_equal_contiguous(kernel, kind, how, grad):
    TALLY["bad input"] += 1
    torch.manual_seed(4)
    B, T, D = 5, 7, 3
    layer = LAYERS[kind](6, return_sequences=True, return_state=True)
    big = torch.randn(12, 14, 8)
    strided = STRIDED[how](big, B, T, D)
    mask = (torch.rand(12, 14) > 0.3)[:2 * B:2, :T]  # strided too
    states = [torch.randn(B, 12)[:, ::2] for _ in range(layer.cell.state_count)]
    layer(strided.contiguous())
    with torch.set_grad_enabled(grad):
        got = run_on(kernel, layer, strided, mask=mask, initial_state=states)
        if got is None:
            pytest.skip(f"{kernel} does not cover {kind}")
        want = run_on(kernel, layer, strided.contiguous(), mask=mask.contiguous(),
                      initial_state=[s.contiguous() for s in states])
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    if grad:
        params = list(layer.parameters())
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got[0].sum(), params),
                                                     torch.autograd.grad(want[0].sum(), params)))


@needs_cpp
def test_fused_cpp_single_step_strided_mask():
    # (was a kernel bug: fused_cpp's no-grad path for one step and a batch of 2..4 read a strided mask as if
    # contiguous)
    torch.manual_seed(5)
    layer = LSTM(4, input_dim=2)
    x = torch.randn(3, 1, 2)
    mask = torch.tensor([[True, True, True], [False, True, True], [True, False, False]])[:, :1]  # stride (3, 1)
    with torch.no_grad(), kernels.use("fused_cpp"):
        got = layer(x, mask=mask)
    with torch.no_grad(), kernels.use("reference"):
        want = layer(x, mask=mask.contiguous())
    torch.testing.assert_close(got, want)


# ----- denormals --------------------------------------------------------------------------------
DENORMAL = torch.finfo(torch.float32).tiny  # the smallest normal float32


@needs_cpp
@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="MXCSR: x86-64 only")
@pytest.mark.parametrize("kind", list(LAYERS))
def test_vanishing_gradients_are_flushed_not_crawled_through(kind):
    """The loss on the last output of a long sequence: its gradient decays to denormal sizes on the
    way back (the reference kernel's dx has them). The C++ kernels flush denormals to zero while
    they run, as TensorFlow's threads run Keras (denormal arithmetic takes microcode assists: ~10x
    slower training here, see lstm/kernels/csrc/threads.h), changing no gradient by more than the
    summation order does; the caller's threads keep their own floating-point mode."""
    torch.manual_seed(0)
    layer = LAYERS[kind](8, **({"unit_forget_bias": False} if kind == "LSTM" else {}))
    x = torch.randn(4, 400, 3, requires_grad=True)
    layer(x)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(0.3)
    fused = "fused_cpp" if kind == "LSTM" else "fused_gru_simple_rnn"
    grads = {}
    for kernel in ("reference", fused):
        with kernels.use(kernel):
            grads[kernel] = torch.autograd.grad(layer(x).sum(), [x, *layer.parameters()])
    is_denormal = lambda g: (g.abs() < DENORMAL) & (g != 0)  # noqa: E731
    assert is_denormal(grads["reference"][0]).sum() > 100
    for want, got in zip(grads["reference"], grads[fused]):
        assert not is_denormal(got).any()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (torch.tensor(1e-39) * 1.0).item() > 0  # this thread
    assert (torch.full((1 << 20,), 1e-39) * 1.0).min().item() > 0  # torch's pool
