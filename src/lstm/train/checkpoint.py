"""Checkpoints: a folder per checkpoint holding `model.safetensors`, `optimizer.safetensors`,
`state.json` (epoch, step, history, RNG states) and `config.json` (task, hyper-parameters, data meta,
architecture). Each is written into a temporary folder, fsync'ed, then renamed into place; the run's
`latest.json` / `best.json` pointers are replaced the same way, so a crash at any moment leaves the
previous checkpoint whole and pointed to."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import TrainError

WEIGHTS, OPTIMIZER, STATE, CONFIG = "model.safetensors", "optimizer.safetensors", "state.json", "config.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _optimizer_tensors(optimizer) -> tuple[dict, dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict, extra: dict) -> dict:
    state: dict = {}
    for name, value in list(tensors.items()) + list(extra["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": extra["param_groups"]}


def save(folder: Path, model, optimizer, config: dict, state: dict, write_hook=None) -> Path:
    """Write checkpoint `folder` atomically (temp folder, fsync, rename). `write_hook(stage)` is for tests."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, tmp / WEIGHTS, metadata={"task": config["task"]})
        if write_hook:
            write_hook("weights")
        tensors, extra = _optimizer_tensors(optimizer)
        rng = {"torch_rng": torch.get_rng_state()}
        save_file(dict(tensors, **{f"rng.{k}": v for k, v in rng.items()}), tmp / OPTIMIZER)
        for name, data in ((STATE, dict(state, optimizer=extra)), (CONFIG, config)):
            with open(tmp / name, "w") as handle:
                json.dump(data, handle, indent=1)
        for name in (WEIGHTS, OPTIMIZER, STATE, CONFIG):
            with open(tmp / name, "rb") as handle:
                os.fsync(handle.fileno())
        if write_hook:
            write_hook("files")
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
        _fsync_dir(folder.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run folder (its best, else latest, checkpoint) or a checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise TrainError(f"checkpoint {path}: no such file or folder")
    if (path / WEIGHTS).exists() or (path / CONFIG).exists() and not (path / "latest.json").exists():
        return path
    for pointer in ("best.json", "latest.json"):
        if (path / pointer).exists():
            return _follow(path, pointer)
    raise TrainError(f"checkpoint {path}: not a checkpoint (no {WEIGHTS}) nor a run folder (no latest.json)")


def _follow(run: Path, pointer: str) -> Path:
    try:
        name = json.loads((run / pointer).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise TrainError(f"checkpoint {run / pointer}: unreadable pointer ({error})") from None
    return run / name


def latest(run: Path) -> Path:
    run = Path(run)
    if not (run / "latest.json").exists():
        raise TrainError(f"--resume {run}: no checkpoint there (no latest.json); nothing to resume")
    return _follow(run, "latest.json")


def read_config(folder: Path) -> dict:
    folder = Path(folder)
    try:
        return json.loads((folder / CONFIG).read_text())
    except FileNotFoundError:
        raise TrainError(f"checkpoint {folder}: {CONFIG} is missing") from None
    except ValueError as error:
        raise TrainError(f"checkpoint {folder}: {CONFIG} is corrupt ({error})") from None


def load_weights(folder: Path, model) -> None:
    """Load `model.safetensors` into `model`, checking the architecture first."""
    folder = Path(folder)
    try:
        weights = load_file(folder / WEIGHTS)
    except FileNotFoundError:
        raise TrainError(f"checkpoint {folder}: {WEIGHTS} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise TrainError(f"checkpoint {folder}: {WEIGHTS} is corrupt or not a safetensors file ({error})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        shapes = [f"{k} {got[k]} vs {expected[k]}" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
        raise TrainError(f"checkpoint {folder}: its weights are of another architecture than its config describes "
                         f"(missing {missing or 'none'}, unexpected {extra or 'none'}, shapes differ: "
                         f"{shapes or 'none'})")
    model.load_state_dict(weights)


def load_training_state(folder: Path, optimizer) -> dict:
    """Restore the optimizer and RNG states; returns state.json (epoch, step, history, ...)."""
    folder = Path(folder)
    try:
        state = json.loads((folder / STATE).read_text())
        tensors = load_file(folder / OPTIMIZER)
    except FileNotFoundError as error:
        raise TrainError(f"checkpoint {folder}: {Path(error.filename).name} is missing") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise TrainError(f"checkpoint {folder}: training state is corrupt ({error})") from None
    rng = tensors.pop("rng.torch_rng")
    try:
        optimizer.load_state_dict(_optimizer_state(tensors, state.pop("optimizer")))
    except (ValueError, KeyError, RuntimeError) as error:
        raise TrainError(f"checkpoint {folder}: the optimizer state does not fit this model ({error})") from None
    torch.set_rng_state(rng)
    return state
