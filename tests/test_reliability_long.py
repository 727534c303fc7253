"""Long sequences (lstm.chunked, iter_chunks, recomputed, truncated_bptt): equal to one layer call,
equal gradients, T = 100,000 in bounded memory, and the recompute backward's peak memory."""

from __future__ import annotations

import gc
import itertools
import json
import os
import subprocess
import sys
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import lstm
from conftest import TALLY
from lstm.commands import bench_cases
from lstm.layers import GRU, LSTM, Bidirectional, Dense, SimpleRNN
from marks import needs_cpp

SRC = str(Path(__file__).resolve().parents[1] / "src")
RUNS = (lstm.chunked, lstm.recomputed, lstm.truncated_bptt)


def max_difference(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(max_difference(x, y) for x, y in zip(a, b))
    return (a - b).abs().max().item() if a.numel() else 0.0


@pytest.mark.parametrize("cls", [LSTM, GRU, SimpleRNN])
def test_chunked_runs_equal_one_call(cls):
    torch.manual_seed(0)
    x = torch.randn(3, 11, 2)
    mask = torch.rand(3, 11) > 0.4
    mask[0, :6] = False  # masked across a chunk boundary from the start
    mask[1, 7:] = False  # and to the end
    worst, compared = 0.0, 0
    for sequences, state, backwards, zeros, masked in itertools.product([True, False], repeat=5):
        layer = cls(4, return_sequences=sequences, return_state=state, go_backwards=backwards,
                    zero_output_for_mask=zeros)
        initial = [torch.randn(3, 4) for _ in range(layer.cell.state_count)]
        kwargs = {"mask": mask if masked else None, "initial_state": initial}
        one_call = layer(x, **kwargs)
        for run, chunk in itertools.product(RUNS, (1, 3, 5, 11, 20)):
            worst = max(worst, max_difference(run(layer, x, chunk, **kwargs), one_call))
            compared += 1
    assert compared == 32 * 15 and worst < 1e-6


@pytest.mark.parametrize("backwards", [False, True])
def test_chunked_without_gradients_equals_one_call(backwards):
    """(Without gradients the chunks are copied into one output tensor as they come.)"""
    torch.manual_seed(5)
    layer = LSTM(4, return_sequences=True, return_state=True, go_backwards=backwards)
    x, mask = torch.randn(3, 23, 2), torch.rand(3, 23) > 0.3
    with torch.no_grad():
        assert max_difference(lstm.chunked(layer, x, 5, mask=mask), layer(x, mask=mask)) < 1e-6


def test_zero_steps_and_empty_batch_equal_one_call():
    layer = LSTM(4, return_sequences=True, return_state=True)
    for shape in ((2, 0, 3), (0, 5, 3)):
        x = torch.randn(*shape)
        for run in RUNS:
            got, want = run(layer, x, 2), layer(x)
            assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want))


def _grads(layer, x, initial, run=None, **kwargs):
    x = x.clone().requires_grad_(True)
    initial = [s.clone().requires_grad_(True) for s in initial]
    out, *states = run(layer, x, initial_state=initial, **kwargs) if run else layer(x, initial_state=initial, **kwargs)
    loss = (out ** 2).sum() + sum((s * torch.arange(s.shape[1])).sum() for s in states)
    return [out.detach(), *torch.autograd.grad(loss, [x, *initial, *layer.parameters()])]


@pytest.mark.parametrize("cls", [LSTM, GRU, SimpleRNN])
def test_recomputed_gradients_equal_the_stored_backward(cls):
    torch.manual_seed(1)
    x, mask = torch.randn(4, 37, 3), torch.rand(4, 37) > 0.3

    def layer():  # same weights and the same dropout masks (the layer's seed) each time
        torch.manual_seed(2)
        made = cls(8, return_sequences=True, return_state=True, dropout=0.2, recurrent_dropout=0.1, seed=5)
        made(x[:, :1])
        return made

    initial = [torch.randn(4, 8) for _ in range(layer().cell.state_count)]
    stored = _grads(layer(), x, initial, mask=mask, training=True)
    recomputed = _grads(layer(), x, initial, lambda *a, **k: lstm.recomputed(*a, 5, **k), mask=mask, training=True)
    assert max(max_difference(a, b) / (b.abs().max().item() + 1e-12) for a, b in zip(recomputed, stored)) < 1e-5


