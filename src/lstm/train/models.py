"""The model of each task, built from this library's Keras layers. Every builder takes the task's
hyper-parameters (a JSON dict saved in the checkpoint) and builds all weights at once, so that a
checkpoint can be loaded and DistributedDataParallel can wrap the model before the first call."""

from __future__ import annotations

import torch
from torch import nn

from .. import layers
from ..long_sequences import recomputed, truncated_bptt
from ..models import Sequential


class LongSequenceLSTM(layers.LSTM):
    """The LSTM layer, whose forward with gradients runs in chunks: the state detached every `bptt`
    steps (truncated BPTT, `lstm.truncated_bptt`) and/or each `recompute`-step chunk recomputed in
    the backward instead of stored (`lstm.recomputed`). Without gradients it is the plain layer; its
    weights and their names are the LSTM's, so checkpoints do not depend on these options."""

    def __init__(self, units, bptt: int = 0, recompute: int = 0, **kwargs):
        super().__init__(units, **kwargs)
        self.bptt, self.recompute = bptt, recompute

    def forward(self, inputs, mask=None, initial_state=None, training=None):
        if not torch.is_grad_enabled():
            return super().forward(inputs, mask=mask, initial_state=initial_state, training=training)
        if self.bptt:
            return truncated_bptt(self, inputs, self.bptt, mask, initial_state, training, self.recompute or None)
        return recomputed(self, inputs, self.recompute, mask, initial_state, training)


def lstm_layer(units: int, hp: dict, **kwargs) -> layers.LSTM:
    """An LSTM layer; a LongSequenceLSTM when the run asks for --bptt or --recompute."""
    if hp.get("bptt") or hp.get("recompute"):
        return LongSequenceLSTM(units, bptt=hp.get("bptt") or 0, recompute=hp.get("recompute") or 0, **kwargs)
    return layers.LSTM(units, **kwargs)


def text_classifier(vocab_size: int, classes: int, hp: dict) -> Sequential:
    """The tutorial's model: Embedding(vocab, 100, mask_zero) -> LSTM(64) -> Dense (1 logit for two
    classes, else one per class)."""
    return Sequential([
        layers.Embedding(vocab_size, hp["embedding"], mask_zero=True, name="embedding"),
        layers.Dropout(hp["dropout"], name="embedding_dropout"),
        layers.LSTM(hp["units"], input_dim=hp["embedding"], recurrent_dropout=0.0, name="lstm"),
        layers.Dropout(hp["dropout"], name="dropout"),
        layers.Dense(1 if classes == 2 else classes, input_dim=hp["units"], name="output"),
    ], name="text_classifier")


def sequence_classifier(channels: int, classes: int, hp: dict) -> Sequential:
    """LSTM over a (masked, variable-length) multichannel series -> Dense(classes)."""
    return Sequential([
        layers.LSTM(hp["units"], input_dim=channels, name="lstm"),
        layers.Dropout(hp["dropout"], name="dropout"),
        layers.Dense(classes, input_dim=hp["units"], name="output"),
    ], name="sequence_classifier")


def sequence_regressor(channels: int, outputs: int, hp: dict) -> Sequential:
    """LSTM -> Dense(outputs): the adding problem's single number."""
    return Sequential([
        lstm_layer(hp["units"], hp, input_dim=channels, name="lstm"),
        layers.Dense(outputs, input_dim=hp["units"], name="output"),
    ], name="sequence_regressor")


def sequence_tagger(vocab_size: int, hp: dict) -> Sequential:
    """Embedding -> LSTM(return_sequences) -> Dense(vocab) at every step: the copy task."""
    return Sequential([
        layers.Embedding(vocab_size, hp["embedding"], name="embedding"),
        layers.LSTM(hp["units"], input_dim=hp["embedding"], return_sequences=True, name="lstm"),
        layers.Dense(vocab_size, input_dim=hp["units"], name="output"),
    ], name="sequence_tagger")


