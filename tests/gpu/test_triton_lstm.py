"""The Triton LSTM kernel (kernels/triton_lstm.py) equals the reference kernel: outputs, final
states and every gradient, over the options it runs (masks of any pattern, go_backwards,
zero_output_for_mask, return_sequences, input and recurrent dropout, zoneout, peephole, layer
norm, projection, coupled, forget_bias, cell_clip, Keras' activations) at float64, float32,
bfloat16 and float16.

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
from lstm.kernels import Recurrence, reference, triton_lstm  # noqa: E402
from test_variants import outputs_and_grads, variant_problem  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# relative to the larger of the value's scale and 1
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def on_device(p: Recurrence, low: torch.dtype | None = None) -> Recurrence:
    """p's tensors on DEVICE as new leaves; with `low`, the inputs and h0 in it (the weights,
    masks and C stay float32, as a mixed-precision layer hands them over)."""
    def moved(t, dtype=None):
        if not isinstance(t, torch.Tensor):
            return t
        return t.detach().to(DEVICE, dtype or t.dtype).requires_grad_(t.requires_grad)

    h0, c0 = p.initial_state
    return dataclasses.replace(
        p, inputs=moved(p.inputs, low), kernel=moved(p.kernel), recurrent_kernel=moved(p.recurrent_kernel),
        bias=moved(p.bias), initial_state=(moved(h0, low), moved(c0)), mask=moved(p.mask),
        input_dropout=moved(p.input_dropout), recurrent_dropout=moved(p.recurrent_dropout),
        peephole=moved(p.peephole), projection=moved(p.projection),
        layer_norm=None if p.layer_norm is None else tuple(map(moved, p.layer_norm)))


def assert_equal_to_reference(p: Recurrence, tolerance: float, what: str) -> None:
    with lstm.kernels.use("triton_lstm"):
        assert lstm.kernels.select(p).name == "triton_lstm"
        got = outputs_and_grads(triton_lstm, p)
    expected = outputs_and_grads(reference, p)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, f"{what}, {key}"
        scale = max(float(value.double().abs().max()), 1.0)
        difference = float((got[key].double() - value.double()).abs().max())
        assert difference <= tolerance * scale, f"{what}, {key}: {difference:.3g} > {tolerance * scale:.3g}"


CASES = {
    "plain": {},
    "mask": {"mask": True},
    "mask, go_backwards": {"mask": True, "go_backwards": True},
    "mask, zero outputs": {"mask": True, "zero_output_for_mask": True},
    "last output": {"return_sequences": False, "mask": True},
    "no bias": {"use_bias": False},
    "peephole": {"peephole": True},
    "coupled, peephole": {"coupled": True, "peephole": True},
    "cell_clip, forget_bias": {"cell_clip": 0.3, "forget_bias": 1.0},
    "zoneout h and C, mask": {"zoneout": (True, True), "mask": True, "zoneout_offset": 7},
    "zoneout h": {"zoneout": (True, False), "go_backwards": True},
    "dropout shared, recurrent dropout": {"input_dropout": 1, "recurrent_dropout": True},
    "dropout per gate": {"input_dropout": 4},
    "layer norm": {"layer_norm": True},
    "layer norm, coupled, peephole, mask": {"layer_norm": True, "coupled": True, "peephole": True, "mask": True},
    "projection": {"P": 3},
    "projection, zoneout, recurrent dropout, mask": {"P": 5, "zoneout": (True, True), "recurrent_dropout": True,
                                                     "mask": True},
    "relu, hard_sigmoid": {"activation": "relu", "recurrent_activation": "hard_sigmoid"},
    "linear, tf_keras hard_sigmoid": {"activation": "linear", "recurrent_activation": "hard_sigmoid_tf_keras"},
    "everything": {"mask": True, "go_backwards": True, "peephole": True, "coupled": True, "cell_clip": 0.5,
                   "forget_bias": 0.5, "zoneout": (True, True), "input_dropout": 3, "recurrent_dropout": True,
                   "layer_norm": True, "P": 3, "return_sequences": False},
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_the_reference(case, dtype):
    p = on_device(variant_problem(3, 5, 4, 16, dtype=dtype, seed=len(case), **CASES[case]))
    assert_equal_to_reference(p, TOLERANCE[dtype], case)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.sampled_from([1, 2, 3, 17]), steps=st.integers(1, 6), features=st.integers(1, 5),
       units=st.sampled_from([1, 5, 16, 65]), mask=st.booleans(), go_backwards=st.booleans(),
       zero_output_for_mask=st.booleans(), return_sequences=st.booleans(), peephole=st.booleans(),
       coupled=st.booleans(), layer_norm=st.booleans(), P=st.sampled_from([0, 3]),
       cell_clip=st.sampled_from([None, 0.4]), forget_bias=st.sampled_from([0.0, 1.0]),
       zoneout=st.sampled_from([(False, False), (True, False), (False, True), (True, True)]),
       input_dropout=st.sampled_from([0, 1, 4]), recurrent_dropout=st.booleans(), use_bias=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_property_sweep_float64(**options):
    """Options x masks x directions x shapes (two programs per step where B > 16 or U > 64)."""
    shape = [options.pop(k) for k in ("batch", "steps", "features", "units")]
    if options["coupled"] and options["input_dropout"] == 4:
        options["input_dropout"] = 3  # (a coupled LSTM has three gate blocks)
    assert_equal_to_reference(on_device(variant_problem(*shape, **options)), TOLERANCE[torch.float64], str(options))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["plain", "mask, go_backwards", "everything"])
def test_low_precision(case, low):
    """The reference's rules (problem.py, Recurrence: "Precision"): the same numbers up to where a
    float32 sum in another order rounds h the other way; and near the float32 reference."""
    p32 = variant_problem(3, 5, 4, 16, dtype=torch.float32, seed=len(case), **CASES[case])
    assert_equal_to_reference(on_device(p32, low), 4 * EPS[low], f"{case}, {low}")
    with lstm.kernels.use("triton_lstm"):
        got = outputs_and_grads(triton_lstm, on_device(p32, low))
    expected = outputs_and_grads(reference, on_device(p32))
    for key, value in expected.items():
        scale = max(float(value.abs().max()), 1.0)
        difference = float((got[key].float() - value).abs().max())
        assert difference <= 16 * EPS[low] * scale, f"{case}, {low} against float32, {key}: {difference:.3g}"


def test_a_layer_runs_it_when_forced():
    """The layer's own call (its dropout masks, zoneout seed, mask from an Embedding-style pattern)
    through the dispatch: the same numbers as the reference kernel."""
    layer = layers.LSTM(8, return_sequences=True, return_state=True, dtype="float64", input_dim=3, peephole=True,
                        zoneout=(0.2, 0.1), dropout=0.25, recurrent_dropout=0.25).to(DEVICE)
    x = torch.randn(4, 6, 3, dtype=torch.float64, device=DEVICE)
    mask = torch.rand(4, 6, device=DEVICE) < 0.7
    results = {}
    for kernel in ("triton_lstm", "reference"):
        torch.manual_seed(3)
        x_leaf = x.clone().requires_grad_()
        with lstm.kernels.use(kernel):
            out, h, c = layer(x_leaf, mask=mask, training=True)
        loss = (out * torch.arange(out.numel(), device=DEVICE).reshape(out.shape).sin()).sum() + h.sum() + c.sum()
        grads = torch.autograd.grad(loss, [x_leaf, *layer.parameters()])
        results[kernel] = [out, h, c, *grads]
    for got, expected in zip(results["triton_lstm"], results["reference"]):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "mask, go_backwards", "everything"])
def test_resets(case, dtype):
    """Resets (an episode starting inside a row: the states restored before the step, ignored at
    masked steps), with restored states that get gradients of their own, or zeros."""
    low = dtype if dtype is torch.bfloat16 else None
    p = variant_problem(3, 6, 4, 16, dtype=torch.float32 if low else dtype, seed=len(case), **CASES[case])
    reset = torch.rand(3, 6, generator=torch.Generator().manual_seed(5)) < 0.35
    for restored in (None, tuple(torch.randn_like(s).requires_grad_() for s in p.initial_state)):
        problem = on_device(dataclasses.replace(p, reset=reset, reset_state=restored), low)
        if restored is not None:  # (on_device made new leaves of the initial states only)
            problem.reset_state = tuple(s.detach().to(DEVICE, t.dtype).requires_grad_()
                                        for s, t in zip(restored, problem.initial_state))
        results = {}
        for kernel in (triton_lstm, reference):
            with lstm.kernels.use(kernel.name):
                result = kernel.run(problem)
            outputs = [result.outputs, *result.states]
            loss = sum((o.float() * torch.linspace(-1, 1, o.numel(), device=DEVICE).reshape(o.shape)).sum()
                       for o in outputs)
            leaves = [problem.inputs, problem.kernel, problem.recurrent_kernel, *problem.initial_state,
                      *(problem.reset_state or ())]
            results[kernel.name] = [*(o.detach() for o in outputs), *torch.autograd.grad(loss, leaves)]
        tolerance = 4 * EPS[low] if low else TOLERANCE[dtype]
        for index, (got, expected) in enumerate(zip(results["triton_lstm"], results["reference"])):
            scale = max(float(expected.double().abs().max()), 1.0)
            difference = float((got.double() - expected.double()).abs().max())
            assert difference <= tolerance * scale, f"{case}, {dtype}, restored {restored is not None}, #{index}"


@pytest.mark.parametrize("case", ["plain", "mask, go_backwards", "zoneout h and C, mask", "everything"])
def test_traces_equal_the_reference(case):
    """The gate traces (i, f, c_tilde, c, o, h per step, processing order), masked steps and
    zoneout included, equal the reference kernel's."""
    p = dataclasses.replace(on_device(variant_problem(3, 5, 4, 16, seed=len(case), **CASES[case])), trace=True)
    traces = {}
    for kernel in ("triton_lstm", "reference"):
        with lstm.kernels.use(kernel):
            traces[kernel] = lstm.kernels.run(p).trace
    assert traces["triton_lstm"].keys() == traces["reference"].keys()
    for key, expected in traces["reference"].items():
        torch.testing.assert_close(traces["triton_lstm"][key], expected.detach(), rtol=1e-10, atol=1e-10, msg=key)


