"""The Triton GRU and SimpleRNN kernel (kernels/triton_gru_simple_rnn.py) equals the reference
kernel: outputs, final state and every gradient, over the options it runs (masks of any pattern,
go_backwards, zero_output_for_mask, return_sequences, input dropout shared or per gate, recurrent
dropout, GRU reset_after True and False, Keras' activations) at float64, float32, bfloat16 and
float16.

On a GPU the tensors are CUDA tensors; without one, Triton's interpreter runs the same programs on
CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1), at tiny shapes, one program after another.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

pytest.importorskip("triton")

import lstm  # noqa: E402
from lstm import layers  # noqa: E402
from lstm.kernels import Recurrence, reference, triton_gru_simple_rnn  # noqa: E402
from test_fused_kernel import make_problem  # noqa: E402

KERNEL = "triton_gru_simple_rnn"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# relative to the larger of the value's scale and 1
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# (kind, reset_after): the GRU's two forms and the SimpleRNN
CELLS = {"gru": ("gru", True), "gru reset_before": ("gru", False), "simple_rnn": ("simple_rnn", True)}


def on_device(p: Recurrence, low: torch.dtype | None = None) -> Recurrence:
    """p's tensors on DEVICE as new leaves; with `low`, the inputs and h0 in it (the weights and
    masks stay float32, as a mixed-precision layer hands them over)."""
    def moved(t, dtype=None):
        if t is None:
            return None
        return t.detach().to(DEVICE, dtype or t.dtype).requires_grad_(t.requires_grad)

    return dataclasses.replace(
        p, inputs=moved(p.inputs, low), kernel=moved(p.kernel), recurrent_kernel=moved(p.recurrent_kernel),
        bias=moved(p.bias), initial_state=(moved(p.initial_state[0], low),), mask=moved(p.mask),
        input_dropout=moved(p.input_dropout), recurrent_dropout=moved(p.recurrent_dropout))


def problem(cell: str, B=3, T=5, D=4, U=6, dtype=torch.float64, seed=0, **options) -> Recurrence:
    kind, reset_after = CELLS[cell]
    return make_problem(kind, B, T, D, U, dtype=dtype, seed=seed, reset_after=reset_after, **options)


def cell_options(cell: str) -> triton_gru_simple_rnn.Options:
    """The op's options for a call of `cell` (tanh, sigmoid; return_sequences)."""
    kind, reset_after = CELLS[cell]
    return triton_gru_simple_rnn.Options(False, False, True, kind == "simple_rnn", kind == "gru" and reset_after, 0, 1,
                                         False)


def outputs_and_grads(kernel, p: Recurrence) -> dict:
    """The outputs, the final state and the gradients of a random weighted sum of them."""
    result = kernel.run(p)
    outs = {"outputs": result.outputs, "h": result.states[0]}
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)).sum()
               for o in outs.values())
    named = {"inputs": p.inputs, "kernel": p.kernel, "recurrent_kernel": p.recurrent_kernel, "bias": p.bias,
             "h0": p.initial_state[0]}
    named = {k: t for k, t in named.items() if t is not None and t.requires_grad}  # (a zero h0 is no leaf)
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    values = {k: v.detach() for k, v in outs.items()}
    values.update({f"grad {k}": torch.zeros_like(t) if gr is None else gr for (k, t), gr in zip(named.items(), grads)})
    return values


def kernel_results(p: Recurrence) -> dict:
    with lstm.kernels.use(KERNEL):
        assert lstm.kernels.select(p).name == KERNEL
        return outputs_and_grads(triton_gru_simple_rnn, p)


def assert_within(got: dict, expected: dict, tolerance: float, what: str) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        scale = max(float(value.double().abs().max()), 1.0)
        difference = float((got[key].double() - value.double()).abs().max())
        assert difference <= tolerance * scale, f"{what}, {key}: {difference:.3g} > {tolerance * scale:.3g}"


def assert_equal_to_reference(p: Recurrence, tolerance: float, what: str) -> None:
    got, expected = kernel_results(p), outputs_and_grads(reference, p)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, f"{what}, {key}"
    assert_within(got, expected, tolerance, what)


