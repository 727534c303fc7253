"""`layer(x, reset=...)`: episode boundaries inside a sequence. Each kernel that takes resets
(the fused ones run them packed, a reset starting a row of its own) equals the reference kernel's
step-by-step restore, gradients included; a reset equals splitting the sequence by hand; resets
compose with lengths, masks, initial and stateful states, dropout and Bidirectional."""

from __future__ import annotations

import itertools

import pytest
import torch

import lstm.kernels
from lstm import layers
from marks import needs_cpp

VARIANTS = {"plain": {}, "peephole": {"peephole": True}, "layer_norm": {"layer_norm": True},
            "proj_size": {"proj_size": 3}, "coupled": {"coupled": True}}


def _taking_kernels(layer, x, **call):
    """The kernels that run this call (the reference first)."""
    names = []
    for name in lstm.kernels.available():
        with lstm.kernels.use(name):
            try:
                layer(x, **call)
            except ValueError as error:
                if "does not support" in str(error):
                    continue
                raise
        names.append(name)
    return sorted(names, key=lambda n: n != "reference")


def outputs_and_gradients(layer, x, kernel, initial_state=None, **call):
    """Outputs and the gradients of a weighted sum of them w.r.t. x, the initial states and the weights."""
    x = x.clone().requires_grad_()
    states = None if initial_state is None else [s.clone().requires_grad_() for s in initial_state]
    torch.manual_seed(7)  # (the same dropout masks for every kernel)
    with lstm.kernels.use(kernel):
        out = layer(x, initial_state=states, **call)
    outs = list(out) if isinstance(out, tuple) else [out]
    weights = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=weights, dtype=o.dtype)).sum() for o in outs)
    wrt = [x, *(states or []), *layer.parameters()]
    return [o.detach() for o in outs], torch.autograd.grad(loss, wrt, allow_unused=True)


def _assert_all_close(a, b, tol):
    for u, v in zip(a, b):
        if u is None or v is None:
            assert u is None and v is None or (u if v is None else v).abs().max() == 0
            continue
        scale = max(1.0, float(v.abs().max()))
        assert float((u - v).abs().max()) <= tol * scale




def _random_resets(B, T, seed=0, rate=0.25):
    return torch.rand(B, T, generator=torch.Generator().manual_seed(seed)) < rate


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("return_sequences, go_backwards, zero_output_for_mask",
                         list(itertools.product([True, False], [False, True], [False, True])))
def test_every_kernel_equals_the_reference(variant, return_sequences, go_backwards, zero_output_for_mask):
    torch.manual_seed(0)
    B, T, D = 6, 9, 4
    layer = layers.LSTM(5, return_sequences=return_sequences, go_backwards=go_backwards,
                        zero_output_for_mask=zero_output_for_mask, return_state=True, dtype="float64",
                        **VARIANTS[variant])
    x = torch.randn(B, T, D, dtype=torch.float64)
    layer(x[:, :1])
    reset = _random_resets(B, T)
    reset[:, 0] |= torch.tensor([True, False, False, False, False, False])  # (a reset before the first step)
    for lengths in (None, torch.tensor([9, 0, 3, 9, 5, 1])):
        call = {"reset": reset, "lengths": lengths}
        kernels = _taking_kernels(layer, x, **call)
        assert len(kernels) >= 2 or not lstm.kernels.native.extension(), kernels  # (a fused kernel runs it)
        expected = outputs_and_gradients(layer, x, "reference", **call)
        for kernel in kernels[1:]:
            got = outputs_and_gradients(layer, x, kernel, **call)
            _assert_all_close(got[0] + list(got[1]), expected[0] + list(expected[1]), 1e-10)


