"""Every golden case made by real Keras: outputs, final states and every listed gradient."""

import numpy as np
import pytest
import torch

import lstm
from keras_cases import Case, case_files, run_case

CASES = case_files()


def assert_close(ours: torch.Tensor, expected: np.ndarray, tolerance: dict, what: str):
    ours = ours.detach().cpu().numpy()
    assert ours.shape == expected.shape, f"{what}: shape {ours.shape} != {expected.shape}"
    bound = tolerance["atol"] + tolerance["rtol"] * float(np.abs(expected).max(initial=0.0))
    error = float(np.abs(ours - expected).max(initial=0.0))
    assert error <= bound, f"{what}: max |ours - keras| = {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("kernel", lstm.kernels.available())
@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_case(name, kernel):
    case = Case(CASES[name])
    with lstm.kernels.use(kernel):
        try:
            outputs, grads = run_case(case)
        except ValueError as error:  # a kernel for some cells only (fused_cpp: LSTM)
            if "does not support this recurrence" not in str(error):
                raise
            pytest.skip(f"{kernel} does not cover this case: {error}")
    tolerance = case.meta["tolerance"]
    for key, value in outputs.items():
        if key in case.arrays:
            assert_close(value, case.arrays[key], tolerance, f"{name} {key}")
    assert grads, "a case lists gradients"
    for key, grad in grads.items():
        assert grad is not None, f"{name}: no gradient for {key}"
        assert_close(grad, case.arrays[key], tolerance, f"{name} {key}")


def test_cases_found():
    assert len(CASES) >= 27
