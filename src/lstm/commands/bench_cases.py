"""The contenders of `lstm bench`, built on one set of weights, and the peak-memory worker.

Every contender computes the same LSTM (Keras gate order i|f|c|o is PyTorch's i|f|g|o), so the
benchmark can check them against each other before timing them:

    torch weight_ih = kernel.T   weight_hh = recurrent_kernel.T   bias_ih = bias   bias_hh = 0

The memory worker runs as `python -m lstm.commands.bench_cases memory CONTENDER B T D H THREADS`,
one fresh process per contender, and prints one JSON line (see `memory_worker`).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import os
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

BASELINE = "torch.nn.LSTM"
LSTM_DEFAULT = "lstm"
LSTM_REFERENCE = "lstm (reference)"
RECOMPUTE_CHUNK = 100
LSTM_RECOMPUTE = f"lstm (recompute, chunks of {RECOMPUTE_CHUNK})"
TORCH_LOOP = "torch loop (nn.LSTMCell)"
ONNX = "onnxruntime (lstm.export_onnx)"

SEQUENCE_CONTENDERS = (LSTM_DEFAULT, LSTM_REFERENCE, BASELINE, TORCH_LOOP, ONNX)
SHORT_NAMES = {LSTM_DEFAULT: "lstm", LSTM_REFERENCE: "lstm (reference)", BASELINE: "torch.nn.LSTM",
               TORCH_LOOP: "torch loop", ONNX: "onnxruntime"}
MEMORY_CONTENDERS = (LSTM_DEFAULT, LSTM_RECOMPUTE, LSTM_REFERENCE, BASELINE, TORCH_LOOP)
# --memory-contenders keys; the reference is opt-in: at T=2000 its autograd graph (one slice per
# step) makes one training step take minutes on 2 cores
MEMORY_KEYS = {"lstm": LSTM_DEFAULT, "recompute": LSTM_RECOMPUTE, "reference": LSTM_REFERENCE, "torch": BASELINE,
               "loop": TORCH_LOOP}
DEFAULT_MEMORY_KEYS = ("lstm", "recompute", "torch", "loop")  # bench.py --memory-contenders default

STREAM_LSTM = "lstm stream(1).step"
STREAM_CELL = "lstm cell(xt, state)"
STREAM_CELL_REFERENCE = "lstm cell(xt, state) (reference)"
STREAM_TORCH_CELL = "torch.nn.LSTMCell"
STREAM_TORCH_LSTM = "torch.nn.LSTM (T=1, hx)"
STREAM_BASELINE = STREAM_TORCH_CELL
STREAM_CONTENDERS = (STREAM_LSTM, STREAM_CELL, STREAM_CELL_REFERENCE, STREAM_TORCH_CELL, STREAM_TORCH_LSTM)


@dataclass
class Contender:
    """One row: `forward()` runs inference (the caller wraps it in no_grad); `train()` runs
    forward + backward of a sum loss; `zero_grad()` drops the gradients between calls.
    `status` is None when it runs, else why not (the row prints as n/a)."""

    name: str
    forward: Optional[Callable[[], torch.Tensor]] = None
    train: Optional[Callable[[], None]] = None
    zero_grad: Callable[[], None] = lambda: None
    status: Optional[str] = None
    info: dict = field(default_factory=dict)


def parse_shape(text: str) -> tuple:
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 4:
        raise ValueError(f"shape {text!r}: expected B,T,D,H (four integers)")
    shape = tuple(int(p) for p in parts)
    if min(shape) < 1:
        raise ValueError(f"shape {text!r}: every size must be >= 1")
    return shape


def onnx_status() -> Optional[str]:
    """None when ONNX export + onnxruntime are usable, else the n/a reason."""
    try:
        import onnx  # noqa: F401  (lstm.export_onnx needs it)
    except ImportError:
        return "n/a (onnx not installed)"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "n/a (onnxruntime not installed)"
    return None


def _zero(params) -> Callable[[], None]:
    params = list(params)

    def zero():
        for p in params:
            p.grad = None
    return zero


def build_models(D: int, H: int, seed: int = 0):
    """Our layer (return_sequences=True) and nn.LSTM / nn.LSTMCell holding the same weights."""
    from .. import layers

    torch.manual_seed(seed)
    layer = layers.LSTM(H, return_sequences=True)
    layer.cell.build(D)
    with torch.no_grad():
        # a non-trivial bias (the default has zeros and a forget slice of ones)
        layer.cell.bias.add_(0.1 * torch.randn_like(layer.cell.bias))
    kernel = layer.cell.kernel.detach()
    recurrent = layer.cell.recurrent_kernel.detach()
    bias = layer.cell.bias.detach()
    torch_lstm = torch.nn.LSTM(D, H, batch_first=True)
    torch_cell = torch.nn.LSTMCell(D, H)
    with torch.no_grad():
        for module, suffix in ((torch_lstm, "_l0"), (torch_cell, "")):
            getattr(module, "weight_ih" + suffix).copy_(kernel.T)
            getattr(module, "weight_hh" + suffix).copy_(recurrent.T)
            getattr(module, "bias_ih" + suffix).copy_(bias)
            getattr(module, "bias_hh" + suffix).zero_()
    return layer, torch_lstm, torch_cell


def torch_cell_loop(cell: torch.nn.LSTMCell, x: torch.Tensor) -> torch.Tensor:
    """The plain per-step loop: nn.LSTMCell called once per timestep from Python."""
    B, T, _ = x.shape
    h = x.new_zeros(B, cell.hidden_size)
    c = x.new_zeros(B, cell.hidden_size)
    outputs = []
    for t in range(T):
        h, c = cell(x[:, t], (h, c))
        outputs.append(h)
    return torch.stack(outputs, dim=1)


def onnx_session(path: str, threads: int):
    """An onnxruntime CPU session of the file at `path`, intra_op_num_threads=threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # no busy-waiting of ORT's pool between calls: it would steal the cores from the next contender
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def sequence_contenders(shape: tuple, threads: int, seed: int = 0, onnx: bool = True,
                        names=SEQUENCE_CONTENDERS) -> tuple[list[Contender], torch.Tensor]:
    """The contenders for one (B, T, D, H), sharing weights, and the input x [B, T, D]."""
    from .. import kernels

    B, T, D, H = shape
    layer, torch_lstm, torch_cell = build_models(D, H, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, T, D, generator=generator)
    ours = list(layer.parameters())
    result = []
    for name in names:
        if name in (LSTM_DEFAULT, LSTM_REFERENCE):
            forced = "reference" if name == LSTM_REFERENCE else None

            def forward(forced=forced):
                with (kernels.use(forced) if forced else contextlib.nullcontext()):
                    return layer(x)

            def train(forward=forward):
                forward().sum().backward()
            result.append(Contender(name, forward, train, _zero(ours), info={"module": layer}))
        elif name == LSTM_RECOMPUTE:  # lstm.recomputed: the backward recomputes each chunk (memory row)
            from ..long_sequences import recomputed

            result.append(Contender(name, lambda: layer(x), lambda: recomputed(layer, x, RECOMPUTE_CHUNK).sum().backward(),
                                    _zero(ours), info={"module": layer}))
        elif name == BASELINE:
            result.append(Contender(name, lambda: torch_lstm(x)[0], lambda: torch_lstm(x)[0].sum().backward(),
                                    _zero(torch_lstm.parameters()), info={"module": torch_lstm}))
        elif name == TORCH_LOOP:
            result.append(Contender(name, lambda: torch_cell_loop(torch_cell, x),
                                    lambda: torch_cell_loop(torch_cell, x).sum().backward(),
                                    _zero(torch_cell.parameters())))
        elif name == ONNX:
            status = onnx_status() if onnx else "n/a (skipped: --no-onnx)"
            if status is not None:
                result.append(Contender(name, status=status))
                continue
            try:  # the layer written by this library's exporter (`lstm.export_onnx`: the standard ONNX LSTM op)
                from .. import interop

                with tempfile.TemporaryDirectory() as folder:
                    session = onnx_session(interop.export_onnx(layer, os.path.join(folder, "lstm.onnx"), x), threads)
            except Exception as error:  # an exporter/runtime problem is a row, not a crash
                result.append(Contender(name, status=f"n/a (export failed: {type(error).__name__}: {error})"[:200]))
                continue
            feed = {"inputs": x.numpy()}
            result.append(Contender(name, lambda: torch.from_numpy(session.run(None, feed)[0]),
                                    status=None, info={"train": "n/a (forward only)"}))
        else:
            raise ValueError(f"unknown contender {name!r}")
    return result, x


