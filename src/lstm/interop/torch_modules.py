"""Conversion between this library's layers (Keras' weight layout) and torch.nn's recurrent modules.

`to_torch(layer)` gives `torch.nn.LSTM`/`GRU`/`RNN` (batch_first=True) for a layer, a
Bidirectional (bidirectional=True) or a stack (a list or Sequential of same-kind layers ->
num_layers), and `torch.nn.LSTMCell`/`GRUCell`/`RNNCell` for a cell. `from_torch(module)` goes
back: a layer with return_sequences=True (torch returns every step), a Bidirectional for
bidirectional=True, a Sequential for num_layers > 1 (with Dropout layers between them when the
torch module has inter-layer dropout).

Weights (FORMATS.md section 4): torch keeps W [G*U, D] (transposed) and two biases; Keras one
bias, so Keras -> torch puts the bias in `bias_ih` with `bias_hh = 0`, and torch -> Keras sums
them. LSTM gate order is the same (i, f, c/g, o). GRU: Keras z | r | h, torch r | z | n, and
Keras' reset_after=True bias [2, 3U] is exactly (bias_ih, bias_hh); reset_after=False has no
torch equivalent. Only tanh / sigmoid layers convert (and SimpleRNN relu, which torch has).
"""

from __future__ import annotations

from typing import Iterable, Union

import torch
from torch import nn

from ..layers import (GRU, LSTM, RNN, Bidirectional, Dropout, GRUCell, InputLayer, LSTMCell, RecurrentCell,
                      SimpleRNN, SimpleRNNCell)
from ..models import Sequential
from ..serialization import FLOAT_DTYPES

_TORCH_LAYER = {"lstm": nn.LSTM, "gru": nn.GRU, "simple_rnn": nn.RNN}
_TORCH_CELL = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "simple_rnn": nn.RNNCell}


def _gru_to_torch(t: torch.Tensor, units: int) -> torch.Tensor:
    """Keras z | r | h blocks (last axis) to torch r | z | n."""
    return torch.cat([t[..., units:2 * units], t[..., :units], t[..., 2 * units:]], dim=-1)


def _gru_to_keras(t: torch.Tensor, units: int) -> torch.Tensor:
    """torch r | z | n blocks (last axis) to Keras z | r | h (the same swap)."""
    return _gru_to_torch(t, units)


# ----- to torch ---------------------------------------------------------------------------------
def _check_cell(cell: RecurrentCell, where: str) -> None:
    if not cell.built:
        raise ValueError(f"{where}: the layer has no weights yet; call it once or build() it before converting")
    if cell.kind == "simple_rnn":
        if cell.activation not in ("tanh", "relu"):
            raise ValueError(f"{where}: SimpleRNN activation {cell.activation!r} has no torch.nn.RNN equivalent "
                             "(tanh or relu)")
    else:
        if cell.activation != "tanh" or cell.recurrent_activation != "sigmoid":
            raise ValueError(f"{where}: only activation='tanh' with recurrent_activation='sigmoid' converts to "
                             f"torch.nn, got {cell.activation!r} / {cell.recurrent_activation!r}")
    if cell.kind == "gru" and not cell.reset_after:
        raise ValueError(f"{where}: GRU(reset_after=False) has no torch.nn.GRU equivalent (torch applies the reset "
                         "gate after the recurrent matmul); use reset_after=True")
    if cell.dropout or cell.recurrent_dropout:
        raise ValueError(f"{where}: dropout={cell.dropout}, recurrent_dropout={cell.recurrent_dropout}: torch.nn has no "
                         "per-call (variational) dropout inside the recurrence; set them to 0 to convert")
    variants = {k: v for k, v in cell.variants().items() if k != "proj_size"} if cell.kind == "lstm" else {}
    if variants:
        raise ValueError(f"{where}: the LSTM variant options {variants} have no torch.nn.LSTM equivalent (proj_size "
                         "alone converts)")