CASES = {
    "plain": {},
    "mask": {"mask": "holes"},
    "mask, go_backwards": {"mask": "holes_and_empty", "go_backwards": True},
    "mask, zero outputs": {"mask": "holes", "zero_output_for_mask": True},
    "last output": {"mask": "holes", "return_sequences": False},
    "no bias": {"use_bias": False, "initial_state": False},
    "dropout shared, recurrent dropout": {"input_dropout": "shared", "recurrent_dropout": True},
    "dropout per gate, recurrent dropout, mask": {"input_dropout": "per_gate", "recurrent_dropout": True,
                                                   "mask": "holes", "go_backwards": True},
    "relu, hard_sigmoid": {"activation": "relu", "recurrent_activation": "hard_sigmoid", "mask": "holes"},
    "linear, tanh": {"activation": "linear", "recurrent_activation": "tanh", "recurrent_dropout": True},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", CASES)
def test_equals_the_reference(case, cell, dtype):
    p = on_device(problem(cell, dtype=dtype, seed=len(case), **CASES[case]))
    assert_equal_to_reference(p, TOLERANCE[dtype], f"{cell}, {case}")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cell=st.sampled_from(sorted(CELLS)), batch=st.sampled_from([1, 2, 3, 17]), steps=st.integers(1, 6),
       features=st.integers(1, 5), units=st.sampled_from([1, 5, 16, 65]),
       mask=st.sampled_from(["none", "holes", "holes_and_empty"]), go_backwards=st.booleans(),
       zero_output_for_mask=st.booleans(), return_sequences=st.booleans(),
       input_dropout=st.sampled_from(["none", "shared", "per_gate"]), recurrent_dropout=st.booleans(),
       use_bias=st.booleans(), initial_state=st.booleans(),
       activation=st.sampled_from(["tanh", "relu", "hard_sigmoid", "linear", "hard_sigmoid_tf_keras"]),
       seed=st.integers(0, 2 ** 16))
def test_property_sweep_float64(cell, batch, steps, features, units, **options):
    """Options x masks x directions x shapes (two programs per step where B > 16 or U > 64)."""
    p = on_device(problem(cell, batch, steps, features, units, **options))
    assert_equal_to_reference(p, TOLERANCE[torch.float64], f"{cell}, {options}")


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", ["plain", "dropout per gate, recurrent dropout, mask"])
def test_low_precision(case, cell, low):
    """The reference's rules (problem.py, Recurrence: "Precision"): the same numbers up to where a
    float32 sum in another order rounds h the other way; and near the float32 reference."""
    p32 = problem(cell, dtype=torch.float32, seed=len(case), **CASES[case])
    assert_equal_to_reference(on_device(p32, low), 4 * EPS[low], f"{cell}, {case}, {low}")
    got = {k: v.float() for k, v in kernel_results(on_device(p32, low)).items()}
    assert_within(got, outputs_and_grads(reference, on_device(p32)), 16 * EPS[low], f"{cell}, {case}, {low} vs float32")


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_low_precision_rounds_every_products_operand(cell, low):
    """Every step's h, and a reset_before GRU's r * h, hold values of the low precision (the
    outputs alone cannot show it: they are rounded at the end either way)."""
    p = on_device(problem(cell, dtype=torch.float32), low)
    inputs = (p.inputs, p.kernel, p.bias, p.recurrent_kernel, p.initial_state[0], None)
    with torch.no_grad():
        _, _, _, recurrent, h, _ = triton_gru_simple_rnn.OP.forward(inputs, (None,) * 4, cell_options(cell), True)
    operands = [h, recurrent] if cell == "gru reset_before" else [h]
    for t in operands:
        assert torch.equal(t, t.to(low).float())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", ["plain", "dropout per gate, recurrent dropout, mask"])
def test_resets(case, cell, dtype):
    """Resets (an episode starting inside a row: the state restored before the step, ignored at
    masked steps), with a restored state that gets gradients of its own, or zeros."""
    low = dtype if dtype in EPS else None
    p = problem(cell, 3, 6, 4, 6, dtype=torch.float32 if low else dtype, seed=len(case), **CASES[case])
    reset = torch.rand(3, 6, generator=torch.Generator().manual_seed(5)) < 0.35
    for restored in (False, True):
        problem_with_resets = dataclasses.replace(on_device(p, low), reset=reset.to(DEVICE))
        if restored:
            h0 = problem_with_resets.initial_state[0]
            problem_with_resets.reset_state = (torch.randn(h0.shape, device=DEVICE).to(h0.dtype).requires_grad_(),)
        results = {}
        for kernel in (triton_gru_simple_rnn, reference):
            with lstm.kernels.use(kernel.name):
                result = kernel.run(problem_with_resets)
            outputs = [result.outputs, *result.states]
            loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=DEVICE).reshape(o.shape)).sum()
                       for o in outputs)
            leaves = [t for t in (problem_with_resets.inputs, problem_with_resets.kernel,
                                  problem_with_resets.recurrent_kernel, *problem_with_resets.initial_state,
                                  *(problem_with_resets.reset_state or ())) if t.requires_grad]
            results[kernel.name] = [*(o.detach() for o in outputs), *torch.autograd.grad(loss, leaves)]
        tolerance = 4 * EPS[low] if low else TOLERANCE[dtype]
        for index, (got, expected) in enumerate(zip(results[KERNEL], results["reference"])):
            scale = max(float(expected.double().abs().max()), 1.0)
            difference = float((got.double() - expected.double()).abs().max())
            assert difference <= tolerance * scale, f"{cell}, {case}, {dtype}, restored {restored}, #{index}"


