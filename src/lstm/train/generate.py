"""Sampling text from a character language model, one character at a time, carrying the LSTM state."""

from __future__ import annotations

import torch

from . import TrainError
from .text import CharVocab


@torch.no_grad()
def sample(model, meta: dict, prompt: str, length: int, temperature: float = 0.8, seed: int = 0) -> str:
    vocab = CharVocab.from_json(meta["vocab"])
    prompt = prompt or "\n"
    unknown = sorted({ch for ch in prompt if ch not in vocab.index})
    if unknown:
        raise TrainError(f"--prompt has characters the model never saw: {''.join(unknown)!r}")
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    logits, state = model(torch.as_tensor(vocab.encode(prompt))[None])
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[0, -1] / temperature, -1)
        probs[0] = 0  # never the unknown-character id
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]]), state)
    return vocab.decode(out)
