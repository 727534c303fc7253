"""Checks of a run's hyper-parameters before anything is built: an impossible value is a TrainError
naming the option (`--batch-size: expected a positive integer, got 0`), not an error from deep
inside torch or a run that silently does something else."""

from __future__ import annotations

import math
import numbers

import torch

from . import TrainError, precision

POSITIVE = {"epochs", "batch_size", "eval_batch_size", "units", "embedding", "maxlen", "seq_len", "season", "horizon",
            "val_size", "test_size", "symbols", "min_count", "max_words", "subset"}
NON_NEGATIVE = {"steps_per_epoch", "bptt", "recompute", "delay", "read", "ar", "day", "eval_batches"}
AT_LEAST = {"length": 2}  # the adding problem marks two steps


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _integer(name: str, value, low: int, words: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise TrainError(f"{_option(name)}: expected {words}, got {value!r}")


def non_negative(name: str, value) -> None:
    _integer(name, value, 0, "a non-negative integer")


def _number(name: str, value, positive: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and (
        value > 0 if positive else value >= 0)
    if not ok:
        raise TrainError(f"{_option(name)}: expected a {'positive' if positive else 'non-negative'} number, "
                         f"got {value!r}")


def check(hp: dict) -> None:
    """Raise TrainError for the first impossible value of `hp` (None: the task's own default)."""
    for name, value in hp.items():
        if value is None:
            continue
        if name in POSITIVE:
            _integer(name, value, 1, "a positive integer")
        elif name in NON_NEGATIVE:
            non_negative(name, value)
        elif name in AT_LEAST:
            _integer(name, value, AT_LEAST[name], f"an integer >= {AT_LEAST[name]}")
    _number("lr", hp["lr"], positive=True)
    _number("weight_decay", hp["weight_decay"], positive=False)
    _number("clip", hp["clip"], positive=False)
    dropout = hp.get("dropout")
    if dropout is not None and not (not isinstance(dropout, bool) and isinstance(dropout, numbers.Real)
                                    and 0 <= dropout < 1):
        raise TrainError(f"--dropout: expected a number in [0, 1), got {dropout!r}")
    precision.check(hp.get("precision", "fp32"))
    if hp.get("bptt") and hp.get("recompute") and hp["bptt"] % hp["recompute"]:
        raise TrainError(f"--recompute: expected a divisor of --bptt {hp['bptt']}, got {hp['recompute']}")


def device(name) -> torch.device:
    """The run's device, refused clearly when it does not exist here."""
    try:
        chosen = torch.device(name or "cpu")
    except (RuntimeError, TypeError):
        raise TrainError(f"--device: expected cpu or cuda (cuda:N), got {name!r}") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name}: CUDA is not available on this machine")
    if chosen.type not in ("cpu", "cuda"):
        raise TrainError(f"--device: expected cpu or cuda (cuda:N), got {name!r}")
    return chosen