def test_lstm_variants_with_per_call_draws():
    """peephole + layer_norm + proj_size, with dropconnect or zoneout drawn once per call: the
    chunked runs see the same draws as one call (the layer's seed), each chunk the zoneout masks of
    its steps in the whole call (Zoneout.offset, in processing order: go_backwards too), so outputs
    and gradients are equal; at inference zoneout is off."""
    torch.manual_seed(6)
    x = torch.randn(3, 9, 2)
    mask = torch.rand(3, 9) > 0.2

    def layer(**options):
        torch.manual_seed(7)
        made = LSTM(5, peephole=True, layer_norm=True, proj_size=3, seed=11, return_sequences=True,
                    return_state=True, **options)
        made(x[:, :1])
        return made

    initial = [torch.randn(3, 3), torch.randn(3, 5)]
    for options in ({"recurrent_dropconnect": 0.3}, {"zoneout": (0.3, 0.5)}, {"zoneout": 0.4, "go_backwards": True}):
        want = _grads(layer(**options), x, initial, mask=mask, training=True)
        for run in RUNS[:2]:
            got = _grads(layer(**options), x, initial, lambda *a, **k: run(*a, 4, **k), mask=mask, training=True)
            assert max(max_difference(a, b) / (b.abs().max().item() + 1e-12) for a, b in zip(got, want)) < 1e-5, options
        truncated = lstm.truncated_bptt(layer(**options), x, 4, mask=mask, initial_state=initial, training=True)
        assert max_difference(truncated, want[:1]) < 1e-6, options  # (the forward of one call)
    zoneout = layer(zoneout=0.2)
    assert max_difference(lstm.chunked(zoneout, x, 4, training=False), zoneout(x, training=False)) < 1e-6


def test_truncated_bptt_is_the_detached_two_part_run():
    torch.manual_seed(3)
    layer = LSTM(6, return_sequences=True, return_state=True)
    x = torch.randn(2, 12, 3)
    initial = [torch.zeros(2, 6), torch.zeros(2, 6)]

    def by_hand(layer, x, initial_state):
        first, *states = layer(x[:, :8], initial_state=initial_state)
        second, *states = layer(x[:, 8:], initial_state=[s.detach() for s in states])
        return (torch.cat([first, second], 1), *states)

    want = _grads(layer, x, initial, by_hand)
    for recompute in (None, 2, 4):
        got = _grads(layer, x, initial, lambda *a, **k: lstm.truncated_bptt(*a, 8, recompute=recompute, **k))
        assert max_difference(got, want) < 1e-5
    assert max_difference(_grads(layer, x, initial, lambda *a, **k: lstm.truncated_bptt(*a, 12, **k)),
                          _grads(layer, x, initial)) < 1e-6  # bptt >= T: the full gradient


def _retained_bytes(run) -> int:
    """Bytes of the tensors autograd keeps for the backward of `run()`, once it returned."""
    kept = []

    def pack(t):
        kept.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    gc.collect()
    alive = {id(t): t for t in (ref() for ref in kept) if t is not None}
    del out
    return sum(t.numel() * t.element_size() for t in alive.values())


@needs_cpp
def test_truncated_bptt_keeps_one_window_of_a_many_to_one_layer():
    layer, x = LSTM(16), torch.randn(4, 400, 8)
    layer(x[:, :1])
    whole, window = _retained_bytes(lambda: layer(x)), _retained_bytes(lambda: lstm.truncated_bptt(layer, x, 50))
    assert window < whole / 4, (window, whole)


def test_stateful_layer_and_iter_chunks():
    torch.manual_seed(4)
    x = torch.randn(2, 10, 3)
    one, chunked = LSTM(5, stateful=True), LSTM(5, stateful=True)
    one(x[:, :1])
    one.reset_state()
    chunked.load_state_dict(one.state_dict())
    for _ in range(2):  # the second call starts from the carried states
        assert max_difference(lstm.chunked(chunked, x, 3), one(x)) < 1e-6
        assert max_difference(tuple(chunked.states), tuple(one.states)) < 1e-6
    layer = GRU(4, return_sequences=True, go_backwards=True)
    parts = [out for out, _ in lstm.iter_chunks(layer, x, 4)]
    assert [p.shape[1] for p in parts] == [2, 4, 4]  # processing order: the last steps first
    assert max_difference(torch.cat(parts, 1), layer(x)) < 1e-6


