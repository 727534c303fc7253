"""The single-step fast paths equal the reference kernel: the C++ streaming step (packed weight
panels, one thread or the units split over threads) and the cell call's lean route
(`out, [h, c] = cell(x_t, [h, c])` as one C++ call), over odd sizes, batches, dtypes, state
containers and autograd; bad inputs give the full route's errors."""

from __future__ import annotations

import pytest
import torch

import lstm.kernels
from lstm import layers
from lstm.kernels import fused_cpp, native


@pytest.fixture(scope="module", autouse=True)
def _extension():
    if native.extension() is None:
        pytest.skip(f"the C++ kernels are not loaded: {native.unavailable_reason()}")


def _tol(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


def _close(got, expected, dtype):
    tol = _tol(dtype)
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=tol, atol=tol * scale), float((got - expected).abs().max())


def _randomised(cell, seed=0):
    """Non-trivial bias (the default is zeros and ones)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        if cell.bias is not None:
            cell.bias.uniform_(-0.5, 0.5)
    return cell


DTYPES = [torch.float32, torch.float64]
_NAME = {torch.float32: "float32", torch.float64: "float64"}


# ----- the streaming step ----------------------------------------------------------------------
@pytest.fixture(params=["one thread", "units over threads"])
def stream_threads(request):
    """The streaming step's two routes: the parallel one forced on (every size) with 2 threads."""
    ext = native.extension()
    threads = torch.get_num_threads()
    if request.param == "units over threads":
        previous = ext.set_stream_parallel_work(0)
        torch.set_num_threads(2)
    else:
        previous = ext.set_stream_parallel_work(1 << 62)
    yield request.param
    ext.set_stream_parallel_work(previous)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, D, units", [(1, 1, 1), (1, 100, 64), (1, 5, 33), (2, 3, 17), (3, 7, 100),
                                             (4, 128, 256), (5, 4, 40), (1, 16, 130)])
@pytest.mark.parametrize("activations", [("tanh", "sigmoid"), ("relu", "hard_sigmoid")])
def test_stream_step_equals_reference(stream_threads, dtype, batch, D, units, activations):
    torch.manual_seed(3)
    layer = layers.LSTM(units, return_sequences=True, return_state=True, dtype=_NAME[dtype], input_shape=(None, D),
                        activation=activations[0], recurrent_activation=activations[1])
    _randomised(layer.cell)
    x = torch.randn(batch, 6, D, dtype=dtype)
    h0, c0 = torch.randn(batch, units, dtype=dtype), torch.randn(batch, units, dtype=dtype)
    with torch.no_grad(), lstm.kernels.use("reference"):
        expected, h, c = layer(x, initial_state=[h0, c0])
    s = layer.stream(batch_size=batch)
    assert s._fast is not None
    s.reset([h0, c0])
    got = torch.stack([s.step(x[:, t]) for t in range(x.shape[1])], dim=1)
    _close(got, expected, dtype)
    _close(s.state[0], h, dtype)
    _close(s.state[1], c, dtype)


def test_stream_step_takes_non_contiguous_and_vector_inputs(stream_threads):
    torch.manual_seed(4)
    layer = _randomised(layers.LSTM(37, return_sequences=True, input_shape=(None, 6)).cell)
    wide = torch.randn(1, 5, 12)
    x = wide[:, :, ::2]  # non-contiguous
    with torch.no_grad(), lstm.kernels.use("reference"):
        expected = layers.RNN(layer, return_sequences=True)(x)
    s = layer.stream()
    got = torch.stack([s.step(x[0, t] if t % 2 else x[:, t]) for t in range(5)], dim=1)
    _close(got, expected, torch.float32)


# ----- the cell call's lean route ------------------------------------------------------------
def _cell(units, D, dtype=torch.float32, **kwargs):
    return _randomised(layers.LSTMCell(units, input_dim=D, dtype=_NAME[dtype], **kwargs))


def _reference_call(cell, x, states, training=None):
    with lstm.kernels.use("reference"):
        return cell(x, states, training=training)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, D, units", [(1, 1, 1), (1, 100, 64), (2, 5, 33), (3, 7, 17), (4, 128, 256),
                                             (6, 4, 9), (1, 3, 130)])