def default_kernel_name(layer, x: torch.Tensor, grad: bool) -> str:
    """Which kernel the dispatch picks for this layer call (no_grad or with autograd)."""
    from .. import kernels

    cell = layer.cell
    with torch.set_grad_enabled(grad):
        problem = cell.recurrence(x, cell.get_initial_state(x.shape[0]), return_sequences=True)
        try:
            return kernels.select(problem).name
        except Exception as error:
            return f"? ({error})"


# ----- streaming: batch-1 step latency --------------------------------------------------------
def stream_contenders(D: int, H: int, seed: int = 0, names=STREAM_CONTENDERS):
    """Contenders that each run `step()` once: one timestep of batch 1, state carried along.
    Returns (contenders, check) where check() compares the first steps of each against
    nn.LSTMCell and returns {name: max abs diff}."""
    from .. import kernels

    layer, torch_lstm, torch_cell = build_models(D, H, seed)
    generator = torch.Generator().manual_seed(seed + 2)
    xs = torch.randn(64, 1, D, generator=generator)
    # split once, each contender's input in its own shape: indexing a tensor inside the timed
    # step would add ~1 us to every contender's step
    steps = [x.clone() for x in xs.unbind(0)]  # [1, D] each
    steps_3d = [x[None] for x in steps]  # [1, 1, D] each, for nn.LSTM
    cell = layer.cell
    result = []

    def stepper(make_step, inputs=steps):
        """The timed call: one step on the next input (the same cycle for every contender)."""
        next_input = itertools.cycle(inputs).__next__
        return lambda: make_step(next_input())

    for name in names:
        if name == STREAM_LSTM:
            owner = layer if hasattr(layer, "stream") else (cell if hasattr(cell, "stream") else None)
            if owner is None:
                result.append(Contender(name, status="n/a (no .stream() API yet)"))
                continue
            try:
                stream = owner.stream(batch_size=1)
                with torch.no_grad():
                    stream.step(xs[0])
            except Exception as error:
                result.append(Contender(name, status=f"n/a (stream failed: {type(error).__name__}: {error})"[:200]))
                continue
            result.append(Contender(name, stepper(stream.step), info={"owner": type(owner).__name__}))
        elif name == STREAM_CELL:
            state = [cell.get_initial_state(1)]

            def make(xt, state=state):
                out, state[0] = cell(xt, state[0])
                return out
            result.append(Contender(name, stepper(make)))
        elif name == STREAM_CELL_REFERENCE:
            state = [cell.get_initial_state(1)]

            def make(xt, state=state):
                with kernels.use("reference"):
                    out, state[0] = cell(xt, state[0])
                return out
            result.append(Contender(name, stepper(make)))
        elif name == STREAM_TORCH_CELL:
            state = [(torch.zeros(1, H), torch.zeros(1, H))]

            def make(xt, state=state):
                state[0] = torch_cell(xt, state[0])
                return state[0][0]
            result.append(Contender(name, stepper(make)))
        elif name == STREAM_TORCH_LSTM:
            state = [(torch.zeros(1, 1, H), torch.zeros(1, 1, H))]

            def make(xt, state=state):
                out, state[0] = torch_lstm(xt, state[0])
                return out
            result.append(Contender(name, stepper(make, steps_3d)))
        else:
            raise ValueError(f"unknown streaming contender {name!r}")

    def check() -> dict:
        """Each contender's first 8 outputs from a zero state vs nn.LSTMCell (call before timing)."""
        diffs = {}
        with torch.no_grad():
            for c in result:
                if c.status is None and c.name != STREAM_TORCH_CELL:
                    try:
                        diffs[c.name] = _replay_diff(c.name, layer, torch_lstm, torch_cell, xs, H, kernels)
                    except Exception as error:  # a crashing contender becomes an n/a row
                        first = (str(error).strip().splitlines() or [""])[0]
                        c.status = f"n/a (error: {type(error).__name__}: {first})"[:160]
        return diffs

    return result, check


