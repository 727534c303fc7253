"""The C++ kernels' buffer pool (csrc/buffer_pool.h): freed big buffers are reused best-fit, small
ones bypass it, at most 256 MiB stay idle, pooled tensors behave as any CPU tensor, and buffers
still held (saved for a pending backward) are never handed out twice."""

from __future__ import annotations

import pytest
import torch

from lstm import layers
from lstm.kernels import native

MiB = 2**20


@pytest.fixture
def ext():
    ext = native.extension()
    if ext is None:
        pytest.skip(f"the C++ kernels are not loaded: {native.unavailable_reason()}")
    ext.pool_clear()
    yield ext
    ext.pool_clear()


def test_freed_block_is_reused_best_fit(ext):
    like = torch.empty(0)
    first = ext.pooled_empty([1000, 1000], like)
    address = first.data_ptr()
    del first
    idle_bytes, idle_blocks, reused = ext.pool_stats()
    assert idle_blocks == 1 and idle_bytes >= 4_000_000
    again = ext.pooled_empty([900, 1000], like)  # smaller, but more than half: the same block
    assert again.data_ptr() == address
    assert ext.pool_stats() == (0, 0, reused + 1)
    other = ext.pooled_empty([400, 1000], like)  # under half of the idle block's size: a new one
    del again
    third = ext.pooled_empty([400, 1000], like)
    assert third.data_ptr() not in (address, other.data_ptr())


def test_small_buffers_bypass_the_pool(ext):
    t = ext.pooled_empty([100], torch.empty(0))
    del t
    assert ext.pool_stats()[:2] == (0, 0)


def test_idle_bytes_are_capped_and_cleared(ext):
    blocks = [ext.pooled_empty([100 * MiB], torch.empty(0, dtype=torch.uint8)) for _ in range(3)]
    del blocks  # (never touched: no page is mapped)
    idle_bytes, idle_blocks, _ = ext.pool_stats()
    assert idle_blocks == 2 and idle_bytes == 200 * MiB
    assert ext.pool_clear() == 200 * MiB
    assert ext.pool_stats()[:2] == (0, 0)


def test_pooled_tensor_behaves_as_a_cpu_tensor(ext):
    t = ext.pooled_empty([200, 100], torch.empty(0, dtype=torch.float64))
    assert t.dtype == torch.float64 and t.is_contiguous() and t.device.type == "cpu"
    t.copy_(torch.arange(20000, dtype=torch.float64).view(200, 100))
    t.resize_(400, 100)  # the pool is the storage's allocator: resizing allocates from it
    assert torch.equal(t[:200].flatten(), torch.arange(20000, dtype=torch.float64))
    assert torch.equal((t[:200] * 2).sum(), torch.tensor(2.0 * 19999 * 20000 / 2, dtype=torch.float64))


@pytest.mark.parametrize("options", [{}, {"layer_norm": True, "peephole": True}])
def test_graphs_alive_together_keep_their_own_buffers(ext, options):
    torch.manual_seed(0)
    layer = layers.LSTM(32, return_sequences=True, input_dim=24, **options)
    xs = [torch.randn(16, 40, 24, requires_grad=True) for _ in range(3)]
    expected = []
    for x in xs:  # one graph at a time: reference numbers
        y = layer(x)
        expected.append((y.detach().clone(), torch.autograd.grad(y.square().sum(), x)[0]))
    ext.pool_clear()
    ys = [layer(x) for x in xs]  # three graphs hold their saved buffers at once
    del ys[1]  # frees one graph's buffers to the pool while the others are alive
    _, _, reused_before = ext.pool_stats()
    ys.insert(1, layer(xs[1]))
    assert ext.pool_stats()[2] > reused_before  # its forward reused the freed blocks
    for x, y, (y_ref, dx_ref) in zip(xs, ys, expected):
        assert torch.equal(y, y_ref)
        assert torch.equal(torch.autograd.grad(y.square().sum(), x)[0], dx_ref)


def test_empty_cache_gives_idle_buffers_back(ext):
    import lstm.kernels

    layer = layers.LSTM(16, return_sequences=True, input_dim=8)
    layer(torch.randn(8, 300, 8)).sum().backward()  # [B, T, *] buffers over 64 KiB go back to the pool
    idle_bytes = ext.pool_stats()[0]
    assert idle_bytes > 0
    assert lstm.kernels.empty_cache() == idle_bytes
    assert ext.pool_stats()[:2] == (0, 0)