@pytest.mark.parametrize("container", [list, tuple, None])
def test_cell_call_equals_reference(dtype, batch, D, units, container):
    cell = _cell(units, D, dtype)
    x = torch.randn(batch, D, dtype=dtype)
    states = None if container is None else container([torch.randn(batch, units, dtype=dtype),
                                                       torch.randn(batch, units, dtype=dtype)])
    with torch.no_grad():
        out, new = cell(x, states)
        out_r, new_r = _reference_call(cell, x, states)
    assert isinstance(new, list) and len(new) == 2
    _close(out, out_r, dtype)
    for a, b in zip(new, new_r):
        _close(a, b, dtype)
    assert out.data_ptr() != new[0].data_ptr()  # the output is not the state tensor


def test_cell_call_takes_non_contiguous_tensors_and_runs_sequences():
    cell = _cell(20, 8)
    x = torch.randn(3, 16)[:, ::2]
    h = torch.randn(20, 3).t()
    c = torch.randn(3, 40)[:, 1::2]
    assert not (x.is_contiguous() or h.is_contiguous() or c.is_contiguous())
    with torch.no_grad():
        out, new = cell(x, [h, c])
        out_r, new_r = _reference_call(cell, x, [h, c])
    _close(out, out_r, torch.float32)
    _close(new[1], new_r[1], torch.float32)
    # a sequence of calls equals the layer over the sequence
    seq = torch.randn(2, 5, 8)
    state = None
    with torch.no_grad():
        for t in range(5):
            out, state = cell(seq[:, t], state)
        expected = layers.RNN(cell)(seq)
    _close(out, expected, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cell_call_with_grad_equals_reference_gradients(dtype):
    cell = _cell(11, 4, dtype)
    x = torch.randn(2, 4, dtype=dtype, requires_grad=True)
    h = torch.randn(2, 11, dtype=dtype, requires_grad=True)
    c = torch.randn(2, 11, dtype=dtype, requires_grad=True)
    inputs = [x, h, c, *cell.weights()]
    grads = []
    for forced in (None, "reference"):
        if forced:
            with lstm.kernels.use(forced):
                out, (h1, c1) = cell(x, [h, c])
        else:
            out, (h1, c1) = cell(x, [h, c])
        assert out.requires_grad and h1.requires_grad and c1.requires_grad
        loss = (out * 1.5).sum() + (h1 ** 2).sum() + (c1 * 0.7).sum()
        grads.append(torch.autograd.grad(loss, inputs))
    for a, b in zip(*grads):
        _close(a, b, dtype)


def test_cell_call_without_grad_needed_has_no_graph():
    cell = _cell(5, 3)
    for p in cell.parameters():
        p.requires_grad_(False)
    out, (h, c) = cell(torch.randn(1, 3), [torch.zeros(1, 5), torch.zeros(1, 5)])
    assert not (out.requires_grad or h.requires_grad or c.requires_grad)


def test_cell_call_with_dropout_in_training_draws_masks_as_the_full_route():
    results = []
    weights = _cell(6, 4).get_weights()
    x, h, c = torch.randn(2, 4), torch.randn(2, 6), torch.randn(2, 6)
    for forced in (None, "reference"):
        cell = layers.LSTMCell(6, input_dim=4, dropout=0.5, recurrent_dropout=0.3, seed=7)  # the same masks
        cell.set_weights(weights)
        with torch.no_grad():
            if forced:
                with lstm.kernels.use(forced):
                    results.append([cell(x, [h, c], training=True)[0], cell(x, [h, c], training=False)[0]])
            else:
                results.append([cell(x, [h, c], training=True)[0], cell(x, [h, c], training=False)[0]])
    (train, infer), (train_r, infer_r) = results
    _close(train, train_r, torch.float32)
    _close(infer, infer_r, torch.float32)
    assert not torch.allclose(train, infer)  # the masks were applied


def test_cell_call_follows_replaced_weights_dtype_and_options():
    cell = _cell(6, 4)
    x, state = torch.randn(1, 4), [torch.randn(1, 6), torch.randn(1, 6)]
    with torch.no_grad():
        before = cell(x, state)[0]
        cell.kernel = torch.nn.Parameter(cell.kernel * 2)  # replaced
        after = cell(x, state)[0]
        assert not torch.allclose(before, after)
        _close(after, _reference_call(cell, x, state)[0], torch.float32)
        cell.recurrent_kernel.mul_(0.5)  # in place
        _close(cell(x, state)[0], _reference_call(cell, x, state)[0], torch.float32)
        cell.activation = "relu"  # an option set after construction
        _close(cell(x, state)[0], _reference_call(cell, x, state)[0], torch.float32)
        cell.double()  # the dtype changes under the same parameters
        x64, state64 = x.double(), [s.double() for s in state]
        _close(cell(x64, state64)[0], _reference_call(cell, x64, state64)[0], torch.float64)
        # float32 inputs are cast to the layer's float64 (as Keras casts them)
        _close(cell(x, state64)[0], _reference_call(cell, x64, state64)[0], torch.float64)


def test_cell_call_errors_are_the_full_routes():
    cell = _cell(6, 4)
    x, h, c = torch.randn(2, 4), torch.randn(2, 6), torch.randn(2, 6)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"inputs: expected 4 features"):
            cell(torch.randn(2, 5), [h, c])
        with pytest.raises(ValueError, match=r"inputs: expected a 2-D tensor"):
            cell(torch.randn(4), [h, c])
        with pytest.raises(ValueError, match=r"states\[0\]: expected shape \(2, 6\)"):
            cell(x, [h[0], c])  # a 1-D state for a batch of 2
        with pytest.raises(ValueError, match=r"states\[1\]: expected shape \(2, 6\)"):
            cell(x, (h, c[:1]))
        with pytest.raises(ValueError, match=r"states: expected 2 state tensor\(s\)"):
            cell(x, [h])
        with pytest.raises(TypeError, match=r"states\[0\]: expected a floating-point tensor"):
            cell(x, [h.long(), c])
        with pytest.raises(TypeError, match=r"inputs: expected a floating-point tensor"):
            cell(torch.ones(2, 4, dtype=torch.int64), [h, c])
        # conversions the full route makes still happen
        out, _ = cell(x.numpy(), [h.numpy(), c.numpy()])
        _close(out, _reference_call(cell, x, [h, c])[0], torch.float32)
        # a 1-D batch-1 state is rejected as before
        with pytest.raises(ValueError, match=r"states\[0\]: expected shape \(1, 6\)"):
            cell(x[:1], [h[0], c[:1]])