def test_not_chosen_on_the_cpu():
    """On CPU tensors the dispatch never picks it by itself (the C++ kernels or the reference run them)."""
    for options in ({}, {"P": 3, "mask": True}, {"layer_norm": True}):
        assert lstm.kernels.select(variant_problem(2, 3, 2, 4, **options)).name != "triton_lstm"


def test_a_device_triton_cannot_build_for_falls_back_to_the_reference(monkeypatch):
    """Where Triton cannot build or launch a program on the device (here a launch raising
    OutOfResources, as too small a GPU would), the call warns naming the error and gives the
    reference kernel's numbers, and the kernel leaves the dispatch."""
    from triton.runtime.errors import OutOfResources

    from lstm.kernels import triton_steps, triton_support

    monkeypatch.setattr(triton_support, "failed", {})

    class Failing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(300_000, 232_448, "shared memory")
            return launch

    monkeypatch.setattr(triton_steps, "lstm_forward_step", Failing())
    p = on_device(variant_problem(2, 3, 2, 4, peephole=True))
    with lstm.kernels.use("triton_lstm"):
        with pytest.warns(RuntimeWarning, match="triton_lstm cannot run .*OutOfResources"):
            got = triton_lstm.run(p)
        with pytest.raises(ValueError, match="does not support"):
            lstm.kernels.select(p)
    expected = reference.run(p)
    torch.testing.assert_close(got.outputs, expected.outputs, rtol=0, atol=0)


