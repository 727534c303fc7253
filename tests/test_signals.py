"""Interrupted training: SIGINT, SIGTERM and SIGKILL (or a crash) at seeded random points of
`lstm train`, then `--resume`: the run ends with the metrics of an uninterrupted run with the same
seed. SIGINT/SIGTERM save a checkpoint at the step boundary (nothing lost) and exit with 128 + the
signal and a message; SIGKILL loses at most the steps since the last checkpoint (--save-every)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TALLY
from lstm.train import checkpoint
from lstm.train.interrupt import TrainingInterrupted
from lstm.train.loop import train

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = {"epochs": 3, "steps_per_epoch": 6, "batch_size": 16, "units": 8, "length": 12, "val_size": 32,
        "test_size": 32}
STEPS = TINY["epochs"] * TINY["steps_per_epoch"]
SAVE_EVERY = 2


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return train(dict(TINY), task_name="adding", out=str(tmp_path_factory.mktemp("whole") / "run"), progress=False,
                 log=quiet)


def progress(folder: Path) -> int:
    """The steps a checkpoint holds: epoch * steps per epoch + step."""
    state = json.loads((folder / "state.json").read_text())
    return state["epoch"] * TINY["steps_per_epoch"] + state["step"]


def same_results(a: dict, b: dict, tolerance: float = 1e-6) -> bool:
    def close(x, y):
        if isinstance(x, dict):
            return x.keys() == y.keys() and all(close(x[k], y[k]) for k in x)
        if isinstance(x, float):
            return abs(x - y) <= tolerance * max(1.0, abs(y))
        return x == y
    return close(a["test"], b["test"]) and close([e["val"] for e in a["epochs"]], [e["val"] for e in b["epochs"]]) \
        and close([e["train"] for e in a["epochs"]], [e["train"] for e in b["epochs"]])


def stop_at(step: int, how: str):
    """An `_after_step` hook: at `step`, a real SIGINT/SIGTERM to this process, or a crash (as SIGKILL:
    no checkpoint written)."""
    def hook(done):
        if done == step:
            if how == "crash":
                raise KeyboardInterrupt("simulated SIGKILL")
            os.kill(os.getpid(), getattr(signal, how))
    return hook


@pytest.mark.parametrize("chain", range(4))
def test_interrupted_and_resumed_in_process(uninterrupted, tmp_path, chain):
    """Three interruptions at seeded random steps, each followed by a resume, then the run ends."""
    rng = random.Random(chain)
    run = tmp_path / "run"
    for k, point in enumerate(sorted(rng.sample(range(1, STEPS), 3))):
        how = rng.choice(["SIGINT", "SIGTERM", "crash"])
        options = dict(TINY) if k == 0 else {}
        start = dict(task_name="adding", out=str(run)) if k == 0 else dict(resume=str(run))
        with pytest.raises((TrainingInterrupted, KeyboardInterrupt)) as info:
            train(options, progress=False, log=quiet, save_every=SAVE_EVERY, _after_step=stop_at(point, how), **start)
        TALLY["kill point"] += 1
        saved = progress(checkpoint.latest(run))
        if how == "crash":
            assert point - SAVE_EVERY <= saved <= point  # lost only the steps since the last checkpoint
        else:
            assert isinstance(info.value, TrainingInterrupted) and info.value.signum == getattr(signal, how)
            assert saved == point and info.value.checkpoint == checkpoint.latest(run)  # nothing lost
    resumed = train({}, resume=str(run), progress=False, log=quiet, save_every=SAVE_EVERY)
    assert same_results(resumed, uninterrupted)


def test_signal_during_checkpoint_write_keeps_the_previous_checkpoint(uninterrupted, tmp_path):
    """A SIGKILL between writing the files and the rename: the temporary folder is left behind, the
    pointer still leads to the previous checkpoint; the resume removes the leftovers."""
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(dict(TINY), task_name="adding", out=str(run), progress=False, log=quiet, save_every=SAVE_EVERY,
              _after_step=stop_at(5, "crash"))
    leftover = run / "checkpoints" / ".epoch-001-step-00006.abc.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    (run / ".latest.json.xyz.tmp").write_text("{")
    assert progress(checkpoint.latest(run)) == 4
    resumed = train({}, resume=str(run), progress=False, log=quiet)
    assert not leftover.exists() and not (run / ".latest.json.xyz.tmp").exists()
    assert same_results(resumed, uninterrupted)


# ----- a real `lstm train` process ---------------------------------------------------------------
CLI = {"epochs": 3, "steps_per_epoch": 20, "batch_size": 16, "units": 8, "length": 12}
CLI_ARGS = ["--quick", "--save-every", "1", "--threads", "1", "--no-progress",
            *[a for k, v in CLI.items() for a in ("--" + k.replace("_", "-"), str(v))]]


def _cli(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lstm.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1"))


def _steps_saved(run: Path) -> int:
    """The steps the run's latest checkpoint holds; -1 before the first (or while it is replaced)."""
    try:
        state = json.loads((checkpoint.latest(run) / "state.json").read_text())
    except (ValueError, OSError):
        return -1
    return state["epoch"] * CLI["steps_per_epoch"] + state["step"]


def _stop(process: subprocess.Popen) -> None:
    """SIGSTOP, returning once the process is stopped (its state in /proc is T) or has exited."""
    process.send_signal(signal.SIGSTOP)
    stat = Path(f"/proc/{process.pid}/stat")
    while process.poll() is None and stat.exists():
        try:
            if stat.read_text().rpartition(")")[2].split()[0] in ("T", "t"):
                return
        except OSError:
            return
        time.sleep(0.0005)


def test_signals_to_a_training_process(tmp_path):
    """One run stopped three times (SIGINT, SIGTERM, SIGKILL in a seeded order, each once the run has
    saved a seeded random step), resumed after each, against the same run uninterrupted."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command's --threads 1: the same sums in the same order
    try:
        whole = train(dict(CLI), task_name="adding", out=str(tmp_path / "whole"), quick=True, progress=False, log=quiet)
    finally:
        torch.set_num_threads(threads)
    rng = random.Random(11)
    total = CLI["epochs"] * CLI["steps_per_epoch"]
    kills = list(zip(rng.sample(["SIGINT", "SIGTERM", "SIGKILL"], 3), sorted(rng.sample(range(2, total // 2), 3))))
    run = tmp_path / "run"
    process = _cli("adding", "--out", str(run), *CLI_ARGS)
    for how, step in kills:
        deadline = time.monotonic() + 120
        step = max(step, _steps_saved(run) + 1)  # and after a step of this process (its handlers are set)
        while True:  # the run frozen (a step, a checkpoint write, ...) while its checkpoint is read, so
            # that it cannot run on to its end between the read and the signal (a fast step or a loaded machine)
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            _stop(process)
            if _steps_saved(run) >= step:
                break
            process.send_signal(signal.SIGCONT)
            time.sleep(0.005)
        process.send_signal(getattr(signal, how))
        process.send_signal(signal.SIGCONT)
        _, stderr = process.communicate(timeout=120)
        TALLY["kill point"] += 1
        number = getattr(signal, how)
        if how == "SIGKILL":
            assert process.returncode == -number
        else:
            assert process.returncode == 128 + number, stderr[-2000:]
            assert f"stopped by {how}; saved checkpoint" in stderr and "--resume" in stderr and "Traceback" not in stderr
        assert _steps_saved(run) >= step
        process = _cli("--resume", str(run), "--no-progress")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert same_results(json.loads((run / "metrics.json").read_text()), whole)
