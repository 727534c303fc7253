"""A trained model back from a checkpoint, for `evaluate`, `predict` and `generate`."""

from __future__ import annotations

import json
from pathlib import Path

from . import TrainError, checkpoint
from .models import architecture
from .tasks import get


def restore(path):
    """(task, model in eval mode, hp, checkpoint folder) from a run folder or a checkpoint folder."""
    folder = checkpoint.resolve(path)
    config = checkpoint.read_config(folder)
    if not isinstance(config, dict) or not {"task", "hp", "meta"} <= set(config):
        raise TrainError(f"checkpoint {folder}: config.json is not an `lstm train` config")
    task = get(config["task"])
    try:
        model = task.model(config["hp"], config["meta"])
    except (KeyError, TypeError) as error:
        raise TrainError(f"checkpoint {folder}: config.json lacks what the {task.name} model needs ({error})") from None
    if config.get("architecture") not in (None, architecture(model)):
        raise TrainError(f"checkpoint {folder}: of another architecture than this version builds for {task.name}")
    checkpoint.load_weights(folder, model)
    model.eval()
    return task, model, config["hp"], folder


def caveat(task, folder) -> str | None:
    """A one-line warning for `predict` and `generate` when the checkpoint's model is not one to trust: a
    --quick smoke run, or a model whose test metric is no better than the task's baseline (as the run's
    metrics.json measured them); None when neither applies."""
    folder = Path(folder)
    quick = bool(checkpoint.read_config(folder).get("quick"))
    compared = _against_baseline(task, folder)
    numbers, no_better = "", False
    if compared is not None:
        model, baseline, name = compared
        # (a NaN metric compares false both ways: no better)
        no_better = not (model > baseline if task.higher_is_better else model < baseline)
        numbers = f" (test {task.metric} {model:.4f}, baseline {baseline:.4f}: {name})"
    run = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    if quick:
        state = "a --quick smoke run and no better than its baseline" if no_better else "a --quick smoke run"
        return f"warning: {run} is {state}{numbers}; train without --quick for the real model"
    if no_better:
        return (f"warning: the model of {run} is no better than its baseline{numbers}; its answers are worth no "
                f"more than the baseline's")
    return None


def _against_baseline(task, folder: Path):
    """(test metric, baseline's, baseline's name) from the run's metrics.json when it measured this very
    checkpoint (a run's best); None for a checkpoint outside a run, another epoch's, or a run not finished."""
    if folder.parent.name != "checkpoints":
        return None
    try:
        metrics = json.loads((folder.parent.parent / "metrics.json").read_text())
        if Path(metrics["checkpoint"]).name != folder.name:
            return None
        return (float(metrics["test"][task.metric]), float(metrics["baseline"][f"test_{task.metric}"]),
                metrics["baseline"].get("name", "the task's baseline"))
    except (OSError, ValueError, KeyError, TypeError):  # no metrics.json, or one without these numbers
        return None


def quantized(model, onnx_file):
    """The restored model with its LSTM layers on int8 weights (`lstm.quantize`, its warnings
    shown); `--int8` with `--onnx` is an error (an int8 ONNX file comes from `lstm export --int8`)."""
    from ..quantization import quantize

    if onnx_file:
        raise TrainError(f"--int8 with --onnx {onnx_file}: give one (an int8 ONNX file is written by `lstm export RUN "
                         f"--format onnx --int8`)")
    try:
        return quantize(model)
    except ValueError as error:
        raise TrainError(f"--int8: {error}") from error
