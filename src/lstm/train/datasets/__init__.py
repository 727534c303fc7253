"""One module per dataset family; each returns plain arrays and texts, the tasks turn them into tensors."""

from __future__ import annotations

import csv
from pathlib import Path

from .. import TrainError


def read_csv_columns(path: str, columns: list[str]) -> dict[str, list[str]]:
    """The named columns of a user's CSV file, as lists of strings, with clear errors."""
    file = Path(path)
    if not file.is_file():
        raise TrainError(f"--data: no such file {path}")
    try:
        with open(file, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                raise TrainError(f"--data {path}: no column {', '.join(map(repr, missing))}; the columns are "
                                 f"{', '.join(map(repr, header)) or '(none)'}")
            rows = list(reader)
    except UnicodeDecodeError as error:
        raise TrainError(f"--data {path}: not a UTF-8 CSV file ({error})") from None
    except csv.Error as error:
        raise TrainError(f"--data {path}: not a readable CSV file ({error})") from None
    return {c: [row[c] if row[c] is not None else "" for row in rows] for c in columns}