def _replay_diff(name, layer, torch_lstm, torch_cell, xs, H, kernels) -> float:
    """Max abs diff of 8 steps from a zero state vs nn.LSTMCell over the same 8 inputs."""
    seq = xs[:8, 0][None]  # [1, 8, D]
    h = c = torch.zeros(1, H)
    expected = []
    for t in range(8):
        h, c = torch_cell(seq[:, t], (h, c))
        expected.append(h.reshape(-1))
    got = []
    cell = layer.cell
    if name == STREAM_LSTM:
        owner = layer if hasattr(layer, "stream") else cell
        stream = owner.stream(batch_size=1)
        for t in range(8):
            out = stream.step(seq[:, t])
            out = out[0] if isinstance(out, (tuple, list)) else out
            got.append(out.reshape(-1))
    elif name in (STREAM_CELL, STREAM_CELL_REFERENCE):
        state = cell.get_initial_state(1)
        with (kernels.use("reference") if name == STREAM_CELL_REFERENCE else contextlib.nullcontext()):
            for t in range(8):
                out, state = cell(seq[:, t], state)
                got.append(out.reshape(-1))
    elif name == STREAM_TORCH_LSTM:
        state = (torch.zeros(1, 1, H), torch.zeros(1, 1, H))
        for t in range(8):
            out, state = torch_lstm(seq[:, t:t + 1], state)
            got.append(out.reshape(-1))
    return float((torch.stack(got) - torch.stack(expected)).abs().max())