def test_cell_call_route_is_taken_for_the_common_case_only():
    cell = _cell(6, 4)
    route = native.extension().cell_step
    weights = (cell.kernel, cell.recurrent_kernel, cell.bias)
    x, h, c = torch.randn(2, 4), torch.randn(2, 6), torch.randn(2, 6)
    with torch.no_grad():
        assert len(route(x, h, c, *weights, 0, 1)) == 3
        assert len(route(x, None, None, *weights, 0, 1)) == 3
        assert route(torch.randn(5, 4), None, None, *weights, 0, 1) == []  # over kSmallBatch: BLAS
        assert route(x.double(), h, c, *weights, 0, 1) == []
        assert route(x[:, :3], h, c, *weights, 0, 1) == []
        assert route(x, h[:1], c, *weights, 0, 1) == []
        assert route(x.to_sparse(), h, c, *weights, 0, 1) == []
    assert route(x, h, c, *weights, 0, 1) == [None]  # grad mode and weights that need grad: autograd
    assert route(x.double(), h, c, *weights, 0, 1) == []  # (the checks come first)
    cell(x, [h, c])
    assert isinstance(cell._lean_call, fused_cpp.CellCall)  # derived on the first call
    assert layers.GRUCell(3, input_dim=2)(torch.randn(1, 2))[0].shape == (1, 3)  # other cells: the full route