def test_a_reset_equals_splitting_the_sequence():
    torch.manual_seed(1)
    layer = layers.LSTM(5, return_sequences=True, return_state=True, dtype="float64")
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    h0, c0 = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[0, 4] = True
    y, h, c = layer(x, reset=reset, initial_state=[h0, c0])
    # row 0: two episodes, the second from the initial state again; row 1: one
    y1, *_ = layer(x[:1, :4], initial_state=[h0[:1], c0[:1]])
    y2, h2, c2 = layer(x[:1, 4:], initial_state=[h0[:1], c0[:1]])
    assert torch.allclose(y[:1], torch.cat([y1, y2], 1), atol=1e-12)
    assert torch.allclose(h[:1], h2, atol=1e-12) and torch.allclose(c[:1], c2, atol=1e-12)
    y_row, h_row, _ = layer(x[1:], initial_state=[h0[1:], c0[1:]])
    assert torch.allclose(y[1:], y_row, atol=1e-12) and torch.allclose(h[1:], h_row, atol=1e-12)
    # without initial_state a reset restores zeros
    y0, *_ = layer(x[:1], reset=reset[:1])
    assert torch.allclose(y0[:, 4:], layer(x[:1, 4:])[0], atol=1e-12)


def test_gradients_stop_at_a_reset_and_reach_the_initial_state_from_each_episode():
    torch.manual_seed(2)
    layer = layers.LSTM(4, return_sequences=True, dtype="float64")
    x = torch.randn(1, 8, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    reset = torch.zeros(1, 8, dtype=torch.bool)
    reset[0, 5] = True
    y = layer(x, reset=reset, initial_state=[h0, c0])
    dx, dh0 = torch.autograd.grad(y[:, 5:].sum(), [x, h0], retain_graph=True)
    assert dx[:, :5].abs().max() == 0 and dx[:, 5:].abs().max() > 0
    first, second = (torch.autograd.grad(y[:, part].sum(), h0, retain_graph=True)[0]
                     for part in (slice(0, 5), slice(5, 8)))
    assert dh0.abs().max() > 0 and torch.allclose(dh0, second)
    total = torch.autograd.grad(y.sum(), h0)[0]
    assert torch.allclose(total, first + second, atol=1e-12)


@needs_cpp
def test_resets_at_steps_that_do_not_count_are_ignored():
    torch.manual_seed(3)
    layer = layers.LSTM(4, return_sequences=True, return_state=True, dtype="float64")
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    lengths = torch.tensor([4, 6])
    padded_resets = torch.zeros(2, 6, dtype=torch.bool)
    padded_resets[0, 4:] = True  # past row 0's end
    for kernel in ("reference", "fused_cpp"):
        with lstm.kernels.use(kernel):
            with_resets = layer(x, lengths=lengths, reset=padded_resets)
            without = layer(x, lengths=lengths)
        for a, b in zip(with_resets, without):
            assert torch.equal(a, b)


@needs_cpp
def test_a_stateful_layer_continues_then_starts_a_new_episode():
    torch.manual_seed(4)
    layer = layers.LSTM(4, stateful=True, return_sequences=True, return_state=True, dtype="float64")
    whole = layers.LSTM(4, return_sequences=True, return_state=True, dtype="float64")
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    layer(x[:, :1])
    whole(x[:, :1])
    whole.set_weights(layer.get_weights())
    layer.reset_state()
    reset = torch.zeros(2, 10, dtype=torch.bool)
    reset[0, 7] = True
    expected = whole(x, reset=reset)  # one call over the whole sequence
    for kernel in ("reference", "fused_cpp"):
        layer.reset_state()
        with lstm.kernels.use(kernel):
            first = layer(x[:, :5], reset=reset[:, :5])
            second = layer(x[:, 5:], reset=reset[:, 5:])  # row 0 resets to zeros at t = 7, not to the carried state
        assert torch.allclose(torch.cat([first[0], second[0]], 1), expected[0], atol=1e-12)
        assert torch.allclose(second[1], expected[1], atol=1e-12)


@needs_cpp
def test_dropout_and_low_precision_with_resets():
    torch.manual_seed(5)
    x = torch.randn(5, 7, 3)
    reset = _random_resets(5, 7, seed=1)
    lengths = torch.tensor([7, 3, 5, 1, 6])
    for options, tol in (({"dropout": 0.3, "recurrent_dropout": 0.3}, 1e-5), ({"dtype": "mixed_bfloat16"}, 2e-2)):
        layer = layers.LSTM(4, return_sequences=True, return_state=True, **options)
        layer(x[:, :1])
        layer.train()
        kernels = _taking_kernels(layer, x, reset=reset, lengths=lengths)
        assert "fused_cpp" in kernels or "fused_variants" in kernels, kernels
        expected = outputs_and_gradients(layer, x, "reference", reset=reset, lengths=lengths)
        for kernel in kernels[1:]:
            got = outputs_and_gradients(layer, x, kernel, reset=reset, lengths=lengths)
            _assert_all_close([o.float() for o in got[0]] + [g.float() for g in got[1] if g is not None],
                              [o.float() for o in expected[0]] + [g.float() for g in expected[1] if g is not None],
                              tol)


@pytest.mark.parametrize("cell", [layers.GRU, layers.SimpleRNN])
def test_gru_and_simple_rnn_take_resets(cell):
    torch.manual_seed(6)
    layer = cell(4, return_sequences=True, return_state=True, dtype="float64")
    x = torch.randn(3, 8, 2, dtype=torch.float64)
    reset = _random_resets(3, 8, seed=2)
    lengths = torch.tensor([8, 2, 5])
    expected = outputs_and_gradients(layer, x, "reference", reset=reset, lengths=lengths)
    kernels = _taking_kernels(layer, x, reset=reset, lengths=lengths)
    if lstm.kernels.native.extension():
        assert "fused_gru_simple_rnn" in kernels, kernels
    for kernel in kernels[1:]:
        got = outputs_and_gradients(layer, x, kernel, reset=reset, lengths=lengths)
        _assert_all_close(got[0] + list(got[1]), expected[0] + list(expected[1]), 1e-10)
    # each episode equals a call of its own
    y, _ = layer(x[:1], reset=reset[:1])
    starts = [0] + [t for t in range(1, 8) if reset[0, t]] + [8]
    parts = [layer(x[:1, a:b])[0] for a, b in zip(starts, starts[1:]) if b > a]
    assert torch.allclose(y, torch.cat(parts, 1), atol=1e-12)


def test_a_mask_with_holes_and_resets_runs_on_the_reference_kernel():
    """The packed kernels need each row's counted steps first: on the CPU the reference kernel runs
    it (on a GPU the Triton kernel, which restores the states inside its loop, is checked here too)."""
    torch.manual_seed(7)
    layer = layers.LSTM(4, return_sequences=True, dtype="float64")
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    reset = _random_resets(2, 6, seed=3)
    taking = _taking_kernels(layer, x, mask=mask, reset=reset)
    assert taking[0] == "reference" and set(taking) <= {"reference", "triton_lstm"}, taking
    with lstm.kernels.use("reference"):
        expected = layer(x, mask=mask, reset=reset)
    assert torch.equal(layer(x, mask=mask, reset=reset), expected)
    for kernel in taking[1:]:
        with lstm.kernels.use(kernel):
            assert torch.allclose(layer(x, mask=mask, reset=reset), expected, atol=1e-12)


def test_bidirectional_starts_each_direction_at_the_episode_boundaries():
    torch.manual_seed(8)
    layer = layers.Bidirectional(layers.LSTM(3, return_sequences=True, dtype="float64"))
    x = torch.randn(1, 9, 2, dtype=torch.float64)
    reset = torch.zeros(1, 9, dtype=torch.bool)
    reset[0, 3] = reset[0, 7] = True
    y = layer(x, reset=reset)
    parts = [layer(x[:, a:b]) for a, b in ((0, 3), (3, 7), (7, 9))]
    assert torch.allclose(y, torch.cat(parts, 1), atol=1e-12)


def test_bad_resets_are_refused_with_the_argument_named():
    layer = layers.LSTM(3)
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match=r"reset: expected shape \(2, 4\) \[batch, timesteps\], got \(2, 5\)"):
        layer(x, reset=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="reset: expected a bool or integer tensor, got dtype torch.float32"):
        layer(x, reset=torch.zeros(2, 4))