LAYER_OPTIONS = dict(return_sequences=True, return_state=True, dtype="float64", input_dim=3, dropout=0.25,
                     recurrent_dropout=0.25)


@pytest.mark.parametrize("make_layer", [
    lambda: layers.GRU(7, reset_after=False, recurrent_activation="hard_sigmoid", **LAYER_OPTIONS),
    lambda: layers.GRU(7, **LAYER_OPTIONS),
    lambda: layers.SimpleRNN(7, activation="relu", **LAYER_OPTIONS),
], ids=["GRU reset_before", "GRU", "SimpleRNN"])
def test_a_layer_runs_it_when_forced(make_layer):
    """The layer's own call (its dropout masks, a random mask) through the dispatch: the same
    numbers as the reference kernel."""
    layer = make_layer().to(DEVICE)
    x = torch.randn(4, 6, 3, dtype=torch.float64, device=DEVICE)
    mask = torch.rand(4, 6, device=DEVICE) < 0.7
    results = {}
    for kernel in (KERNEL, "reference"):
        torch.manual_seed(3)
        x_leaf = x.clone().requires_grad_()
        with lstm.kernels.use(kernel):
            out, h = layer(x_leaf, mask=mask, training=True)
        loss = (out * torch.arange(out.numel(), device=DEVICE).reshape(out.shape).sin()).sum() + h.sum()
        grads = torch.autograd.grad(loss, [x_leaf, *layer.parameters()])
        results[kernel] = [out, h, *grads]
    for got, expected in zip(results[KERNEL], results["reference"]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_torch_compile_traces_through_it():
    """A compiled layer (one graph) runs the kernel's custom ops: the reference's numbers, gradients too."""
    layer = layers.GRU(8, return_sequences=True, input_dim=4, reset_after=False).to(DEVICE)
    x = torch.randn(3, 5, 4, device=DEVICE)
    mask = torch.rand(3, 5, device=DEVICE) < 0.7
    results = {}
    for kernel, model in (("reference", layer), (KERNEL, torch.compile(layer, fullgraph=True))):
        x_leaf = x.clone().requires_grad_()
        with lstm.kernels.use(kernel):
            out = model(x_leaf, mask=mask)
        results[kernel] = [out, *torch.autograd.grad((out * out).sum(), [x_leaf, *layer.parameters()])]
    for got, expected in zip(results[KERNEL], results["reference"]):
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("case", ["plain", "dropout per gate, recurrent dropout, mask"])
def test_traces_equal_the_reference(case, cell):
    """The traces (GRU: z, r, h_tilde, h; SimpleRNN: h, per step in processing order), masked
    steps included, equal the reference kernel's."""
    p = dataclasses.replace(on_device(problem(cell, seed=len(case), **CASES[case])), trace=True)
    traces = {}
    for kernel in (KERNEL, "reference"):
        with lstm.kernels.use(kernel):
            traces[kernel] = lstm.kernels.run(p).trace
    assert traces[KERNEL].keys() == traces["reference"].keys()
    for key, expected in traces["reference"].items():
        torch.testing.assert_close(traces[KERNEL][key], expected.detach(), rtol=1e-10, atol=1e-10, msg=key)


def test_not_chosen_on_the_cpu_nor_for_what_it_lacks():
    """On CPU tensors the dispatch never picks it by itself; forced, it refuses what it does not
    run (an LSTM, a bias of another shape than Keras'), by name."""
    assert lstm.kernels.select(problem("gru")).name != KERNEL
    lstm_problem = make_problem("lstm", 2, 3, 2, 4, dtype=torch.float64)
    unsupported = [on_device(lstm_problem),
                   dataclasses.replace(on_device(problem("gru")), bias=torch.zeros(18, dtype=torch.float64))]
    for p in unsupported:
        with lstm.kernels.use(KERNEL), pytest.raises(ValueError, match="does not support"):
            lstm.kernels.select(p)


@pytest.mark.parametrize("dtype, save", [(torch.float64, True), (torch.bfloat16, False)], ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_the_custom_ops_pass_opcheck(cell, dtype, save):
    """torch.compile and torch.export see lstm::triton_gru_simple_rnn_forward / _backward: their fake
    kernels and autograd registration agree with the real ones (the dtypes of the saved buffers,
    and of those not saved, included)."""
    low = dtype if dtype in EPS else None
    p = on_device(problem(cell, 2, 3, 2, 4, dtype=torch.float64 if low is None else torch.float32, mask="holes",
                          recurrent_dropout=True), low)
    reset_h = torch.randn_like(p.initial_state[0]).requires_grad_()
    tensors = (p.inputs, p.kernel, p.bias, p.recurrent_kernel, p.initial_state[0], reset_h, None,
               p.recurrent_dropout, p.mask, p.mask)  # (the mask as the resets too)
    torch.library.opcheck(triton_gru_simple_rnn.OP.forward_op, (*tensors, *cell_options(cell), save),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
