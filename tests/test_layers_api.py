"""The layer API (issue "foundation" §2): every Keras argument, stateful layers, masks,
Bidirectional, dropout, initializers, regularizers, constraints, PyTorch integration, configs.

Numbers are checked against a hand-written NumPy step (float64) wherever the maths matters.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lstm
from lstm import constraints, initializers, layers, regularizers
from lstm.layers import GRU, LSTM, RNN, Bidirectional, GRUCell, LSTMCell, SimpleRNN, SimpleRNNCell

GOLDEN = Path(__file__).parent / "data" / "keras_golden" / "out"
F64 = torch.float64


# ----- a NumPy reference ------------------------------------------------------------------------
def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


NP_ACT = {
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
    "relu": lambda x: np.maximum(x, 0.0),
    "linear": lambda x: x,
    "hard_sigmoid": lambda x: np.minimum(np.maximum(x + 3.0, 0.0), 6.0) / 6.0,  # Keras 3
    "hard_sigmoid_tf_keras": lambda x: np.clip(0.2 * x + 0.5, 0.0, 1.0),  # tf_keras
    "softsign": lambda x: x / (1 + np.abs(x)),
}


def np_step(kind, x, states, w, act="tanh", ract="sigmoid", reset_after=True, in_masks=None, rec_masks=None):
    """One step of Keras' cell in NumPy; in_masks [1 or G, B, D], rec_masks [G, B, U] (dropout)."""
    a, ra = NP_ACT[act], NP_ACT[ract]
    kernel, rkernel = w[0], w[1]
    bias = w[2] if len(w) > 2 else None
    U = rkernel.shape[0]
    G = kernel.shape[1] // U

    def proj(v, weight, masks):
        if masks is None:
            return v @ weight
        if masks.shape[0] == 1:
            return (v * masks[0]) @ weight
        return np.concatenate([(v * masks[g]) @ weight[:, g * U:(g + 1) * U] for g in range(G)], -1)

    if kind == "lstm":
        h, c = states
        z = proj(x, kernel, in_masks) + proj(h, rkernel, rec_masks)
        if bias is not None:
            z = z + bias
        zi, zf, zc, zo = np.split(z, 4, axis=-1)
        c = ra(zf) * c + ra(zi) * a(zc)
        h = ra(zo) * a(c)
        return h, [h, c]
    if kind == "gru":
        (h,) = states
        mx = proj(x, kernel, in_masks)
        if reset_after:
            mh = proj(h, rkernel, rec_masks)
            if bias is not None:
                mx, mh = mx + bias[0], mh + bias[1]
            xz, xr, xh = np.split(mx, 3, -1)
            hz, hr, hh = np.split(mh, 3, -1)
            z, r = ra(xz + hz), ra(xr + hr)
            cand = a(xh + r * hh)
        else:
            if bias is not None:
                mx = mx + bias
            xz, xr, xh = np.split(mx, 3, -1)
            z = ra(xz + h @ rkernel[:, :U])
            r = ra(xr + h @ rkernel[:, U:2 * U])
            cand = a(xh + (r * h) @ rkernel[:, 2 * U:])
        h = z * h + (1 - z) * cand
        return h, [h]
    (h,) = states
    z = x @ kernel + h @ rkernel + (0 if bias is None else bias)
    h = a(z)
    return h, [h]


def np_run(kind, x, w, initial=None, mask=None, go_backwards=False, zero_output_for_mask=False, **step_kw):
    """Keras' RNN loop (SPEC §5-6): outputs [B, T, U] in processing order and final states."""
    x = np.asarray(x, dtype=np.float64)
    B, T, _ = x.shape
    U = w[1].shape[0]
    n_states = 2 if kind == "lstm" else 1
    states = [np.zeros((B, U))] * n_states if initial is None else [np.asarray(s, np.float64) for s in initial]
    if go_backwards:
        x = x[:, ::-1]
        mask = None if mask is None else np.asarray(mask)[:, ::-1]
    prev = np.zeros((B, U))
    outs = []
    for t in range(T):
        out, new = np_step(kind, x[:, t], states, w, **step_kw)
        if mask is not None:
            keep = np.asarray(mask, bool)[:, t, None]
            new = [np.where(keep, n, o) for n, o in zip(new, states)]
            out = np.where(keep, out, 0.0 if zero_output_for_mask else prev)
        states, prev = new, out
        outs.append(out)
    return np.stack(outs, 1) if outs else np.zeros((B, 0, U)), states


def np_weights(layer):
    return [w.astype(np.float64) for w in layer.get_weights()]


