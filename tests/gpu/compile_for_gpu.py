"""Compiles every Triton step program for an H100 (sm_90) and an A100 (sm_80), to PTX and cubin, on
this machine without a GPU: the rules the interpreter does not check (globals a program reads must
be constexpr, types that lower, what ptxas accepts) are checked here. Run without
TRITON_INTERPRET (under it `triton.jit` gives interpreted functions); test_triton_compile.py does.

    python tests/gpu/compile_for_gpu.py   # prints one line per compiled case, exits 1 on a failure
"""

from __future__ import annotations

import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lstm.kernels import triton_gru_steps, triton_steps

BOOL_POINTERS = {"mask_ptr", "keep_h_ptr", "keep_c_ptr"}
TARGETS = {"sm_90": GPUTarget("cuda", 90, 32), "sm_80": GPUTarget("cuda", 80, 32)}
TILE = dict(BLOCK_B=4, BLOCK_U=64)
LSTM_ALL_ON = dict(COUPLED=False, ACTIVATION=0, RECURRENT_ACTIVATION=1, HAS_MASK=True, HAS_KEEP_H=True,
                   HAS_KEEP_C=True, HAS_PEEPHOLE=True, HAS_CLIP=True, ZERO_OUTPUT=False, LAYER_NORM=True,
                   PROJECTED=False, **TILE)
# the forward programs' trace flag (the backward programs take none)
TRACED, UNTRACED = dict(TRACE=True), dict(TRACE=False)
LSTM_ALL_OFF = dict(LSTM_ALL_ON, COUPLED=True, HAS_MASK=False, HAS_KEEP_H=False, HAS_KEEP_C=False,
                    HAS_PEEPHOLE=False, HAS_CLIP=False, LAYER_NORM=False)
GRU = dict(ACTIVATION=0, RECURRENT_ACTIVATION=1, HAS_MASK=True, ZERO_OUTPUT=False, **TILE)

# (program, float dtype of its buffers, constexprs)
CASES = [
    (triton_steps.lstm_forward_step, "fp32", dict(LSTM_ALL_ON, ROUND_H=1, **TRACED)),
    (triton_steps.lstm_forward_step, "fp64", dict(LSTM_ALL_OFF, ROUND_H=0, **UNTRACED)),
    (triton_steps.lstm_forward_step, "fp32", dict(LSTM_ALL_OFF, PROJECTED=True, ACTIVATION=2, RECURRENT_ACTIVATION=4,
                                                  ZERO_OUTPUT=True, HAS_MASK=True, ROUND_H=2, **TRACED)),
    (triton_steps.lstm_forward_step, "fp32", dict(LSTM_ALL_OFF, ACTIVATION=3, RECURRENT_ACTIVATION=5, ROUND_H=0,
                                                  **UNTRACED)),
    (triton_steps.lstm_output_step, "fp32", dict(HAS_MASK=True, HAS_KEEP_H=True, ZERO_OUTPUT=False, ROUND_H=1,
                                                 **TRACED, **TILE)),
    (triton_steps.lstm_output_backward_step, "fp32", dict(HAS_MASK=True, HAS_KEEP_H=True, ZERO_OUTPUT=False,
                                                          HAS_DY=True, **TILE)),
    (triton_steps.lstm_backward_step, "fp32", dict(LSTM_ALL_ON, HAS_DY=True)),
    (triton_steps.lstm_backward_step, "fp64", dict(LSTM_ALL_OFF, HAS_DY=False)),
    (triton_steps.lstm_backward_step, "fp32", dict(LSTM_ALL_OFF, PROJECTED=True, ACTIVATION=2, RECURRENT_ACTIVATION=4,
                                                   HAS_DY=True)),
    (triton_steps.lstm_backward_step, "fp32", dict(LSTM_ALL_ON, COUPLED=True, ACTIVATION=3, RECURRENT_ACTIVATION=5,
                                                   ZERO_OUTPUT=True, HAS_DY=True)),
    (triton_gru_steps.gru_reset_step, "fp32", dict(RECURRENT_ACTIVATION=1, HAS_RECURRENT_DROPOUT=True, ROUND_H=1,
                                                   **TILE)),
    (triton_gru_steps.gru_forward_step, "fp32", dict(GRU, RESET_AFTER=True, HAS_RECURRENT_BIAS=True, ROUND_H=1,
                                                     **TRACED)),
    (triton_gru_steps.gru_forward_step, "fp64", dict(GRU, RESET_AFTER=False, HAS_RECURRENT_BIAS=False, ROUND_H=0,
                                                     ZERO_OUTPUT=True, **UNTRACED)),
    (triton_gru_steps.gru_backward_step, "fp32", dict(GRU, RESET_AFTER=True, HAS_DY=True)),
    (triton_gru_steps.gru_backward_step, "fp64", dict(GRU, RESET_AFTER=False, HAS_DY=False)),
    (triton_gru_steps.gru_reset_backward_step, "fp32", dict(RECURRENT_ACTIVATION=1, HAS_RECURRENT_DROPOUT=True,
                                                            **TILE)),
    (triton_gru_steps.simple_rnn_forward_step, "fp32", dict(ACTIVATION=2, HAS_MASK=True, ZERO_OUTPUT=False, ROUND_H=2,
                                                            **TRACED, **TILE)),
    (triton_gru_steps.simple_rnn_backward_step, "fp32", dict(ACTIVATION=2, HAS_MASK=True, ZERO_OUTPUT=True,
                                                             HAS_DY=True, **TILE)),
]


def signature(program, dtype: str) -> dict:
    """Each argument's type: pointers to the buffers' float dtype (bool masks: i1), i32 scalars."""
    types = {}
    for parameter in program.params:
        if parameter.is_constexpr:
            types[parameter.name] = "constexpr"
        elif parameter.name.endswith("_ptr"):
            types[parameter.name] = "*i1" if parameter.name in BOOL_POINTERS else f"*{dtype}"
        else:
            types[parameter.name] = "i32"
    return types


def main() -> int:
    failures = 0
    for program, dtype, constexprs in CASES:
        for target_name, target in TARGETS.items():
            started = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(fn=program, signature=signature(program, dtype),
                                                    constexprs=constexprs), target=target)
                status = f"ok ({len(compiled.asm['cubin'])} bytes of cubin)"
            except Exception as error:  # (reported, then the exit status says it)
                failures += 1
                status = f"FAILED: {type(error).__name__}: {str(error).strip().splitlines()[-1]}"
            print(f"{program.__name__} {dtype} {target_name}: {status} in {time.perf_counter() - started:.1f} s",
                  flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