def test_torch_compile_traces_through_it():
    """A compiled layer (one graph) runs the kernel's custom ops: the reference's numbers, gradients too."""
    layer = layers.LSTM(8, return_sequences=True, input_dim=4, peephole=True, cell_clip=0.5).to(DEVICE)
    x = torch.randn(3, 5, 4, device=DEVICE)
    mask = torch.rand(3, 5, device=DEVICE) < 0.7
    results = {}
    for kernel, model in (("reference", layer), ("triton_lstm", torch.compile(layer, fullgraph=True))):
        x_leaf = x.clone().requires_grad_()
        with lstm.kernels.use(kernel):
            out = model(x_leaf, mask=mask)
        results[kernel] = [out, *torch.autograd.grad((out * out).sum(), [x_leaf, *layer.parameters()])]
    for got, expected in zip(results["triton_lstm"], results["reference"]):
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-6)


def test_the_custom_ops_pass_opcheck():
    """torch.compile and torch.export see lstm::triton_lstm_forward / _backward: their fake kernels
    and autograd registration agree with the real ones."""
    p = on_device(variant_problem(2, 3, 2, 4, P=3, mask=True, peephole=True, layer_norm=True))
    options = triton_lstm.Options(False, False, True, False, 0, 1, -1.0, False)
    gate_gain, cell_gain, cell_shift = p.layer_norm
    tensors = (p.inputs, p.kernel, gate_gain, p.bias, p.recurrent_kernel, p.peephole, cell_gain, cell_shift,
               p.projection, *p.initial_state, None, None, None, None, p.mask, None, None, p.mask)
    torch.library.opcheck(triton_lstm.OP.forward_op, (*tensors, *options, True),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