def _torch_weights(cell: RecurrentCell) -> dict:
    """weight_ih, weight_hh, bias_ih, bias_hh in torch's layout (detached copies)."""
    units = cell.units
    kernel, recurrent = cell.kernel.detach(), cell.recurrent_kernel.detach()
    if cell.kind == "gru":
        kernel, recurrent = _gru_to_torch(kernel, units), _gru_to_torch(recurrent, units)
    weights = {"weight_ih": kernel.t().contiguous(), "weight_hh": recurrent.t().contiguous()}
    if cell.use_bias:
        bias = cell.bias.detach()
        if cell.kind == "gru":
            weights["bias_ih"], weights["bias_hh"] = _gru_to_torch(bias[0], units), _gru_to_torch(bias[1], units)
        else:
            weights["bias_ih"], weights["bias_hh"] = bias.clone(), torch.zeros_like(bias)
    if getattr(cell, "proj_size", 0):
        weights["weight_hr"] = cell.projection_kernel.detach().t().contiguous()
    return weights


def _copy_into(module: nn.Module, weights: dict, suffix: str) -> None:
    with torch.no_grad():
        for name, value in weights.items():
            getattr(module, name + suffix).copy_(value)


def _layers_of(stack) -> list:
    items = list(stack.layers) if isinstance(stack, Sequential) else list(stack)
    return [m for m in items if not isinstance(m, (InputLayer, Dropout))]


def _dropouts_of(stack) -> list:
    items = list(stack.layers) if isinstance(stack, Sequential) else list(stack)
    return [m.rate for m in items if isinstance(m, Dropout)]


def to_torch(layer_or_stack: Union[nn.Module, Iterable[nn.Module]]) -> nn.Module:
    """A torch.nn recurrent module with the same weights (see the module docstring).

    Layers give `nn.LSTM`/`nn.GRU`/`nn.RNN` with batch_first=True, which return every step's
    output and the final states: the Keras layer's last output is `out[:, -1]` (for a forward
    layer). Masks, go_backwards, stateful carrying and dropout have no torch.nn equivalent:
    go_backwards layers and nonzero dropouts are refused. Dropout layers between stacked layers
    become torch's inter-layer `dropout` (one rate for all).
    """
    if isinstance(layer_or_stack, RecurrentCell):
        cell = layer_or_stack
        _check_cell(cell, f"cell {cell.name!r}")
        if cell.output_size != cell.units:
            raise ValueError(f"cell {cell.name!r}: torch.nn.LSTMCell has no proj_size; convert an LSTM layer instead")
        kwargs = {"nonlinearity": cell.activation} if cell.kind == "simple_rnn" else {}
        module = _TORCH_CELL[cell.kind](cell.input_dim, cell.units, bias=cell.use_bias, dtype=cell.kernel.dtype,
                                        device=cell.kernel.device, **kwargs)
        _copy_into(module, _torch_weights(cell), "")
        return module
    if isinstance(layer_or_stack, (RNN, Bidirectional)):
        stack = [layer_or_stack]
        dropouts = []
    elif isinstance(layer_or_stack, (Sequential, list, tuple)):
        stack = _layers_of(layer_or_stack)
        dropouts = _dropouts_of(layer_or_stack)
        if not stack:
            raise ValueError("to_torch: no recurrent layers to convert")
    else:
        raise TypeError(f"to_torch: expected a recurrent layer, cell, Bidirectional, or a list/Sequential of them, "
                        f"got {type(layer_or_stack).__name__}")
    directions, cells = [], []
    for k, layer in enumerate(stack):
        where = f"layer {getattr(layer, 'name', k)!r}"
        if isinstance(layer, Bidirectional):
            if layer.merge_mode != "concat":
                raise ValueError(f"{where}: merge_mode={layer.merge_mode!r}; torch concatenates the two directions "
                                 "(merge_mode='concat' only)")
            pair = [layer.forward_layer, layer.backward_layer]
            directions.append(2)
        elif isinstance(layer, RNN):
            if layer.go_backwards:
                raise ValueError(f"{where}: go_backwards=True has no torch.nn equivalent (use Bidirectional)")
            pair = [layer]
            directions.append(1)
        else:
            raise ValueError(f"{where}: {type(layer).__name__} is not a recurrent layer; to_torch converts stacks of "
                             "LSTM/GRU/SimpleRNN/Bidirectional layers only")
        for sub in pair:
            _check_cell(sub.cell, where)
        cells.append([sub.cell for sub in pair])
        if k < len(stack) - 1 and not layer.return_sequences:
            raise ValueError(f"{where}: a stacked layer below the top needs return_sequences=True")
    first = cells[0][0]
    for k, pair in enumerate(cells):
        for cell in pair:
            same = (cell.kind == first.kind and cell.units == first.units and cell.use_bias == first.use_bias
                    and cell.activation == first.activation and cell.kernel.dtype == first.kernel.dtype
                    and cell.output_size == first.output_size)
            if not same or directions[k] != directions[0]:
                raise ValueError(f"to_torch: stacked layers must all be the same kind, units, proj_size, use_bias, "
                                 f"activation, dtype and direction count; layer {k} differs")
        if k > 0 and pair[0].input_dim != first.output_size * directions[0]:
            raise ValueError(f"to_torch: layer {k} has input size {pair[0].input_dim}, expected "
                             f"{first.output_size * directions[0]}")
    if len(set(dropouts)) > 1 or len(dropouts) > max(len(stack) - 1, 0):
        raise ValueError(f"to_torch: torch applies one inter-layer dropout rate between stacked layers; got Dropout "
                         f"rates {dropouts}")
    kwargs = {"nonlinearity": first.activation} if first.kind == "simple_rnn" else {}
    if first.output_size != first.units:
        kwargs["proj_size"] = first.output_size
    module = _TORCH_LAYER[first.kind](
        first.input_dim, first.units, num_layers=len(stack), bias=first.use_bias, batch_first=True,
        dropout=dropouts[0] if dropouts else 0.0, bidirectional=directions[0] == 2, dtype=first.kernel.dtype,
        device=first.kernel.device, **kwargs)
    for k, pair in enumerate(cells):
        for direction, cell in enumerate(pair):
            _copy_into(module, _torch_weights(cell), f"_l{k}" + ("_reverse" if direction else ""))
    return module


