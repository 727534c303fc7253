"""Truncated and bit-flipped files through the readers.

Keras files (`lstm.load_keras`, in a child process, so that a crash or a hang fails the test): the
allowed outcomes are a ValueError naming the file, or a model (a flip in weight data changes the
weights; a flip in padding changes nothing). Checkpoints: every file is checked against its SHA-256,
so every corruption is a TrainError (a ValueError) naming the file; never weights silently changed."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TALLY
from lstm.train import TrainError, checkpoint
from lstm.train.loop import train
from lstm.train.restore import restore

HERE = Path(__file__).resolve().parent
MODELS = HERE / "data" / "keras_golden" / "models"
KERAS_ITERATIONS = 40  # per file, five files
CHECKPOINT_ITERATIONS = 400


def test_corrupt_keras_files_give_a_clear_error_or_a_model(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(HERE.parent / "src"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(HERE / "fuzz_keras_files.py"), str(MODELS), str(tmp_path),
                           str(KERAS_ITERATIONS), "8"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"the reader crashed (exit {done.returncode}): {done.stderr[-2000:]}"
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for target, result in report.items():
        TALLY["fuzz: keras file"] += sum(result["counts"].values())
        assert result["unexpected"] == [], (target, result)
        assert sum(result["counts"].values()) == KERAS_ITERATIONS
    errors = sum(n for r in report.values() for k, n in r["counts"].items() if k.endswith("clear error"))
    assert errors > len(report) * KERAS_ITERATIONS / 2  # most corruptions are caught, not loaded


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fuzz") / "run"
    train({"epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "units": 4, "length": 6, "val_size": 16,
           "test_size": 16}, task_name="adding", out=str(run), progress=False, log=lambda *_: None)
    return run


def _read_everything(run: Path):
    """What `lstm evaluate` and `lstm train --resume` read: pointer, config, weights, training state."""
    folder = checkpoint.latest(run)
    _, model, _, _ = restore(folder)
    checkpoint.load_training_state(folder, torch.optim.AdamW(model.parameters()))


def test_corrupt_checkpoints_are_errors_naming_the_file(saved_run, tmp_path):
    rng = random.Random(9)
    folder = checkpoint.latest(saved_run)
    files = sorted(p.name for p in folder.iterdir()) + ["latest.json"]
    assert files == ["checksums.json", "config.json", "model.safetensors", "optimizer.safetensors", "state.json",
                     "latest.json"]
    rng_state = torch.get_rng_state()
    outcomes = {}
    for k in range(CHECKPOINT_ITERATIONS):
        run = tmp_path / f"r{k % 4}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(saved_run, run)
        name = rng.choice(files)
        target = run / name if name == "latest.json" else checkpoint.latest(run) / name
        data = target.read_bytes()
        if rng.random() < 0.5:
            how, data = "truncated", data[: rng.randrange(len(data))]
        else:
            how, flipped = "bit-flipped", bytearray(data)
            flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            data = bytes(flipped)
        target.write_bytes(data)
        TALLY["fuzz: checkpoint"] += 1
        with pytest.raises(TrainError) as info:
            _read_everything(run)
        message = str(info.value)
        named = name in message or (name == "checksums.json" and "checksum" in message)
        assert named, f"{how} {name}: {message}"
        outcomes[how] = outcomes.get(how, 0) + 1
    torch.set_rng_state(rng_state)  # load_training_state restored the run's RNG
    assert sum(outcomes.values()) == CHECKPOINT_ITERATIONS and min(outcomes.values()) > 100


def test_checkpoint_without_checksums_loads_unchecked(saved_run, tmp_path):
    """A checkpoint written before checksums existed still loads (and a corrupt file in it is still
    caught when it does not parse)."""
    run = tmp_path / "old"
    shutil.copytree(saved_run, run)
    folder = checkpoint.latest(run)
    (folder / "checksums.json").unlink()
    (run / "latest.json").write_text(json.dumps({"checkpoint": f"checkpoints/{folder.name}"}))
    _read_everything(run)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:50])
    with pytest.raises(TrainError, match="model.safetensors is corrupt"):
        _read_everything(run)
