"""The gates of one input on a model trained by `lstm train` (its run or checkpoint folder).

The input is read the way the task reads it: sentiment a sentence, charlm a text, forecast and
vowels numbers or a CSV file (as `lstm predict` takes them); adding and copy draw one generated
example (seeded) instead."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..train.checkpoint import read_config
from ..train.datasets import synthetic
from ..train.restore import restore
from ..train.text import CharVocab, tokenize
from .traces import recording_gates

GENERATED = ("adding", "copy")


@dataclass
class RunTrace:
    task: str
    checkpoint: str
    traces: dict  # layer name -> {key: [1, T, U]}
    step_labels: Optional[list]  # one per step ("" for an unlabelled step), or None
    description: str  # the input and what the model answered


def trace_run(run: str, text: Optional[str] = None, seed: int = 0) -> RunTrace:
    if not Path(run).exists():
        raise ValueError(f"--run {run}: no such folder (give a run folder of `lstm train` or one of its checkpoints)")
    task, model, hp, folder = restore(run)
    meta = read_config(folder)["meta"]
    if task.name in GENERATED and text is not None:
        raise ValueError(f"--input: the {task.name} task reads generated sequences; leave --input out "
                         f"(--seed picks the example)")
    if task.name not in GENERATED and not text:
        raise ValueError(f"--input: the {task.name} task needs an input to trace ("
                         + ("a sentence" if task.name == "sentiment" else "a text" if task.name == "charlm"
                            else "numbers or a CSV file, as `lstm predict` takes") + ")")
    with recording_gates(model) as traces, torch.no_grad():
        labels, steps, description = _READERS.get(task.name, _predicted)(task, model, hp, meta, text, seed)
    if steps is not None:  # padded inputs: keep the steps that hold the input
        traces = {name: {k: v[:, :steps] for k, v in trace.items()} for name, trace in traces.items()}
    return RunTrace(task.name, str(folder), traces, labels, description)


def _predicted(task, model, hp, meta, text, seed):
    """sentiment, forecast, vowels: the task's own `predict` runs the model on the input."""
    result = task.predict(model, hp, meta, text)
    if task.name == "sentiment":
        labels = tokenize(text)[: hp["maxlen"]]
        return labels, len(labels), f"{text!r} -> {result['label']} (probability {result['probability']:.3f})"
    if "label" in result:
        return None, result.get("steps"), f"-> {result['label']} (probability {result['probability']:.3f})"
    return None, None, f"-> a forecast of {result['horizon']} steps"


def _charlm(task, model, hp, meta, text, seed):
    vocab = CharVocab.from_json(meta["vocab"])
    logits, _ = model(torch.as_tensor(vocab.encode(text))[None])
    following = vocab.decode([int(logits[0, -1].argmax())])
    return [c if c.strip() else "␣" for c in text], None, f"{text!r} -> next character {following!r}"


def _adding(task, model, hp, meta, text, seed):
    x, y = synthetic.adding(1, hp["length"], torch.Generator().manual_seed(seed))
    values, marked = x[0, :, 0], x[0, :, 1] > 0
    labels = [f"{v:.2f} ▲" if m else "" for v, m in zip(values.tolist(), marked.tolist())]
    return labels, None, (f"marked values {' + '.join(f'{v:.3f}' for v in values[marked].tolist())} = "
                          f"{y.item():.3f}; the model says {model(x).item():.3f}")


def _copy(task, model, hp, meta, text, seed):
    x, y = synthetic.copy(1, hp["delay"], torch.Generator().manual_seed(seed), hp["symbols"])
    go = hp["symbols"] + 1
    labels = ["GO" if s == go else str(s) if s else "·" for s in x[0].tolist()]
    copied = model(x)[0, -10:].argmax(-1).tolist()
    return labels, None, (f"symbols {''.join(map(str, y[0, -10:].tolist()))}, after {hp['delay']} steps the "
                          f"model writes {''.join(map(str, copied))}")


_READERS = {"charlm": _charlm, "adding": _adding, "copy": _copy}
