"""Loading the Keras golden cases and running them through this library's layers.

Cases come from the copy under tests/data/keras_golden/out and from ../shared/keras_golden/out
when it exists (it may hold more cases of the same kinds); a case is identified by its name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lstm import layers

HERE = Path(__file__).parent
CASE_DIRS = [HERE.parent.parent / "shared" / "keras_golden" / "out", HERE / "data" / "keras_golden" / "out"]

LAYER_CLASSES = {"lstm": layers.LSTM, "gru": layers.GRU, "simple_rnn": layers.SimpleRNN}
CELL_CLASSES = {"lstm": layers.LSTMCell, "gru": layers.GRUCell, "simple_rnn": layers.SimpleRNNCell}


def case_files() -> dict[str, Path]:
    files: dict[str, Path] = {}
    for directory in CASE_DIRS:
        manifest = directory / "manifest.json"
        if not manifest.exists():
            continue
        for case in json.loads(manifest.read_text())["cases"]:
            files.setdefault(case["name"], directory / case["file"])
    return files


class Case:
    def __init__(self, path: Path):
        self.arrays = dict(np.load(path))
        self.meta = json.loads(str(self.arrays.pop("meta")))
        self.config = json.loads(str(self.arrays.pop("config")))
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[self.meta["dtype"]]

    def tensor(self, key: str, requires_grad=False) -> torch.Tensor:
        return torch.tensor(self.arrays[key], dtype=self.dtype, requires_grad=requires_grad)

    def weights(self, prefix: str) -> list[np.ndarray]:
        return [self.arrays[prefix + k] for k in ("kernel", "recurrent_kernel", "bias") if prefix + k in self.arrays]

    @property
    def state_names(self) -> list[str]:
        return self.meta["state_keys"]


def _with_state(config: dict) -> dict:
    # Final states are compared too: the twin with return_state=True has identical outputs.
    return {**config, "return_state": True}


def build(case: Case):
    """The model for a case: (module, run) where run(inputs, mask, initial) -> (outputs, states)."""
    meta, kind = case.meta, case.meta["kind"]
    if kind == "cell":
        cell = CELL_CLASSES[meta["cell"]].from_config(case.config)
        cell.set_weights(case.weights(""))

        def run(x, mask, initial):
            out, states = cell(x, initial, training=False)
            return out, states

        return cell, run
    if kind == "stacked":
        stack = [LAYER_CLASSES[meta["cell"]].from_config(c) for c in case.config[:-1]]
        stack.append(LAYER_CLASSES[meta["cell"]].from_config(_with_state(case.config[-1])))
        for layer, spec in zip(stack, meta["layers"]):
            layer.set_weights(case.weights(spec["prefix"]))

        def run(x, mask, initial):
            for layer in stack[:-1]:
                x = layer(x, mask=mask, training=False)
            out, *states = stack[-1](x, mask=mask, initial_state=initial, training=False)
            return out, states

        return torch.nn.ModuleList(stack), run
    if kind == "bidirectional":
        config = dict(case.config)
        for key in ("layer", "backward_layer"):
            if key in config:
                config[key] = {**config[key], "config": _with_state(config[key]["config"])}
        model = layers.Bidirectional.from_config(config)
        model.set_weights(case.weights("forward.") + case.weights("backward."))
    else:
        model = LAYER_CLASSES[meta["cell"]].from_config(_with_state(case.config))
        model.set_weights(case.weights(""))

    def run(x, mask, initial):
        if meta.get("merge_mode", "concat") is None and kind == "bidirectional":
            y_f, y_b, *states = model(x, mask=mask, initial_state=initial, training=False)
            return torch.cat([y_f, y_b], -1), states
        out, *states = model(x, mask=mask, initial_state=initial, training=False)
        return out, states

    return model, run


def mask_of(case: Case):
    source = case.meta.get("mask_source")
    if source is None:
        return None
    if "mask" in case.arrays:
        return torch.tensor(case.arrays["mask"])
    return (case.tensor("inputs") != 0).any(-1)  # Masking(0.0)


def run_case(case: Case):
    """Outputs, final states and gradients of the case's loss, from this library."""
    model, run = build(case)
    x = case.tensor("inputs", requires_grad=True)
    leaves = {"inputs": x}
    initial = None
    if case.meta["initial_state_keys"]:
        initial = [case.tensor(k, requires_grad=True) for k in case.meta["initial_state_keys"]]
        leaves.update({k: t for k, t in zip(case.meta["initial_state_keys"], initial)})
    mask = mask_of(case)
    if case.meta.get("mask_source") == "masking_layer":
        x_in = x * mask[..., None].to(x.dtype)
    else:
        x_in = x
    chunks = stateful_calls(case)
    if chunks:
        outputs, states = run_in_calls(case, run, x_in, mask, initial, chunks)
    else:
        outputs, states = run(x_in, mask, initial)
    ours = {"outputs": outputs}
    ours.update({"final_" + name: s for name, s in zip(case.state_names, states)})
    loss = sum((ours[name] * case.tensor(g)).sum() for name, g in case.meta["loss_terms"])
    loss.backward()
    params = dict(_named_weights(model, case))
    grads = {}
    for key in case.meta["grad_keys"]:
        target = key.removeprefix("grad.")
        tensor = leaves.get(target, params.get(target))
        grads[key] = tensor.grad
    return ours, grads


def stateful_calls(case: Case) -> list[int]:
    """Timesteps per call for a stateful case that splits its inputs over several calls.

    The split is read from any list of ints in the case's metadata that sums to T (e.g.
    `"calls": [4, 2]`); without one, a single call gives the same outputs (SPEC.md §5).
    """
    config = case.config[-1] if isinstance(case.config, list) else case.config
    if not (isinstance(config, dict) and config.get("stateful")):
        return []
    steps = case.arrays["inputs"].shape[1]
    for value in case.meta.values():
        if (isinstance(value, list) and len(value) > 1 and all(isinstance(v, int) and v > 0 for v in value)
                and sum(value) == steps):
            return value
    return []


def run_in_calls(case: Case, run, x, mask, initial, chunks):
    """Consecutive calls of a stateful model; outputs joined as the case stores them."""
    outputs, start = [], 0
    for k, size in enumerate(chunks):
        piece_mask = None if mask is None else mask[:, start:start + size]
        out, states = run(x[:, start:start + size], piece_mask, initial if k == 0 else None)
        outputs.append(out)
        start += size
    expected = case.arrays["outputs"]
    if outputs[-1].dim() == 3 and expected.ndim == 3 and expected.shape[1] == x.shape[1]:
        return torch.cat(outputs, dim=1), states
    return outputs[-1], states


def _named_weights(model, case: Case):
    kind = case.meta["kind"]
    if kind == "cell":
        cells = [("", model)]
    elif kind == "stacked":
        cells = [(spec["prefix"], layer.cell) for spec, layer in zip(case.meta["layers"], model)]
    elif kind == "bidirectional":
        cells = [("forward.", model.forward_layer.cell), ("backward.", model.backward_layer.cell)]
    else:
        cells = [("", model.cell)]
    for prefix, cell in cells:
        for name in ("kernel", "recurrent_kernel", "bias"):
            if getattr(cell, name) is not None:
                yield prefix + name, getattr(cell, name)
