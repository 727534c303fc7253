"""`lstm explain`: the gate table asserted row by row, gate traces against the tutorial's equations,
gradient norms against theory, clipping, the memory training, and the command end to end (--quick)."""

import json
import struct

import numpy as np
import pytest
import torch

import lstm.kernels
from lstm import layers
from lstm.cli import main
from lstm.explain import gate_table, gradients, recording_gates, training
from lstm.explain.runs import trace_run
from lstm.models import Sequential


# ---------------------------------------------------------------------------------------------- gates

@pytest.mark.parametrize("input_gate,forget_gate,formula", [(0, 1, "memory"), (1, 1, "sum"), (0, 0, "zero"),
                                                            (1, 0, "candidate")])
def test_gate_table_row_is_exact_with_hard_sigmoid(input_gate, forget_gate, formula):
    layer = gate_table.switched_lstm(5)
    values = torch.rand(8, 2, generator=torch.Generator().manual_seed(1)) * 2 - 1
    x = gate_table.flagged_inputs(values, torch.tensor([[1.0, input_gate]]).expand(8, 2),
                                  torch.tensor([[0.0, forget_gate]]).expand(8, 2))
    with torch.no_grad():
        _, gates = layer(x, return_gates=True)
    c_prev, c_tilde, c_t = gates["c"][:, 0], gates["c_tilde"][:, 1], gates["c"][:, 1]
    assert torch.equal(gates["i"][:, 1], torch.full_like(c_t, input_gate))
    assert torch.equal(gates["f"][:, 1], torch.full_like(c_t, forget_gate))
    assert c_prev.abs().min() > 0 and c_tilde.abs().min() > 0  # the test would be empty otherwise
    expected = {"memory": c_prev, "sum": c_prev + c_tilde, "zero": torch.zeros_like(c_t), "candidate": c_tilde}
    assert torch.equal(c_t, expected[formula])


def test_gate_table_numbers_hard_sigmoid_exact_sigmoid_within_its_saturation():
    exact, approximate = gate_table.run_table("hard_sigmoid"), gate_table.run_table("sigmoid")
    assert [(r.input_gate, r.forget_gate) for r in exact] == [(0, 1), (1, 1), (0, 0), (1, 0)]
    assert all(r.max_error == 0.0 for r in exact)
    assert all(r.max_error < 1e-8 for r in approximate) and max(r.max_error for r in approximate) > 0
    memory_only = exact[0]
    assert memory_only.example[2] == memory_only.example[0]  # C_t = C_{t-1}
    assert exact[2].example[2] == 0.0 and exact[3].example[2] == exact[3].example[1]


def test_gate_table_story_keeps_adds_overwrites_and_clears():
    story = gate_table.run_story()
    c, c_tilde = story["c"], story["c_tilde"]
    for t, (*_, label) in enumerate(gate_table.STORY):
        previous = c[t - 1] if t else 0.0
        expected = {"write": c_tilde[t], "overwrite": c_tilde[t], "keep": previous, "clear": 0.0,
                    "add": np.float32(previous) + np.float32(c_tilde[t])}[label]
        assert c[t] == expected, (t, label)  # exact: the gates are exactly 0 and 1


def test_unknown_recurrent_activation_is_refused():
    with pytest.raises(ValueError, match="recurrent_activation"):
        gate_table.switched_lstm(2, "tanh")


# --------------------------------------------------------------------------------------------- traces

def _tutorial_lstm(layer, x):
    """The tutorial's equations written out, from the layer's Keras weights."""
    kernel, recurrent, bias = (w.detach() for w in layer.cell.weights())
    units = recurrent.shape[0]
    h = c = torch.zeros(x.shape[0], units)
    keys = {k: [] for k in ("i", "f", "c_tilde", "c", "o", "h")}
    for t in range(x.shape[1]):
        z = x[:, t] @ kernel + h @ recurrent + bias
        i, f, c_tilde, o = (z[:, k * units:(k + 1) * units] for k in range(4))
        i, f, c_tilde, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(c_tilde), torch.sigmoid(o)
        c = f * c + i * c_tilde
        h = o * torch.tanh(c)
        for key, value in zip(keys, (i, f, c_tilde, c, o, h)):
            keys[key].append(value)
    return {k: torch.stack(v, 1) for k, v in keys.items()}