@pytest.mark.parametrize("call,error,fragments", [
    (lambda: lstm.chunked(LSTM(3), torch.randn(2, 5, 4), 0), ValueError, ("chunk_size", "positive", "0")),
    (lambda: lstm.chunked(LSTM(3), torch.randn(2, 5, 4), 2.5), ValueError, ("chunk_size", "2.5")),
    (lambda: lstm.recomputed(LSTM(3), torch.randn(2, 5, 4), True), ValueError, ("chunk_size", "True")),
    (lambda: lstm.truncated_bptt(LSTM(3), torch.randn(2, 5, 4), -1), ValueError, ("bptt", "-1")),
    (lambda: lstm.truncated_bptt(LSTM(3), torch.randn(2, 5, 4), 6, recompute=4), ValueError,
     ("recompute", "divisor", "bptt=6", "4")),
    (lambda: lstm.chunked(Bidirectional(LSTM(3)), torch.randn(2, 5, 4), 2), TypeError,
     ("layer", "Bidirectional", "forward_layer")),
    (lambda: lstm.chunked(Dense(3), torch.randn(2, 5, 4), 2), TypeError, ("layer", "Dense")),
    (lambda: lstm.chunked(LSTM(3, activity_regularizer="l2"), torch.randn(2, 5, 4), 2), ValueError,
     ("activity_regularizer",)),
    (lambda: lstm.chunked(LSTM(3), torch.randn(5, 4), 2), ValueError, ("inputs", "3-D", "(5, 4)")),
    (lambda: lstm.chunked(LSTM(3), torch.ones(2, 5, 4, dtype=torch.int64), 2), TypeError, ("inputs", "int64")),
    (lambda: lstm.chunked(LSTM(3), torch.randn(2, 5, 4), 2, mask=torch.ones(2, 4, dtype=torch.bool)), ValueError,
     ("mask", "(2, 5)", "(2, 4)")),
    (lambda: lstm.iter_chunks(LSTM(3), torch.randn(2, 5, 4), 2, initial_state=[torch.zeros(2, 3)]),
     ValueError, ("initial_state", "2 state tensor")),
])
def test_bad_arguments(call, error, fragments):
    TALLY["bad input"] += 1
    with pytest.raises(error) as info:
        call()
    assert all(f in str(info.value) for f in fragments), str(info.value)


def _subprocess_json(script: str, *args) -> dict:
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# peak resident memory added by one forward over T = 100,000 (VmHWM after clear_refs, as `lstm bench`)
LONG_FORWARD = """
import json, sys, torch, lstm
from lstm.commands.bench_cases import _proc_status_kb
torch.set_num_threads(1)
mode, B, T, D, U = sys.argv[1], *map(int, sys.argv[2:])
torch.manual_seed(0)
layer = lstm.layers.LSTM(U, return_sequences=True, return_state=True)
x = torch.randn(B, T, D)
with torch.no_grad():
    lstm.chunked(layer, x[:, :100], 10)  # warm-up: weights built, kernels loaded
    before = _proc_status_kb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    if mode == "one call":
        out, h, c = layer(x)
        last = out[:, -1]
    else:
        for out, (h, c) in lstm.iter_chunks(layer, x, 1000):
            last = out[:, -1]
    grown = (_proc_status_kb("VmHWM") - before) * 1024
print(json.dumps({"grown": grown, "last": last.tolist(), "h": h.tolist(), "c": c.tolist()}))
"""


def test_forward_over_100000_steps_in_bounded_memory():
    shape = (2, 100_000, 8, 32)
    with ThreadPoolExecutor(2) as pool:
        one, chunked = pool.map(lambda mode: _subprocess_json(LONG_FORWARD, mode, *shape), ["one call", "chunks"])
    for key in ("last", "h", "c"):
        assert max_difference(torch.tensor(chunked[key]), torch.tensor(one[key])) < 1e-6
    outputs = 2 * 100_000 * 32 * 4  # what one call must hold: every output, 25.6 MB
    assert one["grown"] > 0.9 * outputs and chunked["grown"] < outputs / 10, (one["grown"], chunked["grown"])


@needs_cpp
def test_recompute_backward_peak_memory():
    """The bench's memory worker: one training step, stored backward against the recomputing one."""
    shape = (8, 1000, 16, 64)
    names = (bench_cases.LSTM_DEFAULT, bench_cases.LSTM_RECOMPUTE)
    with ThreadPoolExecutor(2) as pool:
        stored, recomputed = pool.map(lambda name: bench_cases.run_memory_subprocess(name, shape, 1, timeout=300),
                                      names)
    assert "status" not in stored and "status" not in recomputed, (stored, recomputed)
    assert recomputed["peak_growth_bytes"] < stored["peak_growth_bytes"] / 2, (stored, recomputed)
