"""The ragged-batch section of `lstm bench`: an LSTM over a batch whose rows have lengths drawn
like the sentiment task's sentences (mean 18.5 words, median 18, 99th percentile 40, padded to 80),
called with `lengths=` (the packed route: work in proportion to the sum of the lengths) against the
same call over the padded batch (the equivalent mask with the packed route off, LSTM_NO_PACKING:
every step computed, as before the route), the layer over the padded batch without a mask,
torch.nn.LSTM on the equivalent PackedSequence, and the layer with every row at full length (which
must cost what the call without lengths does). The lengths call is checked against torch's packed
one first."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .. import interop, layers
from .bench_cases import Contender, _zero

SHAPE = (64, 80, 100, 64)  # the sentiment task's batch, maxlen, embedding and units
OURS = "lstm LSTM lengths"
MASKED = "lstm LSTM mask, not packed"
PADDED = "lstm LSTM padded, no mask"
TORCH_PACKED = "torch.nn.LSTM PackedSequence"
FULL = "lstm LSTM lengths = T"
BASELINE = MASKED
TOLERANCE = 1e-4


def sentence_lengths(batch: int, steps: int, seed: int) -> torch.Tensor:
    """[batch] lengths from a gamma distribution fitted to the sentiment sentences' mean 18.5,
    median 18 and 99th percentile 40, within [1, steps]."""
    draws = np.random.default_rng(seed).gamma(shape=6.5, scale=18.5 / 6.5, size=batch)
    return torch.from_numpy(np.clip(np.rint(draws), 1, steps).astype(np.int64))


@contextmanager
def _not_packed():
    """The packed route turned off (LSTM_NO_PACKING=1) for the calls inside."""
    saved = os.environ.get("LSTM_NO_PACKING")
    os.environ["LSTM_NO_PACKING"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["LSTM_NO_PACKING"]
        else:
            os.environ["LSTM_NO_PACKING"] = saved


def contenders(shape: tuple, seed: int = 0) -> tuple[list[Contender], torch.Tensor]:
    B, T, D, H = shape
    torch.manual_seed(seed)
    ours = layers.LSTM(H, return_sequences=True, zero_output_for_mask=True, input_dim=D)
    with torch.no_grad():
        ours.cell.bias.add_(0.1 * torch.randn_like(ours.cell.bias))
    module = interop.to_torch(ours)
    x = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed + 1))
    lengths = sentence_lengths(B, T, seed)
    full = torch.full((B,), T, dtype=torch.int64)
    mask = torch.arange(T) < lengths[:, None]

    def masked():
        with _not_packed():
            return ours(x, mask=mask)

    def torch_packed():
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return module(packed)[0].data

    rows = [
        Contender(OURS, lambda: ours(x, lengths=lengths), lambda: ours(x, lengths=lengths).sum().backward(),
                  _zero(ours.parameters()), info={"module": ours, "lengths": lengths, "torch": module}),
        Contender(MASKED, masked, lambda: masked().sum().backward(), _zero(ours.parameters())),
        Contender(PADDED, lambda: ours(x), lambda: ours(x).sum().backward(), _zero(ours.parameters())),
        Contender(TORCH_PACKED, torch_packed, lambda: torch_packed().sum().backward(), _zero(module.parameters())),
        Contender(FULL, lambda: ours(x, lengths=full), lambda: ours(x, lengths=full).sum().backward(),
                  _zero(ours.parameters())),
    ]
    return rows, x


def check(rows: list[Contender], x: torch.Tensor) -> dict:
    """Max |difference| of the lengths call's outputs and the input's gradient from torch's packed
    call (zeros past each row's end in both); raises ValueError past TOLERANCE."""
    info = rows[0].info
    ours, module, lengths = info["module"], info["torch"], info["lengths"]
    results = []
    for call in (lambda inputs: ours(inputs, lengths=lengths),
                 lambda inputs: pad_packed_sequence(module(pack_padded_sequence(inputs, lengths, batch_first=True,
                                                                                enforce_sorted=False))[0],
                                                    batch_first=True, total_length=x.shape[1])[0]):
        inputs = x.clone().requires_grad_()
        outputs = call(inputs)
        results.append((outputs.detach(), torch.autograd.grad(outputs.sum(), inputs)[0]))
    (y, dx), (y_torch, dx_torch) = results
    result = {"max_abs_diff_forward": float((y - y_torch).abs().max()),
              "max_abs_diff_grad_x": float((dx - dx_torch).abs().max())}
    if not (result["max_abs_diff_forward"] <= TOLERANCE and result["max_abs_diff_grad_x"] <= TOLERANCE):
        raise ValueError(f"{rows[0].name} differs from {TORCH_PACKED}: {result} (tolerance {TOLERANCE:g})")
    return result