def rand(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def randomize(layer, seed=0, scale=0.6):
    """Give a built layer random weights (bias too, so that bias bugs show)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return layer


def close(a, b, atol=1e-10):
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    b = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    np.testing.assert_allclose(a, b, rtol=0, atol=atol)


LAYER_KINDS = [(LSTM, "lstm"), (GRU, "gru"), (SimpleRNN, "simple_rnn")]
CELL_KINDS = [(LSTMCell, "lstm"), (GRUCell, "gru"), (SimpleRNNCell, "simple_rnn")]
STATES = {"lstm": 2, "gru": 1, "simple_rnn": 1}
GATES = {"lstm": 4, "gru": 3, "simple_rnn": 1}


def built(cls, units=3, D=2, seed=0, **kw):
    return randomize(cls(units, dtype="float64", input_dim=D, **kw), seed)


# ===== 1. constructor arguments ==================================================================
@pytest.mark.parametrize("cls,kind", LAYER_KINDS)
def test_default_layer_matches_numpy(cls, kind):
    layer = built(cls, return_sequences=True, return_state=True)
    x = rand(2, 5, 2, seed=1)
    out, *states = layer(x)
    ref_out, ref_states = np_run(kind, x.numpy(), np_weights(layer))
    close(out, ref_out)
    assert len(states) == STATES[kind]
    for s, r in zip(states, ref_states):
        close(s, r)


@pytest.mark.parametrize("cls,kind", LAYER_KINDS)
def test_use_bias_false(cls, kind):
    layer = built(cls, use_bias=False, return_sequences=True)
    assert layer.cell.bias is None
    assert len(layer.get_weights()) == 2
    assert not any(k.endswith("bias") for k in layer.state_dict())
    assert len(list(layer.parameters())) == 2
    x = rand(2, 4, 2, seed=2)
    close(layer(x), np_run(kind, x.numpy(), np_weights(layer))[0])


@pytest.mark.parametrize("act,ract", [("relu", "hard_sigmoid"), ("softsign", "tanh"), (None, "sigmoid"),
                                      ("linear", "relu")])
def test_lstm_activations_by_name(act, ract):
    layer = built(LSTM, activation=act, recurrent_activation=ract, return_sequences=True, return_state=True)
    x = rand(3, 4, 2, seed=3) * 2
    out, h, c = layer(x)
    ref, (rh, rc) = np_run("lstm", x.numpy(), np_weights(layer), act=act or "linear", ract=ract)
    close(out, ref)
    close(h, rh)
    close(c, rc)
    default = LSTM(3, dtype="float64", input_dim=2, return_sequences=True)
    default.set_weights(layer.get_weights())
    assert not torch.allclose(default(x), out), "the activations change the outputs"


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_activations_and_reset_after(reset_after):
    layer = built(GRU, activation="relu", recurrent_activation="hard_sigmoid", reset_after=reset_after,
                  return_sequences=True)
    assert layer.cell.bias.shape == ((2, 9) if reset_after else (9,))
    x = rand(2, 5, 2, seed=4)
    close(layer(x), np_run("gru", x.numpy(), np_weights(layer), act="relu", ract="hard_sigmoid",
                           reset_after=reset_after)[0])


def test_simple_rnn_activation():
    layer = built(SimpleRNN, activation="relu", return_sequences=True)
    x = rand(2, 5, 2, seed=5)
    close(layer(x), np_run("simple_rnn", x.numpy(), np_weights(layer), act="relu")[0])


@pytest.mark.parametrize("cls,kind", LAYER_KINDS)
def test_return_sequences_and_state_shapes(cls, kind):
    x = rand(4, 6, 2, seed=6)
    last = built(cls, units=5)(x)
    assert last.shape == (4, 5)
    layer = built(cls, units=5, return_sequences=True, return_state=True)
    result = layer(x)
    assert isinstance(result, tuple) and len(result) == 1 + STATES[kind]
    seq, h, *rest = result
    assert seq.shape == (4, 6, 5) and h.shape == (4, 5)
    close(seq[:, -1], h)
    close(last, h)
    only_state = built(cls, units=5, return_state=True)(x)
    assert len(only_state) == 1 + STATES[kind]
    close(only_state[0], h)
    if kind == "lstm":
        assert rest[0].shape == (4, 5)
        close(only_state[2], rest[0])


@pytest.mark.parametrize("cls,kind", LAYER_KINDS)
def test_go_backwards_equals_forward_on_reversed_inputs(cls, kind):
    x = rand(3, 5, 2, seed=7)
    back = built(cls, go_backwards=True, return_sequences=True, return_state=True)
    fwd = cls(3, dtype="float64", input_dim=2, return_sequences=True, return_state=True)
    fwd.set_weights(back.get_weights())
    out_b, *states_b = back(x)
    out_f, *states_f = fwd(x.flip(1))
    close(out_b, out_f)  # processing order: not reversed back
    for a, b in zip(states_b, states_f):
        close(a, b)
    last = built(cls, go_backwards=True)
    last.set_weights(back.get_weights())
    close(last(x), out_f[:, -1])
    # and it really differs from a forward run
    assert not torch.allclose(out_b, fwd(x)[0])


@pytest.mark.parametrize("cls,kind", LAYER_KINDS)
def test_unroll_same_numbers(cls, kind):
    x = rand(2, 5, 2, seed=8)
    a = built(cls, return_sequences=True)
    b = cls(3, unroll=True, dtype="float64", input_dim=2, return_sequences=True)
    b.set_weights(a.get_weights())
    assert b.unroll and b.get_config()["unroll"] is True
    assert torch.equal(a(x), b(x))


def test_implementation_1_equals_2():
    x = rand(2, 5, 2, seed=9)
    for cls in (LSTM, GRU):
        a = built(cls, implementation=2, return_sequences=True)
        b = cls(3, implementation=1, dtype="float64", input_dim=2, return_sequences=True)
        b.set_weights(a.get_weights())
        assert b.cell.implementation == 1
        close(a(x), b(x), atol=1e-12)


@pytest.mark.parametrize("cls", [LSTM, GRU, SimpleRNN, LSTMCell, GRUCell, SimpleRNNCell])
def test_trainable_false_freezes(cls):
    module = cls(3, trainable=False, input_dim=2)
    params = list(module.parameters())
    assert params and all(not p.requires_grad for p in params)
    assert module.get_config()["trainable"] is False
    lazy = cls(3, trainable=False)
    x = torch.randn(2, 4, 2) if not issubclass(cls, layers.RecurrentCell) else torch.randn(2, 2)
    lazy(x)
    assert all(not p.requires_grad for p in lazy.parameters())
    assert all(p.requires_grad for p in cls(3, input_dim=2).parameters())
    copy = cls.from_config(module.get_config())
    copy.build(2)
    assert all(not p.requires_grad for p in copy.parameters())


def test_trainable_false_freezes_wrappers():
    rnn = RNN(LSTMCell(3, input_dim=2), trainable=False)
    assert all(not p.requires_grad for p in rnn.parameters())
    bidi = Bidirectional(LSTM(3), trainable=False, input_shape=(None, None, 2))
    assert len(list(bidi.parameters())) == 6 and all(not p.requires_grad for p in bidi.parameters())
    lazy = Bidirectional(GRU(3), trainable=False)
    lazy(torch.randn(2, 3, 2))
    assert all(not p.requires_grad for p in lazy.parameters())
    assert Bidirectional.from_config(bidi.get_config()).get_config()["trainable"] is False


@pytest.mark.parametrize("cls,kind", LAYER_KINDS)
def test_dtype_float64(cls, kind):
    layer = cls(3, dtype="float64", input_dim=2, return_state=True)
    assert all(p.dtype == F64 for p in layer.parameters())
    out, *states = layer(torch.randn(2, 4, 2, dtype=F64))
    assert out.dtype == F64 and all(s.dtype == F64 for s in states)
    assert layer.get_config()["dtype"] == "float64"
    assert all(p.dtype == torch.float32 for p in cls(3, input_dim=2).parameters())


@pytest.mark.parametrize("cls,kind", LAYER_KINDS)
def test_eager_and_lazy_build(cls, kind):
    G = GATES[kind]
    eager = cls(4, input_dim=3)
    assert eager.built and eager.cell.kernel.shape == (3, G * 4)
    assert eager.cell.recurrent_kernel.shape == (4, G * 4)
    shaped = cls(4, input_shape=(7, 3))
    assert shaped.built and shaped.cell.kernel.shape == (3, G * 4)
    lazy = cls(4)
    assert not lazy.built and list(lazy.parameters()) == [] and lazy.get_weights() == []
    out = lazy(torch.randn(2, 5, 3))
    assert lazy.built and lazy.cell.kernel.shape == (3, G * 4) and out.shape == (2, 4)
    later = cls(4)
    later.build((None, 5, 3))
    assert later.built and later.cell.kernel.shape == (3, G * 4)
    cell = eager.cell_class(4)
    cell.build(3)
    assert cell.kernel.shape == (3, G * 4)


@pytest.mark.parametrize("cls,kind", CELL_KINDS)
def test_cell_step_matches_numpy(cls, kind):
    cell = randomize(cls(3, dtype="float64", input_dim=2), seed=10)
    x = rand(2, 2, seed=11)
    states = [rand(2, 3, seed=12 + k) for k in range(STATES[kind])]
    out, new = cell(x, states)
    ref, ref_new = np_step(kind, x.numpy(), [s.numpy() for s in states], np_weights(cell))
    close(out, ref)
    assert isinstance(new, list) and len(new) == STATES[kind]
    for a, b in zip(new, ref_new):
        close(a, b)
    zero_out, _ = cell(x)  # states=None means zeros
    close(zero_out, np_step(kind, x.numpy(), [np.zeros((2, 3))] * STATES[kind], np_weights(cell))[0])


def test_rnn_wrapper_of_a_cell_equals_layer():
    cell = LSTMCell(3, dtype="float64", input_dim=2)
    rnn = RNN(cell, return_sequences=True)
    layer = LSTM(3, dtype="float64", input_dim=2, return_sequences=True)
    layer.set_weights(randomize(cell, 13).get_weights())
    x = rand(2, 4, 2, seed=14)
    close(rnn(x), layer(x))


def test_layer_exposes_cell_options():
    layer = LSTM(5, dropout=0.25, recurrent_dropout=0.1, unit_forget_bias=False)
    assert layer.units == 5 and layer.dropout == 0.25 and layer.recurrent_dropout == 0.1
    assert layer.unit_forget_bias is False and layer.implementation == 1


# ===== stateful ==================================================================================
@pytest.mark.parametrize("cls,kind", LAYER_KINDS)
def test_stateful_split_calls_equal_one_call(cls, kind):
    x = rand(2, 6, 2, seed=15)
    one = built(cls, return_sequences=True, return_state=True)
    two = cls(3, stateful=True, dtype="float64", input_dim=2, return_sequences=True, return_state=True)
    two.set_weights(one.get_weights())
    full, *full_states = one(x)
    a, *_ = two(x[:, :4])
    b, *states = two(x[:, 4:])
    close(torch.cat([a, b], 1), full, atol=1e-12)
    for s, r in zip(states, full_states):
        close(s, r, atol=1e-12)
    for s, r in zip(two.states, full_states):
        close(s, r, atol=1e-12)
    # reset_state restarts from zeros
    two.reset_state()
    again, *_ = two(x[:, :4])
    close(again, a)
    two.reset_states()
    assert two.states is None


def test_stateful_batch_change_needs_reset():
    layer = LSTM(3, stateful=True, input_dim=2)
    layer(torch.randn(2, 3, 2))
    with pytest.raises(ValueError, match=r"batch size 2.*batch size 5"):
        layer(torch.randn(5, 3, 2))
    layer.reset_state()
    assert layer(torch.randn(5, 3, 2)).shape == (5, 3)


def test_stateful_reset_to_given_states_and_no_gradient_across_calls():
    layer = built(LSTM, stateful=True, return_state=True)
    h0, c0 = rand(2, 3, seed=16), rand(2, 3, seed=17)
    layer.reset_state([h0, c0])
    x = rand(2, 3, 2, seed=18)
    ref_out, ref_states = np_run("lstm", x.numpy(), np_weights(layer), initial=[h0.numpy(), c0.numpy()])
    out, h, c = layer(x)
    close(out, ref_out[:, -1])
    assert not layer.states[0].requires_grad  # carried states are detached


def test_reset_state_of_a_non_stateful_layer():
    with pytest.raises(ValueError, match="not stateful"):
        LSTM(3).reset_state()


# ===== masks =====================================================================================
MASK = torch.tensor([[1, 1, 0, 1, 0, 1],   # holes
                     [0, 0, 0, 0, 0, 0],   # fully masked
                     [0, 0, 1, 1, 1, 1],   # leading masked
                     [1, 1, 1, 1, 0, 0]],  # right padded
                    dtype=torch.bool)


@pytest.mark.parametrize("cls,kind", LAYER_KINDS)
@pytest.mark.parametrize("zero_output", [False, True])
def test_mask_matches_keras_rules(cls, kind, zero_output):
    layer = built(cls, return_sequences=True, return_state=True, zero_output_for_mask=zero_output)
    x = rand(4, 6, 2, seed=19)
    initial = [rand(4, 3, seed=20 + k) for k in range(STATES[kind])]
    out, *states = layer(x, mask=MASK, initial_state=initial)
    ref, ref_states = np_run(kind, x.numpy(), np_weights(layer), initial=[s.numpy() for s in initial],
                             mask=MASK.numpy(), zero_output_for_mask=zero_output)
    close(out, ref)
    for s, r in zip(states, ref_states):
        close(s, r)
    # fully masked row: outputs 0, final states are the initial ones
    assert torch.all(out[1] == 0)
    for s, s0 in zip(states, initial):
        assert torch.equal(s[1], s0[1])
    # leading masked steps output 0 even with a nonzero initial state
    assert torch.all(out[2, :2] == 0) and initial[0][2].abs().sum() > 0
    last = cls(3, dtype="float64", input_dim=2, zero_output_for_mask=zero_output)
    last.set_weights(layer.get_weights())
    expected_last = ref[:, -1]
    close(last(x, mask=MASK, initial_state=initial), expected_last)
    assert torch.all(last(x, mask=MASK)[1] == 0)


def test_masked_row_output_differs_from_state():
    layer = built(LSTM, return_state=True)
    h0, c0 = rand(1, 3, seed=21), rand(1, 3, seed=22)
    out, h, c = layer(rand(1, 3, 2, seed=23), mask=torch.zeros(1, 3, dtype=torch.bool), initial_state=[h0, c0])
    assert torch.all(out == 0)
    assert torch.equal(h, h0) and torch.equal(c, c0)


@pytest.mark.parametrize("cls,kind", LAYER_KINDS)
def test_input_gradient_zero_at_masked_steps(cls, kind):
    layer = built(cls, return_sequences=True, return_state=True)
    x = rand(4, 6, 2, seed=24).requires_grad_()
    out, *states = layer(x, mask=MASK)
    (out.square().sum() + sum(s.sum() for s in states)).backward()
    assert torch.all(x.grad[~MASK] == 0)
    assert torch.all(x.grad[MASK].abs().sum(-1) > 0)


@pytest.mark.parametrize("cls,kind", LAYER_KINDS)
def test_go_backwards_with_mask(cls, kind):
    x = rand(4, 6, 2, seed=25)
    back = built(cls, go_backwards=True, return_sequences=True, return_state=True)
    fwd = cls(3, dtype="float64", input_dim=2, return_sequences=True, return_state=True)
    fwd.set_weights(back.get_weights())
    out_b, *sb = back(x, mask=MASK)
    out_f, *sf = fwd(x.flip(1), mask=MASK.flip(1))
    close(out_b, out_f)
    for a, b in zip(sb, sf):
        close(a, b)


def test_int_mask_equals_bool_mask():
    layer = built(LSTM, return_sequences=True)
    x = rand(4, 6, 2, seed=26)
    expected = layer(x, mask=MASK)
    close(layer(x, mask=MASK.to(torch.int64)), expected, atol=0)
    close(layer(x, mask=MASK.to(torch.int32).numpy()), expected, atol=0)
    assert layer.compute_mask(x, MASK) is MASK
    assert built(LSTM).compute_mask(x, MASK) is None


# ===== Bidirectional =============================================================================
def _bidi(merge_mode="concat", return_state=False, cls=LSTM, **kw):
    model = Bidirectional(cls(3, dtype="float64", return_sequences=True, return_state=return_state, **kw),
                          merge_mode=merge_mode, input_shape=(None, 6, 2))
    randomize(model, seed=27)
    return model


def _halves(model, x, mask=None, initial=None):
    """The forward and backward results, from NumPy, with the backward output flipped back."""
    wf = np_weights(model.forward_layer)
    wb = np_weights(model.backward_layer)
    n = len(initial) // 2 if initial else 0
    i_f = None if not initial else [s.numpy() for s in initial[:n]]
    i_b = None if not initial else [s.numpy() for s in initial[n:]]
    m = None if mask is None else mask.numpy()
    kind = model.forward_layer.cell.kind
    zero = model.return_sequences
    yf, sf = np_run(kind, x.numpy(), wf, initial=i_f, mask=m, zero_output_for_mask=zero)
    yb, sb = np_run(kind, x.numpy(), wb, initial=i_b, mask=m, go_backwards=True, zero_output_for_mask=zero)
    return yf, yb[:, ::-1], sf, sb


@pytest.mark.parametrize("merge_mode", ["concat", "sum", "ave", "mul", None])
def test_bidirectional_merge_modes_with_mask(merge_mode):
    model = _bidi(merge_mode)
    x = rand(4, 6, 2, seed=28)
    yf, yb, _, _ = _halves(model, x, MASK)
    expected = {"concat": np.concatenate([yf, yb], -1), "sum": yf + yb, "ave": (yf + yb) / 2, "mul": yf * yb}
    out = model(x, mask=MASK)
    if merge_mode is None:
        assert isinstance(out, tuple) and len(out) == 2
        close(out[0], yf)
        close(out[1], yb)
        out = torch.cat(out, -1)
        merged = np.concatenate([yf, yb], -1)
    else:
        merged = expected[merge_mode]
        close(out, merged)
    # masked steps output 0 with return_sequences (SPEC §10)
    assert torch.all(out[~MASK] == 0)
    assert out.shape[-1] == (6 if merge_mode in ("concat", None) else 3)


def test_bidirectional_return_state_and_initial_state():
    model = _bidi("concat", return_state=True)
    x = rand(4, 6, 2, seed=29)
    initial = [rand(4, 3, seed=30 + k) for k in range(4)]
    result = model(x, mask=MASK, initial_state=initial)
    assert len(result) == 5
    out, h_f, c_f, h_b, c_b = result
    yf, yb, sf, sb = _halves(model, x, MASK, initial)
    close(out, np.concatenate([yf, yb], -1))
    for ours, ref in zip((h_f, c_f, h_b, c_b), sf + sb):
        close(ours, ref)
    none = _bidi(None, return_state=True)
    assert len(none(x)) == 6


def test_bidirectional_gru_last_output_and_weight_order():
    model = Bidirectional(GRU(3, dtype="float64"), input_shape=(None, 5, 2))
    randomize(model, seed=31)
    x = rand(2, 5, 2, seed=32)
    w = model.get_weights()
    assert len(w) == 6
    for a, b in zip(w, model.forward_layer.get_weights() + model.backward_layer.get_weights()):
        assert np.array_equal(a, b)
    assert [tuple(a.shape) for a in w] == [(2, 9), (3, 9), (2, 9)] * 2
    yf = np_run("gru", x.numpy(), w[:3])[0][:, -1]
    yb = np_run("gru", x.numpy(), w[3:], go_backwards=True)[0][:, -1]
    close(model(x), np.concatenate([yf, yb], -1))
    other = Bidirectional(GRU(3, dtype="float64"), input_shape=(None, 5, 2))
    other.set_weights(w)
    close(other(x), model(x))
    assert model.forward_layer.name.startswith("forward_") and model.backward_layer.name.startswith("backward_")
    assert model.backward_layer.go_backwards and not model.forward_layer.go_backwards
    # fresh, independent weights for the two directions
    fresh = Bidirectional(LSTM(3), input_shape=(None, 5, 2))
    assert not np.array_equal(fresh.get_weights()[0], fresh.get_weights()[3])


# ===== dropout ===================================================================================
@pytest.fixture
def captured(monkeypatch):
    problems = []
    original = lstm.kernels.run

    def spy(problem):
        problems.append(problem)
        return original(problem)

    monkeypatch.setattr(lstm.kernels, "run", spy)
    return problems


@pytest.mark.parametrize("cls", [LSTM, GRU, SimpleRNN])
def test_dropout_is_off_at_inference(cls):
    plain = built(cls, return_sequences=True)
    drop = cls(3, dropout=0.5, recurrent_dropout=0.3, dtype="float64", input_dim=2, return_sequences=True)
    drop.set_weights(plain.get_weights())
    x = rand(3, 5, 2, seed=33)
    expected = plain(x)
    close(drop(x, training=False), expected, atol=1e-12)
    drop.eval()
    close(drop(x), expected, atol=1e-12)
    drop.train()
    assert not torch.allclose(drop(x), expected)  # training follows module.training
    assert not torch.allclose(drop(x, training=True), expected)


@pytest.mark.parametrize("implementation", [1, 2])
def test_lstm_input_dropout_masks_are_variational(captured, implementation):
    B, T, D, U, rate = 4, 5, 6, 3, 0.4
    layer = built(LSTM, units=U, D=D, dropout=rate, implementation=implementation, return_sequences=True,
                  seed=1)
    x = rand(B, T, D, seed=34)
    out = layer(x, training=True)
    (problem,) = captured
    masks = problem.input_dropout
    assert problem.recurrent_dropout is None
    assert tuple(masks.shape) == ((1 if implementation == 2 else 4), B, D)
    values = set(np.unique(masks.numpy()).round(12))
    assert values <= {0.0, round(1 / (1 - rate), 12)} and len(values) == 2
    # the same mask at every step: NumPy with the captured masks reproduces the output
    w = np_weights(layer)
    states = [np.zeros((B, U))] * 2
    ref = []
    for t in range(T):
        h, states = np_step("lstm", x[:, t].numpy(), states, w, in_masks=masks.numpy())
        ref.append(h)
    close(out, np.stack(ref, 1))


@pytest.mark.parametrize("cls,kind", LAYER_KINDS)
def test_recurrent_dropout_masks(captured, cls, kind):
    B, T, D, U = 3, 4, 2, 5
    extra = {} if kind == "simple_rnn" else {"implementation": 2}
    layer = built(cls, units=U, D=D, dropout=0.3, recurrent_dropout=0.5, return_sequences=True, **extra)
    G = GATES[kind]
    if kind != "simple_rnn":
        assert layer.cell.implementation == 1  # recurrent_dropout forces implementation 1
    x = rand(B, T, D, seed=35)
    out = layer(x, training=True)
    (problem,) = captured
    assert tuple(problem.recurrent_dropout.shape) == (G, B, U)
    assert tuple(problem.input_dropout.shape) == ((G if kind != "simple_rnn" else 1), B, D)
    assert set(np.unique(problem.recurrent_dropout.numpy()).round(12)) <= {0.0, 2.0}
    if kind == "lstm":
        w = np_weights(layer)
        states = [np.zeros((B, U))] * 2
        ref = []
        for t in range(T):
            h, states = np_step("lstm", x[:, t].numpy(), states, w, in_masks=problem.input_dropout.numpy(),
                                rec_masks=problem.recurrent_dropout.numpy())
            ref.append(h)
        close(out, np.stack(ref, 1))


def test_dropout_identity_weights_show_one_mask_per_call():
    """SimpleRNN with kernel = I, recurrent = 0, linear: output_t = x_t * mask, so every step's
    keep pattern is visible and must be the same."""
    D = 8
    layer = SimpleRNN(D, activation="linear", use_bias=False, dropout=0.5, input_dim=D, return_sequences=True,
                      kernel_initializer="identity", recurrent_initializer="zeros", seed=3)
    x = torch.ones(4, 6, D)
    out = layer(x, training=True)
    assert set(out.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(out, out[:, :1].expand_as(out))
    assert 0 < (out == 0).float().mean() < 1
    second = layer(x, training=True)  # a new call draws a new mask
    assert not torch.equal(second, out)


def test_dropout_seed_reproducible():
    def make(seed):
        layer = LSTM(4, dropout=0.5, recurrent_dropout=0.5, seed=seed, dtype="float64", input_dim=3,
                     return_sequences=True)
        return randomize(layer, seed=36)

    x = rand(3, 5, 3, seed=37)
    a, b, c = make(7)(x, training=True), make(7)(x, training=True), make(8)(x, training=True)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_cell_call_reuses_dropout_mask_until_reset():
    cell = LSTMCell(4, dropout=0.5, recurrent_dropout=0.5, input_dim=16, seed=2)
    x = torch.randn(4, 16)
    state = [torch.randn(4, 4), torch.randn(4, 4)]
    a, _ = cell(x, state, training=True)
    b, _ = cell(x, state, training=True)
    assert torch.equal(a, b)
    cell.reset_dropout_mask()
    c, _ = cell(x, state, training=True)
    assert not torch.equal(a, c)
    d, _ = cell(x, state, training=False)
    e, _ = LSTMCell.from_config({**cell.get_config(), "dropout": 0.0, "recurrent_dropout": 0.0}), None
    e.set_weights(cell.get_weights())
    close(d, e(x, state)[0], atol=0)


# ===== initializers ==============================================================================
def test_glorot_uniform_uses_fans_of_the_whole_matrix():
    D, U = 20, 32
    cell = LSTMCell(U, input_dim=D, dtype="float64")
    k = cell.kernel.detach().numpy()
    limit = math.sqrt(6 / (D + 4 * U))
    assert np.abs(k).max() <= limit
    assert np.abs(k).max() > 0.98 * limit  # per-gate fans would give sqrt(6/(D+U)) = 0.36
    assert abs(k.std() - limit / math.sqrt(3)) < 0.05 * limit


def test_orthogonal_over_the_whole_recurrent_matrix():
    U = 6
    cell = LSTMCell(U, input_dim=3, dtype="float64")
    r = cell.recurrent_kernel.detach().numpy()
    assert r.shape == (U, 4 * U)
    np.testing.assert_allclose(r @ r.T, np.eye(U), atol=1e-5)
    block = r[:, U:2 * U]
    assert np.abs(block @ block.T - np.eye(U)).max() > 0.1
    square = SimpleRNNCell(U, input_dim=3, dtype="float64").recurrent_kernel.detach().numpy()
    np.testing.assert_allclose(square.T @ square, np.eye(U), atol=1e-10)
    gain = initializers.Orthogonal(gain=2.0, seed=1)((3, 12), torch.float64).numpy()
    np.testing.assert_allclose(gain @ gain.T, 4 * np.eye(3), atol=1e-10)


def test_unit_forget_bias():
    cell = LSTMCell(2, input_dim=3, bias_initializer=initializers.Constant(0.5))
    assert cell.bias.tolist() == [0.5, 0.5, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    plain = LSTMCell(2, input_dim=3, unit_forget_bias=False)
    assert plain.bias.tolist() == [0.0] * 8
    default = LSTMCell(3, input_dim=3)
    assert default.bias.tolist() == [0.0] * 3 + [1.0] * 3 + [0.0] * 6
    assert GRUCell(2, input_dim=3).bias.tolist() == [[0.0] * 6] * 2
    constant = LSTMCell(2, input_dim=3, bias_initializer="ones", unit_forget_bias=False)
    assert constant.bias.tolist() == [1.0] * 8


@pytest.mark.parametrize("identifier", [
    "random_uniform", "RandomUniform", {"class_name": "RandomUniform", "config": {"minval": -0.05, "maxval": 0.05}},
    {"module": "keras.initializers", "class_name": "RandomUniform",
     "config": {"minval": -0.05, "maxval": 0.05, "seed": None}, "registered_name": None},
    initializers.RandomUniform(),
])
def test_initializer_identifiers(identifier):
    cell = LSTMCell(8, input_dim=10, kernel_initializer=identifier)
    assert type(cell.kernel_initializer).__name__ == "RandomUniform"
    k = cell.kernel.detach()
    assert k.abs().max() <= 0.05 and k.abs().max() > 0.04


def test_keras3_initializer_dicts_with_axes():
    glorot = {"module": "keras.initializers", "class_name": "GlorotUniform",
              "config": {"seed": 5, "input_axes": None, "output_axes": None}, "registered_name": None}
    ortho = {"module": "keras.initializers", "class_name": "Orthogonal", "config": {"seed": 6, "gain": 1.0},
             "registered_name": None}
    a = LSTMCell(3, input_dim=2, kernel_initializer=glorot, recurrent_initializer=ortho)
    b = LSTMCell(3, input_dim=2, kernel_initializer=initializers.GlorotUniform(seed=5),
                 recurrent_initializer=initializers.Orthogonal(seed=6))
    for x, y in zip(a.get_weights(), b.get_weights()):
        assert np.array_equal(x, y)
    assert a.get_config()["kernel_initializer"] == {"class_name": "GlorotUniform", "config": {"seed": 5}}


@pytest.mark.parametrize("name", ["glorot_uniform", "glorot_normal", "he_uniform", "he_normal",
                                  "lecun_uniform", "lecun_normal", "orthogonal", "random_normal",
                                  "truncated_normal", "variance_scaling"])
def test_seeded_initializers_reproducible(name):
    init = initializers.get({"class_name": name, "config": {"seed": 42}})
    a, b = init((5, 12)), init((5, 12))
    assert torch.equal(a, b) and a.abs().sum() > 0
    other = initializers.get({"class_name": name, "config": {"seed": 43}})((5, 12))
    assert not torch.equal(a, other)


def test_truncated_and_scaled_initializer_ranges():
    t = initializers.TruncatedNormal(stddev=0.1, seed=1)((200, 200))
    assert t.abs().max() <= 0.2 + 1e-6
    he = initializers.HeUniform(seed=1)((50, 40))
    assert he.abs().max() <= math.sqrt(6 / 50) and he.abs().max() > 0.95 * math.sqrt(6 / 50)


# ===== regularizers ==============================================================================
def test_weight_penalties_in_losses():
    layer = built(LSTM, kernel_regularizer=regularizers.L2(0.1), recurrent_regularizer="l1",
                  bias_regularizer=regularizers.L1L2(l1=0.2, l2=0.3))
    k, r, b = (p.detach().clone() for p in (layer.cell.kernel, layer.cell.recurrent_kernel, layer.cell.bias))
    losses = layer.losses
    assert len(losses) == 3
    close(losses[0], 0.1 * k.square().sum())
    close(losses[1], 0.01 * r.abs().sum())
    close(losses[2], 0.2 * b.abs().sum() + 0.3 * b.square().sum())
    with torch.no_grad():
        layer.cell.kernel.mul_(2)
    close(layer.losses[0], 0.4 * k.square().sum())  # recomputed from the current weights


def test_activity_regularizer_every_returned_tensor():
    layer = built(LSTM, activity_regularizer=regularizers.L2(0.5), return_state=True,
                  kernel_regularizer=regularizers.L2(0.1))
    x = rand(4, 3, 2, seed=38)
    out, h, c = layer(x)
    assert len(layer.activity_losses) == 3
    for loss, t in zip(layer.activity_losses, (out, h, c)):
        close(loss, 0.5 * t.square().sum() / 4)
    assert len(layer.losses) == 4
    seq = built(GRU, activity_regularizer="l1", return_sequences=True)
    y = seq(x)
    (loss,) = seq.losses
    close(loss, 0.01 * y.abs().sum() / 4)


def test_regularization_loss_no_double_counting_and_differentiable():
    class Last(nn.Module):
        def forward(self, x):
            return x[:, -1]

    rnn = built(LSTM, units=3, kernel_regularizer=regularizers.L2(0.1), activity_regularizer=regularizers.L2(0.2),
                return_sequences=True)
    bidi = Bidirectional(GRU(2, dtype="float64", recurrent_regularizer=regularizers.L1(0.05)),
                         input_shape=(None, None, 3))
    model = nn.Sequential(rnn, bidi, nn.Linear(4, 1).double())
    x = rand(2, 4, 2, seed=39)
    model(x)
    total = lstm.regularization_loss(model)
    expected = (0.1 * rnn.cell.kernel.square().sum() + rnn.activity_losses[0]
                + 0.05 * bidi.forward_layer.cell.recurrent_kernel.abs().sum()
                + 0.05 * bidi.backward_layer.cell.recurrent_kernel.abs().sum())
    close(total, expected)
    close(sum(rnn.losses) + sum(bidi.losses), expected)
    model.zero_grad()
    lstm.regularization_loss(nn.Sequential(built(LSTM)))  # no regularizer: 0
    assert lstm.regularization_loss(nn.Sequential(built(LSTM))) == 0
    reg_only = built(LSTM, kernel_regularizer=regularizers.L2(0.1))
    lstm.regularization_loss(reg_only).backward()
    close(reg_only.cell.kernel.grad, 0.2 * reg_only.cell.kernel.detach())
    assert reg_only.cell.recurrent_kernel.grad is None


def test_regularizer_configs():
    keras3 = {"module": "keras.regularizers", "class_name": "L1L2", "config": {"l1": 0.0, "l2": 0.25},
              "registered_name": None}
    layer = LSTM(2, kernel_regularizer=keras3, input_dim=2)
    assert isinstance(layer.cell.kernel_regularizer, regularizers.L1L2)
    close(layer.losses[0], 0.25 * layer.cell.kernel.detach().square().sum(), atol=1e-6)
    assert layer.get_config()["kernel_regularizer"] == {"class_name": "L1L2", "config": {"l1": 0.0, "l2": 0.25}}


# ===== constraints ===============================================================================
def _step(layer, x, lr=0.5):
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    out = layer(x)
    (out.sum() * 10).backward()
    opt.step()


def test_constraints_not_applied_at_init_or_forward():
    layer = LSTM(4, kernel_constraint="non_neg", recurrent_constraint=constraints.NonNeg(), input_dim=3)
    layer(torch.randn(2, 3, 3))
    assert (layer.cell.kernel < 0).any() and (layer.cell.recurrent_kernel < 0).any()


def test_apply_constraints_projects():
    torch.manual_seed(0)
    layer = LSTM(4, input_dim=3, kernel_constraint="non_neg", recurrent_constraint=constraints.MaxNorm(0.5),
                 bias_constraint=constraints.UnitNorm())
    other = GRU(3, input_dim=3, kernel_constraint=constraints.MinMaxNorm(0.5, 1.0))
    model = nn.ModuleList([layer, other])
    x = torch.randn(2, 3, 3)
    _step(layer, x)
    _step(other, x)
    assert (layer.cell.kernel < 0).any()
    lstm.apply_constraints(model)
    assert (layer.cell.kernel >= 0).all()
    norms = layer.cell.recurrent_kernel.detach().norm(dim=0)
    assert (norms <= 0.5 + 1e-5).all() and (norms > 0.45).any()
    assert abs(float(layer.cell.bias.detach().norm()) - 1) < 1e-5
    gnorms = other.cell.kernel.detach().norm(dim=0)
    assert (gnorms >= 0.5 - 1e-5).all() and (gnorms <= 1 + 1e-5).all()
    assert other.cell.recurrent_kernel.requires_grad  # still a parameter


def test_apply_constraints_inside_bidirectional():
    model = nn.Sequential(Bidirectional(LSTM(3, kernel_constraint="non_neg"), input_shape=(None, None, 2)))
    lstm.apply_constraints(model)
    assert (model[0].forward_layer.cell.kernel >= 0).all() and (model[0].backward_layer.cell.kernel >= 0).all()


# ===== PyTorch integration =======================================================================
class LastOutput(nn.Module):
    def forward(self, x):
        return x[:, -1]


def test_in_nn_sequential_trains():
    torch.manual_seed(0)
    model = nn.Sequential(LSTM(8, return_sequences=True, input_dim=3), GRU(4, return_sequences=True),
                          LastOutput(), nn.Linear(4, 1))
    x, y = torch.randn(16, 5, 3), torch.randn(16, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model(x)  # build the lazy GRU before handing parameters over
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert len(list(model.parameters())) == 3 + 3 + 2


@pytest.mark.parametrize("make", [lambda: LSTM(3, return_sequences=True), lambda: GRU(3, reset_after=False),
                                  lambda: Bidirectional(SimpleRNN(3)), lambda: LSTMCell(3)])
def test_state_dict_round_trip_into_fresh_lazy_layer(make, tmp_path):
    source = make()
    is_cell = isinstance(source, layers.RecurrentCell)
    x = torch.randn(2, 2) if is_cell else torch.randn(2, 4, 2)
    source(x)
    path = tmp_path / "w.pt"
    torch.save(source.state_dict(), path)
    fresh = make()
    assert not fresh.built
    missing = fresh.load_state_dict(torch.load(path))
    assert not missing.missing_keys and not missing.unexpected_keys
    a, b = source(x), fresh(x)
    a, b = (a[0], b[0]) if is_cell else (a, b)
    assert torch.equal(a, b)
    assert set(fresh.state_dict()) == set(source.state_dict())


def test_double_conversion():
    layer = LSTM(3, input_dim=2, return_state=True)
    x = torch.randn(2, 4, 2)
    out32, *_ = layer(x)
    layer.double()
    out64, h, c = layer(x.double())
    assert out64.dtype == h.dtype == c.dtype == F64
    close(out64, out32.double(), atol=1e-6)
    assert layer.get_config()["dtype"] == "float64"


@pytest.mark.parametrize("kernel", lstm.kernels.available())
def test_gradcheck_tiny_lstm(kernel):
    layer = LSTM(2, dtype="float64", input_dim=3, return_sequences=True, return_state=True)
    randomize(layer, 40)
    names = ["cell.kernel", "cell.recurrent_kernel", "cell.bias"]
    x = rand(2, 3, 3, seed=41).requires_grad_()
    h0, c0 = rand(2, 2, seed=42).requires_grad_(), rand(2, 2, seed=43).requires_grad_()
    weights = [layer.get_parameter(n).detach().clone().requires_grad_() for n in names]
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)

    def f(x, h0, c0, *w):
        out, h, c = torch.func.functional_call(layer, dict(zip(names, w)), (x,),
                                               {"initial_state": [h0, c0], "mask": mask})
        return out, h, c

    with lstm.kernels.use(kernel):
        try:
            f(x, h0, c0, *weights)
        except ValueError as error:  # a kernel for some cells only (fused_gru_simple_rnn: GRU, SimpleRNN)
            if "does not support this recurrence" not in str(error):
                raise
            pytest.skip(f"{kernel} does not cover an LSTM")
        assert torch.autograd.gradcheck(f, (x, h0, c0, *weights), eps=1e-6, atol=1e-5)


def test_get_set_weights_round_trip():
    a = built(LSTM)
    b = LSTM(3, dtype="float64")
    b.set_weights(a.get_weights())  # builds from the kernel's shape
    for x, y in zip(a.get_weights(), b.get_weights()):
        assert np.array_equal(x, y)
    assert [w.shape for w in a.get_weights()] == [(2, 12), (3, 12), (12,)]
    xs = rand(2, 3, 2, seed=44)
    assert torch.equal(a(xs), b(xs))
    weights = a.get_weights()
    weights[0][0, 0] = 123.0
    assert a.get_weights()[0][0, 0] != 123.0  # copies, not views


def test_names_are_keras_like():
    lstm.clear_session()
    assert [LSTM(2).name, LSTM(2).name, LSTM(2).name] == ["lstm", "lstm_1", "lstm_2"]
    assert [LSTMCell(2).name, LSTMCell(2).name] == ["lstm_cell", "lstm_cell_1"]
    assert [GRU(2).name, SimpleRNN(2).name, GRUCell(2).name, SimpleRNNCell(2).name] == [
        "gru", "simple_rnn", "gru_cell", "simple_rnn_cell"]
    assert LSTM(2).cell.name == "lstm_cell"  # Keras names a layer's own cell plainly
    assert LSTM(2, name="encoder").name == "encoder"
    assert Bidirectional(LSTM(2)).name == "bidirectional"
    lstm.clear_session()
    assert LSTM(2).name == "lstm"
    lstm.clear_session()


ROUND_TRIP = {
    "LSTMCell": lambda: LSTMCell(
        3, activation="relu", recurrent_activation="hard_sigmoid", use_bias=True, unit_forget_bias=False,
        kernel_initializer=initializers.RandomNormal(0.1, 0.2, seed=3), recurrent_initializer=initializers.Orthogonal(2.0),
        bias_initializer=initializers.Constant(0.3), kernel_regularizer=regularizers.L1L2(0.1, 0.2),
        recurrent_regularizer="l2", bias_regularizer=regularizers.L1(0.3), kernel_constraint="non_neg",
        recurrent_constraint=constraints.MaxNorm(1.5, axis=1), bias_constraint=constraints.UnitNorm(),
        dropout=0.2, recurrent_dropout=0.1, seed=11, dtype="float64", name="c1", trainable=False),
    "LSTM": lambda: LSTM(
        4, activation=None, recurrent_activation="tanh", use_bias=False,
        kernel_initializer=initializers.VarianceScaling(2.0, "fan_out", "uniform", seed=1),
        kernel_regularizer=regularizers.L2(0.5), activity_regularizer=regularizers.L1(0.01),
        recurrent_constraint=constraints.MinMaxNorm(0.1, 2.0, 0.5), dropout=0.3, implementation=1, seed=4,
        return_sequences=True, return_state=True, go_backwards=True, stateful=True, unroll=True,
        zero_output_for_mask=True, name="enc"),
    "GRUCell": lambda: GRUCell(2, reset_after=False, dropout=0.1, recurrent_dropout=0.2, seed=1,
                               bias_initializer="ones", kernel_regularizer="l1"),
    "GRU": lambda: GRU(2, reset_after=False, go_backwards=True, stateful=True, return_state=True,
                       recurrent_activation="hard_sigmoid", bias_constraint="unit_norm", seed=9, dtype="float64"),
    "SimpleRNNCell": lambda: SimpleRNNCell(2, activation="relu", use_bias=False, dropout=0.5, seed=2),
    "SimpleRNN": lambda: SimpleRNN(5, activation="softsign", return_sequences=True,
                                   activity_regularizer="l2", recurrent_initializer="identity"),
    "RNN": lambda: RNN(LSTMCell(3, dropout=0.1, unit_forget_bias=False), return_sequences=True,
                       go_backwards=True, activity_regularizer=regularizers.L2(0.2)),
    "Bidirectional": lambda: Bidirectional(LSTM(3, return_sequences=True, kernel_regularizer="l2", dropout=0.2),
                                           merge_mode="mul", name="bi"),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_config_round_trip(name):
    original = ROUND_TRIP[name]()
    config = original.get_config()
    json.dumps(config)  # plain JSON
    copy = type(original).from_config(json.loads(json.dumps(config)))
    assert copy.get_config() == config
    via_registry = layers.deserialize(layers.serialize(original))
    assert via_registry.get_config() == config
    # same behaviour: same weights give the same outputs (at inference)
    is_cell = isinstance(original, layers.RecurrentCell)
    dtype = original.cell.compute_dtype if isinstance(original, RNN) else (
        original.compute_dtype if is_cell else torch.float32)
    x = torch.randn(2, 2, dtype=dtype) if is_cell else torch.randn(2, 4, 2, dtype=dtype)
    original.eval(), copy.eval()
    a = original(x)
    copy.set_weights(original.get_weights())
    b = copy(x)
    a, b = (a[0], b[0]) if isinstance(a, (tuple, list)) else (a, b)
    assert torch.equal(a, b)


def test_config_layout_matches_keras():
    config = LSTM(4).get_config()
    keys = list(config)
    assert keys[:9] == ["name", "trainable", "dtype", "return_sequences", "return_state", "go_backwards",
                        "stateful", "unroll", "zero_output_for_mask"]
    for a, b in [("units", "activation"), ("bias_initializer", "unit_forget_bias"),
                 ("bias_regularizer", "activity_regularizer"), ("recurrent_dropout", "implementation")]:
        assert keys.index(a) < keys.index(b)
    assert config["kernel_initializer"] == {"class_name": "GlorotUniform", "config": {"seed": None}}
    assert config["recurrent_initializer"] == {"class_name": "Orthogonal", "config": {"gain": 1.0, "seed": None}}
    assert config["activation"] == "tanh" and LSTM(2, activation=None).get_config()["activation"] == "linear"


def _golden_cases():
    return sorted(p.name for p in GOLDEN.glob("*.npz"))


def _load_config(path, key):
    with np.load(path) as data:
        return json.loads(str(data[key])), json.loads(str(data["meta"]))


def _from_keras(config, meta):
    cell_cls = {"lstm": LSTMCell, "gru": GRUCell, "simple_rnn": SimpleRNNCell}[meta["cell"]]
    layer_cls = {"lstm": LSTM, "gru": GRU, "simple_rnn": SimpleRNN}[meta["cell"]]
    if meta["kind"] == "cell":
        return [cell_cls.from_config(config)]
    if meta["kind"] == "stacked":
        return [layer_cls.from_config(c) for c in config]
    if meta["kind"] == "bidirectional":
        return [Bidirectional.from_config(config)]
    return [layer_cls.from_config(config)]


@pytest.mark.parametrize("case", _golden_cases())
def test_from_keras3_and_tf_keras_configs(case):
    c3, meta = _load_config(GOLDEN / case, "config_keras3")
    c2, _ = _load_config(GOLDEN / case, "config_tf_keras")
    k3, k2 = _from_keras(c3, meta), _from_keras(c2, meta)
    for a, b in zip(k3, k2):
        assert type(a) is type(b)
        ca, cb = a.get_config(), b.get_config()
        for key in ("units", "return_sequences", "return_state", "go_backwards", "stateful", "use_bias",
                    "activation", "dropout", "merge_mode"):
            if key in ca and key != "activation":
                assert ca[key] == cb[key], key
        assert ca["dtype"] == meta["dtype"] or meta["kind"] == "bidirectional"
        if meta["kind"] == "bidirectional":
            assert a.backward_layer.go_backwards and not a.forward_layer.go_backwards
            assert a.forward_layer.zero_output_for_mask and a.backward_layer.zero_output_for_mask
            assert a.forward_layer.name == b.forward_layer.name == "forward_lstm"
        # our own config of a Keras-made layer loads back
        assert type(a).from_config(ca).get_config() == ca


def test_hard_sigmoid_dialects():
    c3, meta = _load_config(GOLDEN / "lstm_relu_hard_sigmoid_tf_keras.npz", "config_keras3")
    c2, _ = _load_config(GOLDEN / "lstm_relu_hard_sigmoid_tf_keras.npz", "config_tf_keras")
    k3, k2 = LSTM.from_config(c3), LSTM.from_config(c2)
    z = torch.linspace(-4, 4, 81, dtype=F64)
    f3 = lstm.activations.get(k3.cell.recurrent_activation)
    f2 = lstm.activations.get(k2.cell.recurrent_activation)
    close(f3(z), nn.functional.relu6(z + 3) / 6)
    close(f2(z), torch.clamp(0.2 * z + 0.5, 0, 1))
    with np.load(GOLDEN / "lstm_relu_hard_sigmoid_tf_keras.npz") as data:
        x = data["inputs"].astype(np.float64)
        w = [data[k].astype(np.float64) for k in ("kernel", "recurrent_kernel", "bias")]
    outs = {}
    for name, layer, ract in (("k3", k3, "hard_sigmoid"), ("k2", k2, "hard_sigmoid_tf_keras")):
        layer.set_weights(w)
        out, h, c = layer(torch.tensor(x, dtype=torch.float32))
        ref, _ = np_run("lstm", x, w, act="relu", ract=ract)
        close(out.double(), ref, atol=1e-4)
        outs[name] = out
    assert not torch.allclose(outs["k3"], outs["k2"], atol=1e-3)
    # the tf_keras dialect can also be asked for explicitly on an ambiguous config
    plain = LSTM(2, recurrent_activation="hard_sigmoid").get_config()
    assert LSTM.from_config(plain, "tf_keras").cell.recurrent_activation == "hard_sigmoid_tf_keras"
    assert LSTM.from_config(plain).cell.recurrent_activation == "hard_sigmoid"


# ===== DDP =======================================================================================
def _ddp_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = _ddp_model()
        ddp = DistributedDataParallel(model)
        x, y = _ddp_data(rank)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step()
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), *model.get_weights())
        dist.barrier()  # both ranks done before the teardown (gloo's can hang otherwise: pytorch#75097)
    finally:
        dist.destroy_process_group()


def _ddp_model():
    return LSTM(3, input_dim=2, kernel_initializer=initializers.GlorotUniform(seed=1),
                recurrent_initializer=initializers.Orthogonal(seed=2), bias_initializer="ones")


def _ddp_data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4, 5, 2, generator=g), torch.randn(4, 3, generator=g)


def test_distributed_data_parallel_two_ranks():
    from two_ranks import spawn_two_ranks

    with tempfile.TemporaryDirectory() as tmp:
        spawn_two_ranks(_ddp_worker, lambda attempt: (os.path.join(tmp, f"init{attempt}"), tmp), seconds=120)
        ranks = []
        for r in range(2):
            with np.load(os.path.join(tmp, f"rank{r}.npz")) as data:
                ranks.append([data[k] for k in sorted(data.files)])
    for a, b in zip(*ranks):
        assert np.array_equal(a, b)
    # the same as one process stepping on the mean of the two ranks' losses
    model = _ddp_model()
    before = model.get_weights()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = sum(nn.functional.mse_loss(model(x), y) for x, y in map(_ddp_data, range(2))) / 2
    loss.backward()
    opt.step()
    for a, b, c in zip(ranks[0], model.get_weights(), before):
        np.testing.assert_allclose(a, b, atol=1e-6)
        assert not np.allclose(a, c)
