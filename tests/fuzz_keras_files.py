"""Reads truncated and bit-flipped copies of the golden Keras files with `lstm.load_keras`; run as a
child process by tests/test_fuzz_files.py (a crash or a hang there is a failed test, not a lost run).

    python tests/fuzz_keras_files.py MODELS_DIR WORK_DIR ITERATIONS SEED

Prints one JSON line: per file, the count of each outcome, and the first few unexpected ones."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
import warnings
from collections import Counter

import numpy as np
import torch

import lstm

# (file to corrupt, the model file to load, weights= or None, golden inputs)
TARGETS = [
    ("sentiment.keras", "sentiment.keras", None, "sentiment.io.npz"),
    ("forecaster.keras", "forecaster.keras", None, "forecaster.io.npz"),
    ("sentiment.tf_keras.h5", "sentiment.tf_keras.h5", None, "sentiment.io.npz"),
    ("sentiment.weights.h5", "sentiment.json", "sentiment.weights.h5", "sentiment.io.npz"),
    ("sentiment.json", "sentiment.json", "sentiment.weights.h5", "sentiment.io.npz"),
]
SLOW_SECONDS = 10.0


def corrupt(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """A truncation at a random offset, or one flipped bit: anywhere, or in the first or last 4 KiB
    (where the headers, directories and configs sit)."""
    if rng.random() < 0.5:
        return "truncated", data[: rng.randrange(len(data))]
    region = rng.choice(["anywhere", "head", "tail"])
    low, high = {"anywhere": (0, len(data)), "head": (0, min(4096, len(data))),
                 "tail": (max(0, len(data) - 4096), len(data))}[region]
    offset = rng.randrange(low, high)
    flipped = bytearray(data)
    flipped[offset] ^= 1 << rng.randrange(8)
    return "bit-flipped", bytes(flipped)


def outcome(model_path: str, weights, inputs, expected, corrupted: str) -> str:
    try:
        model = lstm.load_keras(model_path, weights)
    except ValueError as error:
        return "clear error" if os.path.basename(corrupted) in str(error) else f"ValueError not naming the file: {error}"
    except Exception as error:  # the contract allows ValueError only
        return f"{type(error).__name__}: {error}"
    try:
        with torch.no_grad():
            got = model(torch.as_tensor(inputs)).numpy()
    except (ValueError, TypeError) as error:
        return f"loaded, refuses the golden inputs: {error}"
    if got.shape != expected.shape:
        return f"loaded, output shape {got.shape} instead of {expected.shape}"
    same = np.allclose(got, expected, atol=1e-4, rtol=1e-4)
    return "loaded, same outputs" if same else "loaded, other weights (the flip hit weight data)"


def main(models: str, work: str, iterations: int, seed: int) -> dict:
    warnings.simplefilter("ignore")
    rng = random.Random(seed)
    report = {}
    for target, model_file, weights_file, io_file in TARGETS:
        golden = np.load(os.path.join(models, io_file))
        folder = os.path.join(work, target)
        os.makedirs(folder, exist_ok=True)
        for name in {model_file, weights_file} - {None}:
            shutil.copy(os.path.join(models, name), folder)
        original = open(os.path.join(models, target), "rb").read()
        # warm-up on the intact file: the first load may build or load the C++ kernel, not a slow reader
        outcome(os.path.join(models, model_file), weights_file and os.path.join(models, weights_file),
                golden["inputs"], golden["outputs"], target)
        counts, unexpected = Counter(), []
        for _ in range(iterations):
            how, data = corrupt(original, rng)
            with open(os.path.join(folder, target), "wb") as handle:
                handle.write(data)
            started = time.perf_counter()
            result = outcome(os.path.join(folder, model_file), weights_file and os.path.join(folder, weights_file),
                             golden["inputs"], golden["outputs"], target)
            if time.perf_counter() - started > SLOW_SECONDS:
                result = f"slow ({time.perf_counter() - started:.0f} s): {result}"
            expected = result in ("clear error", "loaded, same outputs", "loaded, other weights (the flip hit weight data)")
            counts[f"{how}: {result if expected else 'UNEXPECTED'}"] += 1
            if not expected and len(unexpected) < 5:
                unexpected.append(f"{how}: {result}"[:300])
        report[target] = {"counts": dict(counts), "unexpected": unexpected}
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
