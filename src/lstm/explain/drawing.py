"""The LSTM cell as the tutorial pictures it, drawn by code: the C line across the top with its ×
(forget) and + (input) nodes, the σ/tanh layers over the [h_{t-1}, x_t] line, and the output
path o_t * tanh(C_t) -> h_t."""

from __future__ import annotations

from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

from .figures import new_figure, save

C_LINE, BUS, LAYERS, MIX = 5.3, 1.0, 2.6, 4.1  # heights of the C line, the [h, x] line, the layers, i*C̃
LAYER_COLOUR, NODE_COLOUR, CELL_COLOUR = "#ffd966", "#f4b6c2", "#e8f1fb"


def _arrow(axis, start, end, colour="black", width=1.6):
    axis.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, lw=width, color=colour,
                                   shrinkA=0, shrinkB=0))


def _line(axis, points, colour="black", width=1.6):
    xs, ys = zip(*points)
    axis.plot(xs, ys, color=colour, lw=width, solid_capstyle="round")


def _layer(axis, x, y, text):
    """A neural-network layer (yellow box): σ or tanh of W[h_{t-1}, x_t] + b."""
    axis.add_patch(FancyBboxPatch((x - 0.4, y - 0.3), 0.8, 0.6, boxstyle="round,pad=0.05", fc=LAYER_COLOUR,
                                  ec="black", lw=1.2, zorder=3))
    axis.text(x, y, text, ha="center", va="center", fontsize=12, zorder=4)


def _node(axis, x, y, text):
    """A pointwise operation (pink circle): ×, + or tanh."""
    radius = 0.42 if text == "tanh" else 0.28
    axis.add_patch(Circle((x, y), radius, fc=NODE_COLOUR, ec="black", lw=1.2, zorder=3))
    axis.text(x, y, text, ha="center", va="center", fontsize=9 if text == "tanh" else 13, zorder=4)


def draw_cell(path) -> None:
    figure = new_figure(9.0, 6.9)
    axis = figure.subplots()
    axis.set_xlim(-0.6, 13.2)
    axis.set_ylim(-3.9, 7.0)
    axis.set_aspect("equal")
    axis.axis("off")
    axis.add_patch(FancyBboxPatch((1.0, 0.4), 10.2, 5.6, boxstyle="round,pad=0.1", fc=CELL_COLOUR, ec="#5b7fa8",
                                  lw=1.5))
    f_x, i_x, c_x, o_x, out_x = 2.6, 4.4, 5.8, 8.0, 9.4
    # the cell state line: C_{t-1} --×-- + --> C_t (the only path through time without a squashing layer)
    _line(axis, [(0.0, C_LINE), (f_x - 0.28, C_LINE)], width=3)
    _line(axis, [(f_x + 0.28, C_LINE), (c_x - 0.28, C_LINE)], width=3)
    _arrow(axis, (c_x + 0.28, C_LINE), (12.6, C_LINE), width=3)
    axis.text(-0.1, C_LINE + 0.3, r"$C_{t-1}$", fontsize=12)
    axis.text(12.0, C_LINE + 0.3, r"$C_t$", fontsize=12)
    _node(axis, f_x, C_LINE, "×")
    _node(axis, c_x, C_LINE, "+")
    # the [h_{t-1}, x_t] line feeding the four layers
    _line(axis, [(0.0, BUS), (o_x, BUS)])
    axis.text(-0.1, BUS - 0.45, r"$h_{t-1}$", fontsize=12)
    _line(axis, [(1.6, -0.6), (1.6, BUS)])
    axis.text(1.75, -0.7, r"$x_t$", fontsize=12)
    for x in (f_x, i_x, c_x, o_x):
        _arrow(axis, (x, BUS), (x, LAYERS - 0.35))
    _layer(axis, f_x, LAYERS, "σ")
    _layer(axis, i_x, LAYERS, "σ")
    _layer(axis, c_x, LAYERS, "tanh")
    _layer(axis, o_x, LAYERS, "σ")
    # forget gate: f_t scales C_{t-1}
    _arrow(axis, (f_x, LAYERS + 0.35), (f_x, C_LINE - 0.28))
    axis.text(f_x - 0.45, 3.7, r"$f_t$", fontsize=12, ha="right")
    # input gate and candidate: i_t * C̃_t is added to the C line
    _node(axis, c_x, MIX, "×")
    _line(axis, [(i_x, LAYERS + 0.35), (i_x, MIX)])
    _arrow(axis, (i_x, MIX), (c_x - 0.28, MIX))
    _arrow(axis, (c_x, LAYERS + 0.35), (c_x, MIX - 0.28))
    _arrow(axis, (c_x, MIX + 0.28), (c_x, C_LINE - 0.28))
    axis.text(i_x - 0.15, 3.7, r"$i_t$", fontsize=12, ha="right")
    axis.text(c_x + 0.15, 3.35, r"$\tilde{C}_t$", fontsize=12)
    # output: h_t = o_t * tanh(C_t)
    _node(axis, out_x, MIX, "tanh")
    _node(axis, out_x, LAYERS, "×")
    _arrow(axis, (out_x, C_LINE), (out_x, MIX + 0.42))
    _arrow(axis, (out_x, MIX - 0.42), (out_x, LAYERS + 0.28))
    _arrow(axis, (o_x + 0.45, LAYERS), (out_x - 0.28, LAYERS))
    axis.text(o_x + 0.5, LAYERS + 0.15, r"$o_t$", fontsize=12)
    _line(axis, [(out_x, LAYERS - 0.28), (out_x, BUS - 0.25), (11.8, BUS - 0.25)])
    _arrow(axis, (11.8, BUS - 0.25), (12.6, BUS - 0.25))
    axis.text(12.0, BUS - 0.7, r"$h_t$", fontsize=12)
    _line(axis, [(10.6, BUS - 0.25), (10.6, 6.0)])
    _arrow(axis, (10.6, 6.0), (10.6, 6.8))
    axis.text(10.75, 6.5, r"$h_t$", fontsize=12)
    # the tutorial's equations
    equations = (r"$f_t = \sigma(W_f\,[h_{t-1}, x_t] + b_f)$", r"$i_t = \sigma(W_i\,[h_{t-1}, x_t] + b_i)$",
                 r"$\tilde{C}_t = \tanh(W_C\,[h_{t-1}, x_t] + b_C)$", r"$C_t = f_t * C_{t-1} + i_t * \tilde{C}_t$",
                 r"$o_t = \sigma(W_o\,[h_{t-1}, x_t] + b_o)$", r"$h_t = o_t * \tanh(C_t)$")
    axis.text(3.2, -0.8, "\n".join(equations), fontsize=12, va="top", linespacing=1.6,
              bbox={"fc": "white", "ec": "#999999", "boxstyle": "round"})
    axis.set_title("The LSTM cell (yellow: layers with weights; pink: pointwise operations)", fontsize=11)
    save(figure, path)