class Forecaster(nn.Module):
    """Multi-step forecaster in scaled units: seasonal naive (the value one season before each target
    step) + a linear autoregressive correction from the last `ar` seasonal differences (LSTNet's
    "highway") + the LSTM's correction: an LSTM reads the last `read` steps (each: its change from
    one season and from one `day` before; changes, not levels, so that a shift of level between
    train and test does not move the inputs) and Dense(horizon) maps its last output to the horizon."""

    def __init__(self, hp: dict):
        super().__init__()
        self.season, self.horizon = hp["season"], hp["horizon"]
        self.read = min(hp.get("read") or self.season, self.season)
        self.ar = min(hp.get("ar") or 0, self.season)
        self.day = max(1, min(hp.get("day") or self.season // 7, self.season))
        self.net = Sequential([
            lstm_layer(hp["units"], hp, input_dim=2, name="lstm"),
            layers.Dense(hp["horizon"], input_dim=hp["units"], kernel_initializer="zeros", name="output"),
        ], name="forecaster")
        self.highway = layers.Dense(hp["horizon"], input_dim=self.ar, kernel_initializer="zeros",
                                    name="highway") if self.ar else None

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        """window [B, 2 * season] (scaled) -> forecast [B, horizon] (scaled)."""
        naive = seasonal_naive(window, self.season, self.horizon)
        end = window.shape[1]
        recent = window[:, -self.read:]
        change = recent - window[:, end - self.read - self.season: end - self.season]
        daily = recent - window[:, end - self.read - self.day: end - self.day]
        out = naive + self.net(torch.stack([change, daily], dim=-1))
        if self.highway is not None:
            out = out + self.highway(change[:, -self.ar:] if self.ar <= self.read else
                                     (window[:, -self.ar:] - window[:, -self.ar - self.season:-self.season]))
        return out


def seasonal_naive(window: torch.Tensor, season: int, horizon: int) -> torch.Tensor:
    """The value one season before each of the `horizon` steps after the window."""
    start = window.shape[1] - season
    index = start + (torch.arange(horizon) % season)
    return window[:, index]


class CharLM(nn.Module):
    """Character language model: Embedding -> LSTM(return_sequences, return_state) -> Dense(vocab).
    `forward(ids, state)` returns (logits [B, T, V], state) so generation can go on step by step."""

    def __init__(self, vocab_size: int, hp: dict):
        super().__init__()
        self.embedding = layers.Embedding(vocab_size, hp["embedding"], name="embedding")
        self.lstm = lstm_layer(hp["units"], hp, input_dim=hp["embedding"], return_sequences=True,
                               return_state=True, name="lstm")
        self.dropout = layers.Dropout(hp["dropout"], name="dropout")
        self.output = layers.Dense(vocab_size, input_dim=hp["units"], name="output")

    def forward(self, ids: torch.Tensor, state=None):
        outputs, h, c = self.lstm(self.embedding(ids), initial_state=state)
        return self.output(self.dropout(outputs)), [h, c]


def keras_model(model: nn.Module, task: str, file_format: str = "Keras") -> Sequential:
    """The task's model as a Sequential of Keras' layers (for a Keras or ONNX file): the Sequential
    models as they are; the character model without its state output (Keras' Sequential returns one
    tensor), the same logits. The forecaster has none: its seasonal naive forecast and highway are
    not layers."""
    if isinstance(model, Sequential):
        return model
    if isinstance(model, CharLM):
        lstm = layers.LSTM.from_config({**model.lstm.get_config(), "return_state": False})
        lstm.set_weights(model.lstm.get_weights())
        return Sequential([model.embedding, lstm, model.dropout, model.output], name=task)
    raise ValueError(f"the {task} model ({type(model).__name__}) has no {file_format} equivalent: it adds a seasonal "
                     "naive forecast and a linear highway to its LSTM's output, which no Keras layer computes")


def architecture(model: nn.Module) -> dict:
    """Parameter names and shapes: what a checkpoint must match to load into `model`."""
    return {name: list(t.shape) for name, t in model.state_dict().items()}