# ----- from torch -------------------------------------------------------------------------------
def _kind_of(module: nn.Module) -> str:
    for kind, classes in (("lstm", (nn.LSTM, nn.LSTMCell)), ("gru", (nn.GRU, nn.GRUCell)),
                          ("simple_rnn", (nn.RNN, nn.RNNCell))):
        if isinstance(module, classes):
            return kind
    raise TypeError(f"from_torch: expected torch.nn.LSTM/GRU/RNN or LSTMCell/GRUCell/RNNCell, got "
                    f"{type(module).__name__}")


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in FLOAT_DTYPES.values():
        raise ValueError(f"from_torch: weights of dtype {dtype} are not supported (one of {list(FLOAT_DTYPES)})")
    return str(dtype).removeprefix("torch.")


def _keras_weights(kind: str, units: int, w_ih, w_hh, b_ih, b_hh) -> list:
    # in float32 or float64: NumPy has no bfloat16, and torch's two LSTM biases are summed unrounded
    w_ih, w_hh = (w.detach().to(torch.promote_types(w.dtype, torch.float32)) for w in (w_ih, w_hh))
    b_ih, b_hh = (None if b is None else b.to(torch.promote_types(b.dtype, torch.float32)) for b in (b_ih, b_hh))
    if kind == "gru":
        kernel, recurrent = _gru_to_keras(w_ih.t(), units), _gru_to_keras(w_hh.t(), units)
    else:
        kernel, recurrent = w_ih.t(), w_hh.t()
    weights = [kernel.contiguous(), recurrent.contiguous()]
    if b_ih is not None:
        b_ih, b_hh = b_ih.detach(), b_hh.detach()
        if kind == "gru":
            weights.append(torch.stack([_gru_to_keras(b_ih, units), _gru_to_keras(b_hh, units)]))
        else:
            weights.append(b_ih + b_hh)
    return [w.cpu().numpy() for w in weights]