# ----- peak memory of one training step, in a fresh process ------------------------------------
MEMORY_METHOD = (
    "each contender runs in a fresh Python process (MALLOC_MMAP_THRESHOLD_=65536, so freed tensors "
    "go back to the OS); it runs one warm-up training step on a short sequence (T<=100), builds the "
    "weights and input, returns freed heap pages to the OS (malloc_trim(0)), resets the kernel's peak-RSS mark (echo 5 > /proc/self/clear_refs), runs one training "
    "step (forward + backward of a sum loss) and reports VmHWM - VmRSS(before): the resident memory "
    "the step added at its peak (activations, saved tensors, workspaces, gradients). 'saved' is the "
    "peak size of the tensors autograd kept for backward at one time (saved_tensors_hooks), "
    "allocator-independent; a custom autograd Function that keeps its buffers on ctx (not "
    "save_for_backward) shows ~0 there."
)


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


class _PeakSampler:
    """Fallback when /proc/self/clear_refs is not writable: poll VmRSS from a thread."""

    def __init__(self):
        import threading

        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _proc_status_kb("VmRSS"))
            time.sleep(0.0005)

    def __enter__(self):
        self.peak = _proc_status_kb("VmRSS")
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _proc_status_kb("VmRSS"))


def _malloc_trim() -> bool:
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0)) or True
    except (OSError, AttributeError):
        return False


def memory_worker(name: str, shape: tuple, threads: int, seed: int = 0) -> dict:
    from .. import kernels

    torch.set_num_threads(threads)
    # warm-up on a short sequence (one-time work: imports, first-call allocations;
    # a full-length warm-up would double the cost of the slow per-step contenders at T=2000)
    B, T, D, H = shape
    warm, _ = sequence_contenders((B, min(T, 100), D, H), threads, seed, onnx=False, names=(name,))
    warm[0].train()
    warm[0].zero_grad()
    del warm
    contenders, x = sequence_contenders(shape, threads, seed, onnx=False, names=(name,))
    contender = contenders[0]
    gc.collect()
    kernels.empty_cache()  # the C++ kernels' pooled buffers too
    trimmed = _malloc_trim()  # hand the warm-up's freed heap pages back, so the step's reuse shows as growth
    live = {}  # saved tensors alive now: key -> [bytes, packs alive]
    saved = {"now": 0, "peak": 0}

    def release(key):
        entry = live[key]
        entry[1] -= 1
        if not entry[1]:
            saved["now"] -= entry[0]
            del live[key]

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        except Exception:
            return t
        entry = live.setdefault(key, [t.numel() * t.element_size(), 0])
        if not entry[1]:
            saved["now"] += entry[0]
            saved["peak"] = max(saved["peak"], saved["now"])
        entry[1] += 1
        weakref.finalize(t, release, key)
        return t

    before = _proc_status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
        sampler = None
    except OSError:
        method = "VmRSS polled every 0.5 ms"
        sampler = _PeakSampler()
    start = time.perf_counter()
    with (sampler or contextlib.nullcontext()), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        contender.train()
    seconds = time.perf_counter() - start
    peak = sampler.peak if sampler else _proc_status_kb("VmHWM")
    return {"contender": name, "shape": list(shape), "rss_before_bytes": before * 1024,
            "peak_rss_bytes": peak * 1024, "peak_growth_bytes": max(0, peak - before) * 1024,
            "saved_tensor_bytes": int(saved["peak"]), "step_seconds": seconds, "method": method,
            "malloc_trim": trimmed}


def run_memory_subprocess(name: str, shape: tuple, threads: int, seed: int = 0, timeout: float = 600) -> dict:
    """Runs `memory_worker` in a fresh interpreter; returns its dict, or {"status": "n/a (...)"}."""
    import subprocess

    import lstm

    src = os.path.dirname(os.path.dirname(os.path.abspath(lstm.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "lstm.commands.bench_cases", "memory", name, *map(str, shape), str(threads),
               str(seed)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"contender": name, "status": f"n/a (timed out after {timeout:.0f} s)"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"contender": name, "status": f"n/a (worker failed: {tail})"[:200]}
    return json.loads(lines[-1])


def _main(argv) -> int:
    if len(argv) >= 7 and argv[0] == "memory":
        name, shape, threads = argv[1], tuple(int(v) for v in argv[2:6]), int(argv[6])
        seed = int(argv[7]) if len(argv) > 7 else 0
        print(json.dumps(memory_worker(name, shape, threads, seed)))
        return 0
    print("usage: python -m lstm.commands.bench_cases memory CONTENDER B T D H THREADS [SEED]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
