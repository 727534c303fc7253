"""`lstm demo`: the tutorial's example, run and explained step by step."""

from __future__ import annotations

from pprint import pprint

import torch

from .. import layers


def add_arguments(parser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--units", type=int, default=64, help="LSTM units (the tutorial's 64)")


def _stats(name: str, t: torch.Tensor) -> str:
    return f"  {name:<5} shape {tuple(t.shape)}  mean {t.mean():+.4f}  min {t.min():+.4f}  max {t.max():+.4f}"


def run(args) -> int:
    torch.manual_seed(args.seed)
    units = args.units
    print("The tutorial's example: a batch of 2 sentences, 80 words each, embedded in 100 dimensions.")
    x = torch.randn(2, 80, 100)
    xt = x[:, 0, :]
    cell = layers.LSTMCell(units)
    state = [torch.zeros(2, units), torch.zeros(2, units)]
    out, state = cell(xt, state)
    print(f"\n1. One step: cell = layers.LSTMCell({units}); out, state = cell(xt, [h0, c0])")
    print(f"   kernel {tuple(cell.kernel.shape)}, recurrent_kernel {tuple(cell.recurrent_kernel.shape)}, "
          f"bias {tuple(cell.bias.shape)}; gate blocks i | f | c | o")
    from .. import kernels

    problem = kernels.Recurrence(cell.cell_spec(), xt[:, None], cell.kernel, cell.recurrent_kernel, cell.bias,
                                 (torch.zeros(2, units), torch.zeros(2, units)), return_sequences=False, trace=True)
    with torch.no_grad(), kernels.use("reference"):
        gates = kernels.run(problem).trace
    names = {"f": "f_t   forget gate", "i": "i_t   input gate", "c_tilde": "C̃_t   candidate",
             "c": "C_t   cell state", "o": "o_t   output gate", "h": "h_t   output"}
    for key in ("f", "i", "c_tilde", "c", "o", "h"):
        print(_stats(names[key].split()[0], gates[key][:, 0]), "  ", names[key].split(None, 1)[1])
    print(f"   out is h_1: {torch.equal(out, state[0])}; with C_0 = 0, C_1 = i_1 * C̃_1: "
          f"{torch.allclose(gates['c'][:, 0], gates['i'][:, 0] * gates['c_tilde'][:, 0])}")
    print("\n2. cell.get_config(), exactly as the tutorial prints it:")
    pprint(cell.get_config(), sort_dicts=False)
    print(f"\n3. The whole sentence: layers.LSTM({units}, return_sequences=True, return_state=True)")
    layer = layers.LSTM(units, return_sequences=True, return_state=True)
    with torch.no_grad():
        y, h, c = layer(x)
    print(_stats("y", y))
    print(_stats("h_T", h))
    print(_stats("C_T", c))
    print(f"   the last output equals h_T: {torch.equal(y[:, -1], h)}")
    return 0