def _cell_kwargs(kind: str, module: nn.Module) -> dict:
    kwargs = {"use_bias": module.bias, "dtype": _dtype_name(module.weight_ih_l0.dtype if hasattr(module, "weight_ih_l0")
                                                             else module.weight_ih.dtype)}
    if kind == "simple_rnn":
        kwargs["activation"] = module.nonlinearity
    if kind == "gru":
        kwargs["reset_after"] = True
    if getattr(module, "proj_size", 0):
        kwargs["proj_size"] = module.proj_size
    return kwargs


def from_torch(module: nn.Module):
    """This library's layer(s) with the weights of a torch.nn recurrent module.

    - `nn.LSTMCell`/`GRUCell`/`RNNCell` -> `LSTMCell`/`GRUCell`/`SimpleRNNCell`.
    - `nn.LSTM`/`GRU`/`RNN` -> `LSTM`/`GRU`/`SimpleRNN` with return_sequences=True (inputs are
      [batch, time, features] whatever the torch module's batch_first); bidirectional=True ->
      `Bidirectional(merge_mode='concat')`; num_layers > 1 -> a `Sequential` of layers, with a
      `Dropout` between them when the torch module has inter-layer dropout.
    - `nn.LSTM(proj_size=P)` -> `LSTM(proj_size=P)` (the projection is `projection_kernel`).
    """
    kind = _kind_of(module)
    if isinstance(module, (nn.LSTMCell, nn.GRUCell, nn.RNNCell)):
        cls = {"lstm": LSTMCell, "gru": GRUCell, "simple_rnn": SimpleRNNCell}[kind]
        cell = cls(module.hidden_size, input_dim=module.input_size, **_cell_kwargs(kind, module))
        cell.set_weights(_keras_weights(kind, module.hidden_size, module.weight_ih, module.weight_hh,
                                        module.bias_ih if module.bias else None,
                                        module.bias_hh if module.bias else None))
        return cell
    cls = {"lstm": LSTM, "gru": GRU, "simple_rnn": SimpleRNN}[kind]
    units = module.hidden_size
    proj_size = getattr(module, "proj_size", 0)
    directions = 2 if module.bidirectional else 1
    built = []
    for k in range(module.num_layers):
        input_dim = module.input_size if k == 0 else (proj_size or units) * directions
        subs = []
        for direction in range(directions):
            suffix = f"_l{k}" + ("_reverse" if direction else "")
            layer = cls(units, return_sequences=True, input_dim=input_dim, **_cell_kwargs(kind, module))
            weights = _keras_weights(
                kind, units, getattr(module, "weight_ih" + suffix), getattr(module, "weight_hh" + suffix),
                getattr(module, "bias_ih" + suffix) if module.bias else None,
                getattr(module, "bias_hh" + suffix) if module.bias else None)
            if proj_size:
                weights.append(getattr(module, "weight_hr" + suffix).detach().t().cpu().numpy())
            layer.set_weights(weights)
            subs.append(layer)
        if directions == 2:
            wrapper = Bidirectional(subs[0], merge_mode="concat", backward_layer=_as_backward(cls, subs[1], kind, module,
                                                                                              input_dim))
            wrapper.forward_layer.set_weights(subs[0].get_weights())
            built.append(wrapper)
        else:
            built.append(subs[0])
    if module.num_layers == 1:
        return built[0]
    stacked = []
    for k, layer in enumerate(built):
        stacked.append(layer)
        if module.dropout and k < len(built) - 1:
            stacked.append(Dropout(module.dropout))
    return Sequential(stacked)


def _as_backward(cls, layer, kind, module, input_dim):
    backward = cls(module.hidden_size, return_sequences=True, go_backwards=True, input_dim=input_dim,
                   name="backward_" + layer.name, **_cell_kwargs(kind, module))
    backward.set_weights(layer.get_weights())
    return backward


__all__ = ["to_torch", "from_torch"]
