"""Marks the tests share."""

import pytest

from lstm.kernels import native

# what a test checks of the C++ kernels themselves (their memory, their compiled custom ops, that
# they run), which LSTM_NO_CPP=1 or a checkout without the built extension does not have
needs_cpp = pytest.mark.skipif(native.extension() is None, reason="the C++ kernels are not loaded")