def _tutorial_gru(layer, x):
    kernel, recurrent, bias = (w.detach() for w in layer.cell.weights())
    units = recurrent.shape[0]
    h = torch.zeros(x.shape[0], units)
    hs, zs = [], []
    for t in range(x.shape[1]):
        xz, xr, xh = (x[:, t] @ kernel + bias[0]).chunk(3, -1)
        hz, hr, hh = (h @ recurrent + bias[1]).chunk(3, -1)
        z, r = torch.sigmoid(xz + hz), torch.sigmoid(xr + hr)
        h = z * h + (1 - z) * torch.tanh(xh + r * hh)
        hs.append(h)
        zs.append(z)
    return torch.stack(zs, 1), torch.stack(hs, 1)


def test_recorded_traces_equal_the_tutorial_equations_for_every_layer_of_a_model():
    torch.manual_seed(0)
    model = Sequential([layers.LSTM(6, input_dim=3, return_sequences=True, name="first"),
                        layers.Bidirectional(layers.GRU(4, return_sequences=True, name="gru"), input_shape=6),
                        layers.Dense(1, input_dim=8)])
    x = torch.randn(2, 7, 3)
    with torch.no_grad():
        with recording_gates(model) as traces:
            model(x)
        hidden = model[0](x)
    assert set(traces) == {"first", "forward_gru", "backward_gru"}
    expected = _tutorial_lstm(model[0], x)
    assert set(traces["first"]) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(traces["first"][key], value, atol=1e-5, rtol=1e-5)
    z, h = _tutorial_gru(model[1].forward_layer, hidden)
    torch.testing.assert_close(traces["forward_gru"]["z"], z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(traces["forward_gru"]["h"], h, atol=1e-5, rtol=1e-5)
    _, h_back = _tutorial_gru(model[1].backward_layer, hidden.flip(1))  # processing order: reversed time
    torch.testing.assert_close(traces["backward_gru"]["h"], h_back, atol=1e-5, rtol=1e-5)


def test_traces_cost_nothing_when_not_requested(monkeypatch):
    layer = layers.LSTM(4, input_dim=3, return_sequences=True, name="traced")
    seen = []
    run = lstm.kernels.run

    def spy(problem):
        result = run(problem)
        seen.append((problem.trace, result.trace))
        return result

    monkeypatch.setattr(lstm.kernels, "run", spy)
    x = torch.randn(2, 5, 3)
    layer(x)
    assert seen[-1] == (False, None) and layer.last_gates is None  # no trace computed, none kept
    with recording_gates(layer) as traces:
        layer(x)
        assert seen[-1][0] is True and layer.last_gates is not None
    assert traces["traced"]["c"].shape == (2, 5, 4)
    assert layer.record_gates is False and layer.last_gates is None  # put back: nothing kept
    layer(x)
    assert seen[-1] == (False, None) and layer.last_gates is None


def test_recording_a_model_without_recurrent_layers_is_an_error():
    with pytest.raises(ValueError, match="no recurrent layer"):
        with recording_gates(layers.Dense(2, input_dim=3)):
            pass


# ------------------------------------------------------------------------------------------ gradients

@pytest.mark.parametrize("radius", [0.9, 1.1])
def test_jacobian_product_of_a_linear_rnn_is_rho_to_the_k(radius):
    norms = gradients.jacobian_product_norms(radius, "linear", units=16, steps=25)
    k = np.arange(1, 26)
    np.testing.assert_allclose(norms, radius ** k, rtol=1e-4)
    assert (norms[-1] < 0.1) if radius < 1 else (norms[-1] > 10)  # vanished / exploded


def test_tanh_shrinks_the_jacobian_product_below_rho_to_the_k():
    norms = gradients.jacobian_product_norms(0.9, "tanh", units=16, steps=25)
    assert np.all(np.isfinite(norms)) and np.all(norms <= 0.9 ** np.arange(1, 26) * (1 + 1e-5))
    assert norms[-1] < norms[0] * 1e-2


def test_state_gradients_decay_as_rho_to_the_distance_in_a_linear_rnn():
    """h_t = h_{t-1} ρQ + x_t W: ∂L/∂h_t = (ρQ)^(T-t) ∂L/∂h_T, so its norm is ρ^distance times the last."""
    torch.manual_seed(0)
    model = Sequential([layers.SimpleRNN(16, activation="linear", input_dim=2), layers.Dense(1, input_dim=16)])
    with torch.no_grad():
        model[0].cell.recurrent_kernel.copy_(gradients.scaled_orthogonal(16, 0.9, seed=3))
    x, y = training.examples("adding", 30, 8, torch.Generator().manual_seed(0))
    norms = gradients.state_gradient_norms(model, x, y)["h"]
    distance = np.arange(30)[::-1]
    np.testing.assert_allclose(norms / norms[-1], 0.9 ** distance, rtol=1e-4)


def test_state_gradient_is_the_total_derivative_through_the_rest_of_the_sequence():
    """∂L/∂(h_t, C_t) from the probes equals the gradient with respect to the initial state of the
    layer run over the remaining steps (the layer's own sequence kernel and BPTT)."""
    torch.manual_seed(1)
    model = training.build_model("lstm", "adding", 8, seed=1)
    x, y = training.examples("adding", 12, 1, torch.Generator().manual_seed(2))
    norms = gradients.state_gradient_norms(model, x, y)
    t = 5
    prefix = layers.LSTM.from_config(dict(model[0].get_config(), return_state=True))
    prefix.set_weights(model[0].get_weights())
    with torch.no_grad():
        _, h, c = prefix(x[:, :t])
    h, c = h.clone().requires_grad_(True), c.clone().requires_grad_(True)
    rest = model[0](x[:, t:], initial_state=[h, c])
    dh, dc = torch.autograd.grad(((model[1](rest) - y) ** 2).sum(), [h, c])
    assert norms["h"][t - 1] == pytest.approx(dh.norm().item(), rel=1e-4)
    assert norms["c"][t - 1] == pytest.approx(dc.norm().item(), rel=1e-4)
    assert norms["c"][-1] == 0.0  # no step reads C_T


def test_clipping_keeps_an_exploding_run_finite():
    unclipped = gradients.clipping_run(None, length=50, steps=20)
    clipped = gradients.clipping_run(1.0, length=50, steps=20)
    assert unclipped.diverged_at is not None and unclipped.diverged_at <= 20
    assert max(unclipped.gradient_norms) > 1e3  # it explodes before the loss stops being a number
    assert clipped.diverged_at is None and len(clipped.losses) == 20
    assert np.all(np.isfinite(clipped.losses)) and max(clipped.gradient_norms) > 1.0  # clipping was active
    assert clipped.losses[0] == unclipped.losses[0]  # same start: same weights, same batch


# --------------------------------------------------------------------------------------------- memory

def test_same_budget_models_and_their_parameter_counts():
    budget = training.Budget(steps=3, batch_size=4, units=5, test_size=10)
    counts = {}
    for cell in training.CELLS:
        result = training.train(cell, "adding", 6, budget)
        assert np.isfinite(result.test_error) and result.test_error >= 0 and len(result.curve) == 3
        counts[cell] = result.parameters
        copy = training.train(cell, "copy", 3, budget)
        assert 0 <= copy.test_error <= 1
    dense = 5 + 1
    assert counts == {"simple_rnn": 5 * (2 + 5 + 1) + dense, "gru": 3 * 5 * (2 + 5 + 2) + dense,
                      "lstm": 4 * 5 * (2 + 5 + 1) + dense}
    assert training.trained("lstm", "adding", 6, budget) is training.trained("lstm", "adding", 6, budget)


# -------------------------------------------------------------------------------------------- command

def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def _no_nan(text):
    def refuse(constant):
        raise AssertionError(f"numbers.json holds {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain")
    assert main(["explain", "--quick", "--threads", "1", "--out", str(out)]) == 0
    return out


def test_quick_run_writes_every_figure_and_sane_pngs(quick_report):
    numbers = _no_nan((quick_report / "numbers.json").read_text())
    assert list(numbers["sections"]) == ["gates", "gradients", "memory"]
    figures = [name for section in numbers["sections"].values() for name in section["figures"]]
    assert {"lstm_cell.png", "gate_table.png", "gate_table_story.png", "gates_adding.png", "gradients.png",
            "jacobians.png", "clipping.png", "memory.png", "memory_curves.png"} <= set(figures)
    total = 0
    for name in figures:
        width, height = _png_size(quick_report / name)
        assert 300 <= width <= 2000 and 200 <= height <= 2000, (name, width, height)
        total += (quick_report / name).stat().st_size
    assert total < 2_000_000
    report = (quick_report / "report.md").read_text()
    for name in figures:
        assert f"]({name})" in report


def test_quick_report_quotes_the_numbers_it_measured(quick_report):
    numbers = _no_nan((quick_report / "numbers.json").read_text())
    report = (quick_report / "report.md").read_text()
    sections = numbers["sections"]
    table = sections["gates"]["table"]
    assert [row["max_error"] for row in table["hard_sigmoid"]] == [0.0] * 4
    for row in table["sigmoid"]:
        assert f"{row['max_error']:.1e}" in report
    for run in sections["memory"]["runs"]:
        assert np.isfinite(run["test_error"]) and f"{run['test_error']:.4f}" in report
    assert {(r["cell"], r["task"]) for r in sections["memory"]["runs"]} == {
        (cell, task) for cell in ("simple_rnn", "gru", "lstm") for task in ("adding", "copy")}
    for jacobian in sections["gradients"]["jacobians"]:
        assert f"{jacobian['norms'][-1]:.3e}" in report
        if jacobian["activation"] == "linear":
            assert jacobian["norms"][-1] == pytest.approx(jacobian["theory_at_last_k"], rel=1e-3)
    for profile in sections["gradients"]["profiles"]:
        assert all(np.isfinite(v) and v >= 0 for norms in profile["norms"].values() for v in norms)
        assert f"{profile['decay_per_step']['h']:.3f}" in report
    unclipped, clipped = sections["gradients"]["clipping"]
    assert unclipped["clip"] is None and unclipped["diverged_at"] is not None and clipped["diverged_at"] is None


@pytest.mark.parametrize("argv,named", [
    (["explain", "bogus"], "PART"),
    (["explain", "gates", "--run", "/nonexistent/run"], "--run"),
    (["explain", "gates", "--input", "a fine film"], "--input"),
    (["explain", "memory", "--run", "."], "--run"),
])
def test_bad_input_is_a_clear_error_naming_the_argument(argv, named, tmp_path, capsys):
    assert main(argv + ["--quick", "--out", str(tmp_path)]) == 2
    assert named in capsys.readouterr().err


def test_gates_of_a_run_trained_by_lstm_train(tmp_path):
    run = tmp_path / "adding"
    assert main(["train", "adding", "--quick", "--no-progress", "--epochs", "1", "--out", str(run)]) == 0
    traced = trace_run(str(run), seed=3)
    trace = traced.traces["lstm"]
    assert set(trace) == {"i", "f", "c_tilde", "c", "o", "h"} and trace["i"].shape == (1, 20, 64)
    assert sum(1 for label in traced.step_labels if label) == 2 and "the model says" in traced.description
    with pytest.raises(ValueError, match="--input"):
        trace_run(str(run), "1 2 3")
    out = tmp_path / "explain"
    assert main(["explain", "gates", "--run", str(run), "--threads", "1", "--out", str(out)]) == 0
    numbers = _no_nan((out / "numbers.json").read_text())
    assert numbers["sections"]["gates"]["traces"]["task"] == "adding"
    assert _png_size(out / "gates_lstm.png")[0] >= 300
    assert "Gate traces of a trained model" in (out / "report.md").read_text()


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_on_stderr_unless_quiet(tmp_path, capsys, quiet):
    """A full `lstm explain` runs for many minutes: each part says when it starts and finishes, n of m."""
    assert main(["explain", "gates", "--quick", "--threads", "1", "--out", str(tmp_path)]
                + (["--quiet"] if quiet else [])) == 0
    err = capsys.readouterr().err
    if quiet:
        assert "lstm explain:" not in err
        return
    started, finished = err.splitlines()
    assert started == "lstm explain: [1/1] gates (quick settings) ..."
    assert finished.startswith("lstm explain: [1/1] gates done in ") and finished.endswith(" s elapsed)")
