"""Simple baselines, computed by the same command on the same splits and reported beside the model."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _softmax_regression(train_x, train_y, classes: int, weight_decay: float, make_logits, parameters, steps=100):
    optimizer = torch.optim.LBFGS(parameters, lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = make_logits(train_x)
        loss = F.cross_entropy(logits, train_y) + weight_decay * sum((p ** 2).sum() for p in parameters[:1])
        loss.backward()
        return loss

    optimizer.step(closure)


def bag_of_words_logistic(ids: dict, labels: dict, vocab_size: int, classes: int, seed: int = 0) -> dict:
    """Logistic regression on binary bag-of-words features (which vocabulary words occur), L2 strength
    chosen on the validation split; accuracy on validation and test. `ids`: split -> [N, T] (0 = pad)."""
    torch.manual_seed(seed)

    def bags(x):
        x = torch.as_tensor(x)
        rows = []
        for row in x:
            words = torch.unique(row[row > 0])
            rows.append(words)
        offsets = torch.tensor([0] + [len(r) for r in rows[:-1]]).cumsum(0)
        return torch.cat(rows), offsets

    data = {split: bags(ids[split]) for split in ("train", "val", "test")}
    y = {split: torch.as_tensor(labels[split]).long() for split in labels}
    best = None
    for weight_decay in (1e-4, 3e-4, 1e-3, 3e-3):
        weights = torch.zeros(vocab_size, classes, requires_grad=True)
        bias = torch.zeros(classes, requires_grad=True)

        def logits_of(bag, weights=weights, bias=bias):
            return F.embedding_bag(bag[0], weights, bag[1], mode="sum") + bias

        _softmax_regression(data["train"], y["train"], classes, weight_decay, logits_of, [weights, bias])
        with torch.no_grad():
            acc = {s: (logits_of(data[s]).argmax(1) == y[s]).float().mean().item() for s in ("val", "test")}
        if best is None or acc["val"] > best["val_accuracy"]:
            best = {"name": "bag-of-words logistic regression", "l2": weight_decay,
                    "val_accuracy": acc["val"], "test_accuracy": acc["test"]}
    return best


def features_logistic(features: dict, labels: dict, classes: int, name: str) -> dict:
    """Softmax regression on fixed feature vectors (standardized on train), L2 chosen on validation."""
    mean = features["train"].mean(0)
    std = features["train"].std(0) + 1e-8
    x = {s: (torch.as_tensor(f) - mean) / std for s, f in features.items()}
    y = {s: torch.as_tensor(v).long() for s, v in labels.items()}
    best = None
    for weight_decay in (1e-4, 1e-3, 1e-2, 1e-1):
        weights = torch.zeros(x["train"].shape[1], classes, requires_grad=True)
        bias = torch.zeros(classes, requires_grad=True)

        def logits_of(v, weights=weights, bias=bias):
            return v @ weights + bias

        _softmax_regression(x["train"], y["train"], classes, weight_decay, logits_of, [weights, bias])
        with torch.no_grad():
            acc = {s: (logits_of(x[s]).argmax(1) == y[s]).float().mean().item() for s in ("val", "test")}
        if best is None or acc["val"] > best["val_accuracy"]:
            best = {"name": name, "l2": weight_decay, "val_accuracy": acc["val"], "test_accuracy": acc["test"]}
    return best


def majority(train_labels, test_labels) -> dict:
    train_labels = np.asarray(train_labels)
    most = np.bincount(train_labels).argmax()
    return {"name": "majority class", "class": int(most), "test_accuracy": float(np.mean(np.asarray(test_labels) == most))}


def char_ngram(train: np.ndarray, test: np.ndarray, vocab_size: int) -> dict:
    """Unigram and bigram (add-one) cross-entropy, nats per character, on the test text."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1
    unigram = -np.mean(np.log(counts / counts.sum())[test])
    pairs = np.zeros((vocab_size, vocab_size))
    np.add.at(pairs, (train[:-1], train[1:]), 1)
    pairs += 1
    probs = pairs / pairs.sum(1, keepdims=True)
    bigram = -np.mean(np.log(probs[test[:-1], test[1:]]))
    return {"name": "character bigram (add-one)", "test_loss": float(bigram), "unigram_test_loss": float(unigram),
            "test_bits_per_char": float(bigram / math.log(2))}
