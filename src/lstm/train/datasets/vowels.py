"""JapaneseVowels (UCR/UEA archive, shipped in `aeon==1.6.0`): 9 speakers, 12 LPC channels, series of
7 to 29 steps; the archive's own 270 train / 370 test cases. The .ts files are parsed here."""

from __future__ import annotations

import numpy as np

from .. import TrainError
from ..files import checked, package_dir

PIN = ("aeon", "aeon", "1.6.0")
FOLDER = "datasets/data/JapaneseVowels"
SHA256 = {"TRAIN": "68a430eabd919cc77f40b1f5f3bc0dcafacc1486bca9260785aeb7d262cc78cd",
          "TEST": "b3d41d6a0ca3bcad3afb9ca7d4365382aa51341e2e58bae2a574babdda5b9462"}
SIZES = {"TRAIN": 270, "TEST": 370}
CHANNELS = 12


def read_ts(path) -> tuple[list[np.ndarray], np.ndarray]:
    """(series as [length, channels] arrays, labels 0..8) from a .ts file with class labels."""
    series, labels, in_data = [], [], False
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            in_data = line.lower() == "@data"
            continue
        *channels, label = line.split(":")
        series.append(np.asarray([[float(v) for v in c.split(",")] for c in channels]).T)
        labels.append(int(label) - 1)
    return series, np.asarray(labels, dtype=np.int64)


def japanese_vowels(part: str) -> tuple[list[np.ndarray], np.ndarray]:
    path = checked(package_dir(*PIN) / FOLDER / f"JapaneseVowels_{part}.ts", SHA256[part], "vowels data")
    series, labels = read_ts(path)
    if len(series) != SIZES[part] or any(s.shape[1] != CHANNELS for s in series):
        raise TrainError(f"vowels data: {path} has {len(series)} cases, expected {SIZES[part]} of {CHANNELS} channels")
    return series, labels
