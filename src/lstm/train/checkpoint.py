"""Checkpoints: a folder per checkpoint holding `model.safetensors`, `optimizer.safetensors`,
`state.json` (epoch, step, history, RNG states), `config.json` (task, hyper-parameters, data meta,
architecture) and `checksums.json` (the SHA-256 of each of the four). They are written into a
temporary folder, fsync'ed, then renamed into place; the run's `latest.json` / `best.json` pointers
are replaced the same way, so a crash at any moment leaves the previous checkpoint whole and pointed
to. Every read checks the file against its checksum: a corrupt file is an error naming it, never
weights silently changed. (Checkpoints written before checksums existed load unchecked.)"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from . import TrainError

WEIGHTS, OPTIMIZER, STATE, CONFIG = "model.safetensors", "optimizer.safetensors", "state.json", "config.json"
CHECKSUMS = "checksums.json"


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
        sums = {name: hashlib.sha256((tmp / name).read_bytes()).hexdigest() for name in (WEIGHTS, OPTIMIZER, STATE, CONFIG)}
        (tmp / CHECKSUMS).write_text(json.dumps({"sha256": sums}, indent=1))
        for name in (WEIGHTS, OPTIMIZER, STATE, CONFIG, CHECKSUMS):
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


def write_pointer(run: Path, pointer: str, folder: Path) -> None:
    """`latest.json` / `best.json`: the checkpoint's folder and the SHA-256 of its checksums.json, so
    that a corrupt pointer cannot silently lead to another checkpoint."""
    folder = Path(folder)
    write_json_atomic(Path(run) / pointer, {"checkpoint": f"{folder.parent.name}/{folder.name}",
                                            "sha256": hashlib.sha256((folder / CHECKSUMS).read_bytes()).hexdigest()})


def _follow(run: Path, pointer: str) -> Path:
    try:
        saved = json.loads((run / pointer).read_text())
        if set(saved) not in ({"checkpoint"}, {"checkpoint", "sha256"}):  # (no sha256: an older run's pointer)
            raise ValueError(f"keys {sorted(saved)}")
        name, expected = saved["checkpoint"], saved.get("sha256")
        folder = run / name
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise TrainError(f"checkpoint {run / pointer}: unreadable pointer ({type(error).__name__}: {error})") from None
    if not folder.is_dir():
        raise TrainError(f"checkpoint {run / pointer}: points to {name!r}, which does not exist")
    if expected is not None:
        try:
            actual = hashlib.sha256((folder / CHECKSUMS).read_bytes()).hexdigest()
        except OSError:
            actual = None
        if actual != expected:
            raise TrainError(f"checkpoint {run / pointer}: points to {name!r}, whose {CHECKSUMS} is not the one it "
                             f"recorded (a corrupt pointer, or a changed checkpoint)")
    return folder


def latest(run: Path) -> Path:
    run = Path(run)
    if not (run / "latest.json").exists():
        raise TrainError(f"--resume {run}: no checkpoint there (no latest.json); nothing to resume")
    return _follow(run, "latest.json")


def remove_temporaries(run: Path) -> None:
    """Delete what a killed run left half-written (temporary checkpoint folders and pointer files)."""
    for folder in (Path(run), Path(run) / "checkpoints"):
        for leftover in folder.glob(".*.tmp") if folder.is_dir() else ():
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _checksums(folder: Path):
    """{file: SHA-256} from checksums.json; None for a checkpoint written before checksums."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_bytes())["sha256"]
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as error:
        raise TrainError(f"checkpoint {folder}: {CHECKSUMS} is corrupt ({type(error).__name__}: {error})") from None
    if not isinstance(sums, dict):
        raise TrainError(f"checkpoint {folder}: {CHECKSUMS} is corrupt (no {{file: sha256}} table)")
    return sums


def read_verified(folder: Path, name: str) -> bytes:
    """The bytes of one checkpoint file, checked against checksums.json."""
    folder = Path(folder)
    try:
        data = (folder / name).read_bytes()
    except FileNotFoundError:
        raise TrainError(f"checkpoint {folder}: {name} is missing") from None
    except OSError as error:
        raise TrainError(f"checkpoint {folder}: {name} cannot be read ({error})") from None
    sums = _checksums(folder)
    if sums is not None:
        expected, actual = sums.get(name), hashlib.sha256(data).hexdigest()
        if expected is None:
            raise TrainError(f"checkpoint {folder}: {CHECKSUMS} has no checksum for {name}")
        if actual != expected:
            raise TrainError(f"checkpoint {folder}: {name} does not match its checksum (corrupt, or replaced since "
                             f"it was saved): SHA-256 {actual[:16]}..., {CHECKSUMS} recorded {str(expected)[:16]}...")
    return data


def _json(folder: Path, name: str):
    try:
        return json.loads(read_verified(folder, name))
    except ValueError as error:
        if isinstance(error, TrainError):
            raise
        raise TrainError(f"checkpoint {folder}: {name} is corrupt ({error})") from None


def _safetensors(folder: Path, name: str) -> dict:
    try:
        return load_safetensors(read_verified(folder, name))
    except (SafetensorError, ValueError, RuntimeError) as error:
        if isinstance(error, TrainError):
            raise
        raise TrainError(f"checkpoint {folder}: {name} is corrupt or not a safetensors file ({error})") from None


def read_config(folder: Path) -> dict:
    return _json(Path(folder), CONFIG)


def load_weights(folder: Path, model) -> None:
    """Load `model.safetensors` into `model`, checking the architecture first."""
    folder = Path(folder)
    weights = _safetensors(folder, WEIGHTS)
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
    state = _json(folder, STATE)
    tensors = _safetensors(folder, OPTIMIZER)
    try:
        rng = tensors.pop("rng.torch_rng")
        optimizer.load_state_dict(_optimizer_state(tensors, state.pop("optimizer")))
        torch.set_rng_state(rng)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as error:
        raise TrainError(f"checkpoint {folder}: the optimizer state does not fit this model "
                         f"({type(error).__name__}: {error})") from None
    return state
