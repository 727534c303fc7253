"""A real series: Taylor's half-hourly electricity demand in England and Wales, 5 June to 27 August
2000, 4,032 points (shipped in `pmdarima==2.1.1` as a literal array in `datasets/taylor.py`, parsed
here without importing pmdarima). Or a column of a user's CSV."""

from __future__ import annotations

import ast
import re

import numpy as np

from .. import TrainError
from ..files import checked, package_dir
from . import read_csv_columns

PIN = ("pmdarima", "pmdarima", "2.1.1")
FILE = "datasets/taylor.py"
SHA256 = "3df2f44f654bfe4338ea39350912140c9710fa776270f50a2529b2f5c87a4e19"
SEASON = 336  # one week of half hours
POINTS = 4032


def taylor() -> np.ndarray:
    path = checked(package_dir(*PIN) / FILE, SHA256, "forecast data")
    source = path.read_text(encoding="utf-8")
    match = re.search(r"np\.array\(\s*(\[[\d,\s.]*\])\s*\)", source)
    if match is None:
        raise TrainError(f"forecast data: no array literal in {path}")
    values = np.asarray(ast.literal_eval(match.group(1)), dtype=np.float64)
    if values.shape != (POINTS,):
        raise TrainError(f"forecast data: {values.shape[0]} points in {path}, expected {POINTS}")
    return values


def user_series(path: str, column: str) -> np.ndarray:
    raw = read_csv_columns(path, [column])[column]
    try:
        values = np.asarray([float(v) for v in raw], dtype=np.float64)
    except ValueError as error:
        raise TrainError(f"--data {path}: column {column!r} is not numeric ({error})") from None
    if not np.all(np.isfinite(values)):
        raise TrainError(f"--data {path}: column {column!r} has missing or infinite values")
    return values
