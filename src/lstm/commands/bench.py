"""`lstm bench`: this library's LSTM against torch.nn.LSTM, a per-step PyTorch loop and
ONNX Runtime, in one process, interleaved; its GRU and SimpleRNN against torch.nn.GRU and
torch.nn.RNN (bench_cells.py); the LSTM variants against the plain LSTM (bench_variants.py); its
int8 inference (lstm.quantize) against its float32 and ONNX Runtime's int8 (bench_int8.py).

Modes: inference forward (no_grad), training step (forward + backward of a sum loss), batch-1
streaming step latency, and peak memory of a training step (fresh process per contender).
Each shape is checked first (every contender vs torch.nn.LSTM with converted weights, max abs
diff <= 1e-4; gradients of this library vs torch too); a mismatch aborts the run.

Timing: per (shape, mode), each contender is warmed up twice, then timed in repetitions that go
round-robin over the contenders (the starting contender rotates each repetition); a sample is
`number` back-to-back calls (enough to last --min-sample seconds), reported per call as the min
and median over repetitions. speedup = torch.nn.LSTM time / row time (> 1: faster than torch),
computed from the mins and from the medians.
"""

from __future__ import annotations

import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

FULL_SHAPES = ((2, 80, 100, 64), (32, 80, 100, 64), (64, 100, 128, 256), (16, 500, 32, 128), (256, 50, 64, 512))
QUICK_SHAPES = ((2, 80, 100, 64), (32, 80, 100, 64))
STREAM_SHAPES = {64: 100, 256: 128}  # H -> D of the streaming rows (the tutorial's D=100 at H=64)
FULL_MEMORY_SHAPE = (16, 2000, 32, 128)
QUICK_MEMORY_SHAPE = (16, 300, 32, 128)
TOLERANCE = 1e-4

MODE_TITLES = {
    "forward": "Inference forward (torch.no_grad), ms per call",
    "train": "Training step (forward + backward of sum(outputs); grads dropped between calls), ms per call",
    "stream": "Streaming, batch 1: latency of one step, us per step",
}


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a short run (< 1 minute): two shapes, 3 repetitions, H=64 streaming, small memory shape")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and ORT intra-op threads (2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="repetitions per contender (default 9, quick 3; capped by --budget unless given)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per shape and mode when --repeats is not given (default 15, quick 3)")
    parser.add_argument("--min-sample", type=float, default=None,
                        help="seconds a timed sample lasts at least (repeats fast calls; default 0.02, quick 0.005)")
    parser.add_argument("--shapes", nargs="+", metavar="B,T,D,H", default=None,
                        help="shapes to time (default: the five of the README; quick: the tutorial's two)")
    parser.add_argument("--modes", default="forward,train", help="comma list of forward,train (default both)")
    parser.add_argument("--stream-units", nargs="*", type=int, default=None, metavar="H",
                        help="H of the streaming rows (default 64 256, quick 64; none to skip)")
    parser.add_argument("--memory-shape", default=None, metavar="B,T,D,H",
                        help=f"shape of the peak-memory rows (default {','.join(map(str, FULL_MEMORY_SHAPE))}, "
                             f"quick {','.join(map(str, QUICK_MEMORY_SHAPE))})")
    parser.add_argument("--memory-contenders", default="lstm,recompute,torch,loop", metavar="LIST",
                        help="comma list of lstm, recompute (lstm.recomputed), reference, torch, loop (default "
                             "lstm,recompute,torch,loop: the reference kernel takes minutes per training step at "
                             "T=2000)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory rows")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    parser.add_argument("--variant-shape", default=None, metavar="B,T,D,H",
                        help="shape of the LSTM variants' training-step rows (default 32,80,100,64)")
    parser.add_argument("--no-variants", action="store_true", help="skip the LSTM variants' rows")
    parser.add_argument("--no-cells", action="store_true",
                        help="skip the GRU and SimpleRNN rows (against torch.nn.GRU / torch.nn.RNN)")
    parser.add_argument("--lengths-shape", default=None, metavar="B,T,D,H",
                        help="the ragged batch's shape (default 64,80,100,64: the sentiment task's)")
    parser.add_argument("--no-lengths", action="store_true",
                        help="skip the ragged batch (per-row lengths vs padded vs torch's PackedSequence)")
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip the bfloat16 rows (LSTM, GRU, SimpleRNN against torch's in bfloat16 and under "
                             "autocast)")
    parser.add_argument("--no-int8", action="store_true",
                        help="skip the int8 rows (lstm.quantize against float32 and ONNX Runtime's quantize_dynamic, "
                             "forward and streaming step)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (0)")
    parser.add_argument("--json", default=os.path.join("benchmarks", "results", "latest.json"), metavar="PATH",
                        help="where to write every number (default benchmarks/results/latest.json)")
    parser.add_argument("--md", default=None, metavar="PATH",
                        help="where to write the Markdown tables (default: the --json path with .md)")


# ----- small helpers ---------------------------------------------------------------------------
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module_name: str):
    try:
        module = __import__(module_name)
        return getattr(module, "__version__", "?")
    except ImportError:
        return None


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(threads: int) -> dict:
    import numpy
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": affinity,
        "threads": threads,
        "torch_num_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "cpp_kernels": _cpp_kernels(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_at_start": _load_average(),
    }


def _cpp_kernels() -> str:
    from lstm import kernels

    return kernels.native_build()


def _load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _fmt_time(seconds, unit: str) -> str:
    if seconds is None:
        return "n/a"
    value = seconds * (1e3 if unit == "ms" else 1e6)
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _fmt_load(load) -> str:
    return "?" if not load else f"{load[0]:.2f}"


def _fmt_ratio(ratio) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def _shape_text(shape) -> str:
    return ",".join(map(str, shape))


# ----- timing ----------------------------------------------------------------------------------
def time_interleaved(entries, repeats: int, explicit: bool, budget: float, min_sample: float, label: str) -> dict:
    """entries: [(name, fn, zero)]; zero() runs untimed before each call of fn().
    Returns {name: {"samples": [seconds per call], "number": calls per sample}}."""

    def one_call(fn, zero):
        zero()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    estimates = {}
    for name, fn, zero in entries:  # warm-up: two calls, the second is the estimate
        one_call(fn, zero)
        estimates[name] = max(one_call(fn, zero), 1e-7)
    numbers = {name: max(1, math.ceil(min_sample / est)) for name, est in estimates.items()}
    costs = {name: estimates[name] * numbers[name] for name in estimates}  # seconds per sample
    if explicit:
        reps = {name: repeats for name in costs}
    else:
        # each contender gets an equal share of the budget, at least 3 samples (2 when 3 alone
        # would overrun the whole budget), at most `repeats`
        share = budget / max(len(entries), 1)
        reps = {name: min(repeats, max(3 if 3 * cost <= budget else 2, int(share / max(cost, 1e-9))))
                for name, cost in costs.items()}
    planned = sum(costs[name] * reps[name] for name in costs)
    _log(f"  {label}: {min(reps.values())}-{max(reps.values())} repetitions x {len(entries)} contenders "
         f"(~{planned:.1f} s)")
    samples = {name: [] for name, _, _ in entries}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for rep in range(max(reps.values())):
            shift = rep % len(entries)
            for name, fn, zero in entries[shift:] + entries[:shift]:
                if rep >= reps[name]:
                    continue
                total = 0.0
                for _ in range(numbers[name]):
                    total += one_call(fn, zero)
                samples[name].append(total / numbers[name])
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: {"samples": samples[name], "number": numbers[name]} for name in samples}


def _summarize(mode, shape, timings: dict, contenders, baseline: str, notes: dict) -> list[dict]:
    rows = []
    base = timings.get(baseline)
    base_median = statistics.median(base["samples"]) if base else None
    base_min = min(base["samples"]) if base else None
    for contender in contenders:
        row = {"mode": mode, "shape": list(shape), "contender": contender.name, "baseline": baseline,
               "note": notes.get(contender.name, "")}
        timing = timings.get(contender.name)
        if timing is None:
            status = contender.status
            if status is None and mode == "train":
                status = contender.info.get("train", "n/a")
            row.update(status=status or "n/a", min_s=None, median_s=None, samples_s=[], calls_per_sample=None,
                       speedup_vs_baseline=None, speedup_vs_baseline_min=None)
        else:
            median, minimum = statistics.median(timing["samples"]), min(timing["samples"])
            row.update(status="ok", min_s=minimum, median_s=median, samples_s=timing["samples"],
                       calls_per_sample=timing["number"], repeats=len(timing["samples"]),
                       speedup_vs_baseline=(base_median / median) if base_median else None,
                       speedup_vs_baseline_min=(base_min / minimum) if base_min else None)
        rows.append(row)
    return rows


# ----- correctness -----------------------------------------------------------------------------
def check_shape(shape, contenders) -> list[dict]:
    """Every contender's forward vs torch.nn.LSTM, and this library's gradients vs torch's.
    Returns the records; raises ValueError with a clear message on a mismatch."""
    import torch

    from . import bench_cases as cases

    by_name = {c.name: c for c in contenders}
    base = by_name[cases.BASELINE]
    with torch.no_grad():
        expected = base.forward()
    records, failures = [], []
    for contender in contenders:
        if contender.status is not None or contender.name == cases.BASELINE:
            continue
        try:
            with torch.no_grad():
                got = contender.forward()
        except Exception as error:  # a crashing contender becomes an n/a row, the others still run
            contender.status = _error_status(error)
            records.append({"shape": list(shape), "contender": contender.name, "error": contender.status})
            continue
        diff = float((got - expected).abs().max())
        record = {"shape": list(shape), "contender": contender.name, "max_abs_diff_forward": diff}
        if diff > TOLERANCE or not math.isfinite(diff):
            failures.append(f"{contender.name}: forward max |diff| = {diff:.3g}")
        records.append(record)
    # gradients: this library (kernel, recurrent_kernel, bias) vs torch (weight_ih.T, weight_hh.T, bias_ih)
    base.zero_grad()
    base.train()
    grads_torch = _torch_grads(contenders)
    for name in (cases.LSTM_DEFAULT, cases.LSTM_REFERENCE):
        contender = by_name.get(name)
        if contender is None or contender.status is not None:
            continue
        contender.zero_grad()
        try:
            contender.train()
        except Exception as error:
            contender.info["train"] = _error_status(error)
            contender.train = None
            records.append({"shape": list(shape), "contender": name, "error_train": contender.info["train"]})
            continue
        layer_grads = _layer_grads(contender)
        worst = 0.0
        for ours, theirs in zip(layer_grads, grads_torch):
            scale = max(1.0, float(theirs.abs().max()))
            worst = max(worst, float((ours - theirs).abs().max()) / scale)
        for record in records:
            if record["contender"] == name:
                record["max_rel_diff_grad"] = worst
        if worst > TOLERANCE or not math.isfinite(worst):
            failures.append(f"{name}: gradient max |diff| / max(1, max|grad|) = {worst:.3g}")
        contender.zero_grad()
    base.zero_grad()
    if failures:
        raise ValueError(f"bench: shape B,T,D,H = {_shape_text(shape)}: results differ from torch.nn.LSTM by more "
                         f"than {TOLERANCE:g} (weights converted: weight_ih = kernel.T, weight_hh = "
                         f"recurrent_kernel.T, bias_ih = bias, bias_hh = 0); refusing to time a wrong "
                         f"computation: " + "; ".join(failures))
    return records


def _error_status(error: Exception) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"n/a (error: {type(error).__name__}: {first})"[:160]


def _torch_grads(contenders):
    """(kernel-, recurrent-, bias-) shaped grads of torch.nn.LSTM after its train() call."""
    from . import bench_cases as cases

    base = next(c for c in contenders if c.name == cases.BASELINE)
    lstm = base.info["module"]
    return [lstm.weight_ih_l0.grad.T.clone(), lstm.weight_hh_l0.grad.T.clone(), lstm.bias_ih_l0.grad.clone()]


def _layer_grads(contender):
    cell = contender.info["module"].cell
    return [cell.kernel.grad.clone(), cell.recurrent_kernel.grad.clone(), cell.bias.grad.clone()]


# ----- the run ---------------------------------------------------------------------------------
def _settings(args) -> dict:
    from . import bench_cases as cases, bench_lengths, bench_variants

    quick = args.quick
    shapes = ([cases.parse_shape(s) for item in args.shapes for s in item.split(";") if s.strip()]
              if args.shapes else list(QUICK_SHAPES if quick else FULL_SHAPES))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in ("forward", "train"):
            raise ValueError(f"--modes: unknown mode {mode!r}; expected forward and/or train")
    if args.threads < 1:
        raise ValueError("--threads must be >= 1")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError("--repeats must be >= 1")
    memory_keys = [k.strip() for k in args.memory_contenders.split(",") if k.strip()]
    for key in memory_keys:
        if key not in cases.MEMORY_KEYS:
            raise ValueError(f"--memory-contenders: unknown {key!r}; expected some of {', '.join(cases.MEMORY_KEYS)}")
    stream_units = args.stream_units if args.stream_units is not None else ([64] if quick else [64, 256])
    memory_shape = (cases.parse_shape(args.memory_shape) if args.memory_shape
                    else (QUICK_MEMORY_SHAPE if quick else FULL_MEMORY_SHAPE))
    return {
        "quick": quick, "shapes": shapes, "modes": modes, "threads": args.threads,
        "repeats": args.repeats if args.repeats is not None else (3 if quick else 9),
        "repeats_explicit": args.repeats is not None,
        "budget_s": args.budget if args.budget is not None else (3.0 if quick else 15.0),
        "min_sample_s": args.min_sample if args.min_sample is not None else (0.005 if quick else 0.02),
        "stream_units": stream_units, "memory_shape": None if args.no_memory else memory_shape,
        "memory_contenders": [cases.MEMORY_KEYS[k] for k in memory_keys],
        "onnx": not args.no_onnx, "seed": args.seed, "tolerance": TOLERANCE,
        "cells": not args.no_cells, "bf16": not args.no_bf16, "int8": not args.no_int8,
        "lengths_shape": None if args.no_lengths else (
            cases.parse_shape(args.lengths_shape) if args.lengths_shape else bench_lengths.SHAPE),
        "variant_shape": None if args.no_variants else (
            cases.parse_shape(args.variant_shape) if args.variant_shape else bench_variants.SHAPE),
    }


def run(args) -> int:
    import torch

    from .. import kernels
    from . import bench_cases as cases, bench_cells, bench_int8, bench_lengths, bench_precision, bench_variants

    settings = _settings(args)
    threads = settings["threads"]
    torch.set_num_threads(threads)
    started = time.perf_counter()
    report = {"machine": machine_info(threads), "settings": settings, "kernels_available": kernels.available(),
              "default_kernel": {}, "correctness": [], "results": [], "cells": [], "bf16": [], "int8": [],
              "lengths": [], "variants": None,
              "memory": None,
              "method": {"timing": __doc__.split("Timing: ", 1)[1].strip(), "memory": cases.MEMORY_METHOD}}
    _log(f"lstm bench: torch {torch.__version__}, {threads} threads, kernels {kernels.available()}, "
         f"onnxruntime {report['machine']['onnxruntime'] or 'not installed'}")
    load, cores = report["machine"]["load_average_at_start"], report["machine"]["cpus_available"] or 1
    if load and load[0] > 0.5 * cores:
        _log(f"warning: load average {load[0]:.2f} on {cores} cores: other processes compete for the CPU and "
             f"the timings will be noisy (compare min rather than median, or rerun on a quiet machine)")

    for shape in settings["shapes"]:
        _log(f"shape B,T,D,H = {_shape_text(shape)}")
        contenders, x = cases.sequence_contenders(shape, threads, settings["seed"], onnx=settings["onnx"])
        layer = next(c for c in contenders if c.name == cases.LSTM_DEFAULT).info["module"]
        kernel_names = {"forward": cases.default_kernel_name(layer, x, grad=False),
                        "train": cases.default_kernel_name(layer, x, grad=True)}
        report["default_kernel"][_shape_text(shape)] = kernel_names
        try:
            report["correctness"] += check_shape(shape, contenders)
        except ValueError as error:
            print(f"lstm bench: error: {error}", file=sys.stderr)
            return 1
        for mode in settings["modes"]:
            runnable = [c for c in contenders if c.status is None and (mode == "forward" or c.train is not None)]
            if mode == "forward":
                entries = [(c.name, c.forward, lambda: None) for c in runnable]
                with torch.no_grad():
                    timings = time_interleaved(entries, settings["repeats"], settings["repeats_explicit"],
                                               settings["budget_s"], settings["min_sample_s"], mode)
            else:
                entries = [(c.name, c.train, c.zero_grad) for c in runnable]
                timings = time_interleaved(entries, settings["repeats"], settings["repeats_explicit"],
                                           settings["budget_s"], settings["min_sample_s"], mode)
                for c in runnable:
                    c.zero_grad()
            notes = {cases.LSTM_DEFAULT: f"kernel {kernel_names[mode]}", cases.LSTM_REFERENCE: "kernel reference",
                     cases.BASELINE: "oneDNN" if report["machine"]["mkldnn"] else "",
                     cases.ONNX: f"ORT {threads} intra-op threads" if mode == "forward" else ""}
            report["results"] += _summarize(mode, shape, timings, contenders, cases.BASELINE, notes)
        del contenders, x
        gc.collect()

    for units in settings["stream_units"]:
        D = STREAM_SHAPES.get(units, units)
        _log(f"streaming D={D} H={units}")
        contenders, check = cases.stream_contenders(D, units, settings["seed"])
        diffs = check()
        bad = {name: diff for name, diff in diffs.items() if diff > TOLERANCE or not math.isfinite(diff)}
        report["correctness"] += [{"shape": [1, 1, D, units], "contender": name, "max_abs_diff_stream": diff}
                                  for name, diff in diffs.items()]
        if bad:
            print(f"lstm bench: error: streaming D={D} H={units}: steps differ from torch.nn.LSTMCell by more "
                  f"than {TOLERANCE:g}: " + "; ".join(f"{n}: {d:.3g}" for n, d in bad.items()), file=sys.stderr)
            return 1
        entries = [(c.name, c.forward, lambda: None) for c in contenders if c.status is None]
        with torch.no_grad():
            timings = time_interleaved(entries, settings["repeats"], settings["repeats_explicit"],
                                       settings["budget_s"], settings["min_sample_s"], "stream")
        notes = {}
        for c in contenders:
            if c.name == cases.STREAM_LSTM and c.status is None:
                notes[c.name] = f"on {c.info.get('owner')}"
        report["results"] += _summarize("stream", (1, 1, D, units), timings, contenders, cases.STREAM_BASELINE, notes)

    # sections of contenders timed against one baseline per shape: (report key, log line, contenders
    # and input, the check, the baseline's name, the shapes) per cell
    paired = []
    for cell in bench_cells.CELLS if settings["cells"] else ():
        paired.append(("cells", f"{bench_cells.ours_name(cell)} vs {bench_cells.torch_name(cell)}",
                       functools.partial(bench_cells.cell_contenders, cell),
                       functools.partial(bench_cells.check, tolerance=TOLERANCE), bench_cells.torch_name(cell),
                       settings["shapes"]))
    for cell in bench_precision.CELLS if settings["bf16"] else ():
        paired.append(("bf16", f"bfloat16: {bench_precision.ours_name(cell)} vs {bench_precision.torch_name(cell)}",
                       functools.partial(bench_precision.contenders, cell), bench_precision.check,
                       bench_precision.torch_name(cell), settings["shapes"]))
    if settings["int8"]:
        paired.append(("int8", f"int8: {bench_int8.OURS} vs {bench_int8.BASELINE} and ONNX Runtime",
                       functools.partial(bench_int8.contenders, threads=threads, onnx=settings["onnx"]),
                       bench_int8.check, bench_int8.BASELINE, settings["shapes"]))
        paired.append(("int8", f"int8: {bench_int8.STREAM_OURS} vs {bench_int8.STREAM_BASELINE}",
                       bench_int8.stream_contenders, bench_int8.check, bench_int8.STREAM_BASELINE, settings["shapes"]))
    if settings["lengths_shape"] is not None:
        paired.append(("lengths", "ragged batch: lengths vs padded vs torch's PackedSequence", bench_lengths.contenders,
                       bench_lengths.check, bench_lengths.BASELINE, [tuple(settings["lengths_shape"])]))
    for key, title, make, check, baseline, shapes in paired:
        for shape in shapes:
            _log(f"{title} at B,T,D,H = {_shape_text(shape)}")
            contenders, x = make(shape, settings["seed"])
            try:
                report["correctness"].append({"shape": list(shape), "contender": contenders[0].name,
                                              **check(contenders, x)})
            except ValueError as error:
                print(f"lstm bench: error: {error}", file=sys.stderr)
                return 1
            for mode in settings["modes"]:
                if mode != "forward" and any(c.train is None for c in contenders):  # (inference rows: int8)
                    continue
                runnable = [c for c in contenders if c.status is None]
                if mode == "forward":
                    with torch.no_grad():
                        timings = time_interleaved([(c.name, c.forward, lambda: None) for c in runnable],
                                                   settings["repeats"], settings["repeats_explicit"],
                                                   settings["budget_s"], settings["min_sample_s"], mode)
                else:
                    timings = time_interleaved([(c.name, c.train, c.zero_grad) for c in runnable],
                                               settings["repeats"], settings["repeats_explicit"],
                                               settings["budget_s"], settings["min_sample_s"], mode)
                report[key] += _summarize(mode, shape, timings, contenders, baseline, {})
            del contenders, x
            gc.collect()

    if settings["variant_shape"] is not None:
        shape = tuple(settings["variant_shape"])
        _log(f"LSTM variants, training step at B,T,D,H = {_shape_text(shape)}")
        contenders = bench_variants.variant_contenders(shape, settings["seed"])
        # The ratios to the plain fused LSTM come from a group of the fused contenders alone, with
        # three times the repetitions, paired round by round (bench_variants.paired_ratio):
        # interleaved with the ~45 ms per-step loops, their minima swung by about +-0.1 from run to
        # run (cell_clip 1.05 to 1.27), every variant together.
        fused = [c for c in contenders if bench_variants.is_fused(c)]
        others = [c for c in contenders if not bench_variants.is_fused(c)]
        timings = {}
        for group, factor, label in ((fused, 3, "variants (fused)"), (others, 1, "variants (loops, torch)")):
            timings.update(time_interleaved([(c.name, c.train, c.zero_grad) for c in group],
                                            settings["repeats"] * factor, settings["repeats_explicit"],
                                            settings["budget_s"], settings["min_sample_s"], label))
        report["variants"] = {"shape": list(shape), "rows": bench_variants.summarize(shape, timings)}
        del contenders

    if settings["memory_shape"] is not None:
        shape = tuple(settings["memory_shape"])
        _log(f"peak memory of a training step at B,T,D,H = {_shape_text(shape)} (one fresh process each)")
        rows = []
        for name in settings["memory_contenders"]:
            row = cases.run_memory_subprocess(name, shape, threads, settings["seed"], timeout=300)
            row.setdefault("status", "ok")
            rows.append(row)
            _log(f"  {name}: {row.get('peak_growth_bytes', row['status'])}")
        base = next((r for r in rows if r["contender"] == cases.BASELINE and r["status"] == "ok"), None)
        for row in rows:
            if row["status"] == "ok" and base and base["peak_growth_bytes"]:
                row["ratio_vs_baseline"] = row["peak_growth_bytes"] / base["peak_growth_bytes"]
            else:
                row["ratio_vs_baseline"] = None
        report["memory"] = {"shape": list(shape), "baseline": cases.BASELINE, "method": cases.MEMORY_METHOD,
                            "rows": rows}

    report["total_seconds"] = time.perf_counter() - started
    report["machine"]["load_average_at_end"] = _load_average()
    text = render_text(report)
    print(text)
    markdown = render_markdown(report)
    json_path = args.json
    md_path = args.md or os.path.splitext(json_path)[0] + ".md"
    for path, content in ((json_path, json.dumps(report, indent=1) + "\n"), (md_path, markdown)):
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(path, "w") as f:
            f.write(content)
    print(f"\nwrote {json_path} and {md_path} ({report['total_seconds']:.0f} s)")
    return 0


# ----- output ----------------------------------------------------------------------------------
def _table_rows(report, mode):
    unit = "us" if mode == "stream" else "ms"
    rows = []
    for r in report["results"]:
        if r["mode"] != mode:
            continue
        shape = f"D={r['shape'][2]},H={r['shape'][3]}" if mode == "stream" else _shape_text(r["shape"])
        if r["status"] == "ok":
            cells = [_fmt_time(r["min_s"], unit), _fmt_time(r["median_s"], unit),
                     _fmt_ratio(r["speedup_vs_baseline_min"]), _fmt_ratio(r["speedup_vs_baseline"])]
            note = r["note"]
        else:
            cells = ["n/a", "n/a", "n/a", "n/a"]
            note = r["status"]
        rows.append([shape, r["contender"], *cells, note])
    return rows, unit


def _memory_rows(report):
    rows = []
    for r in report["memory"]["rows"]:
        if r["status"] == "ok":
            rows.append([r["contender"], f"{r['peak_growth_bytes'] / 2**20:.1f}", f"{r['saved_tensor_bytes'] / 2**20:.1f}",
                         _fmt_ratio(r["ratio_vs_baseline"]), f"{r['step_seconds']:.2f}"])
        else:
            rows.append([r["contender"], "n/a", "n/a", "n/a", r["status"]])
    return rows


BF16_TITLE = ("bfloat16: min ms per call (speedup vs torch's module in bfloat16 with the same weights, from the "
              "mins and the medians; fp32: this library in float32, autocast: torch's float32 module under "
              "torch.autocast)")
INT8_TITLE = ("int8 inference: min ms per call (speedup vs this library's float32 layer with the same weights, from "
              "the mins and the medians; stream(B).step: one step of B rows, vs the float32 stream's)")
LENGTHS_TITLE = ("Ragged batch (lengths like the sentiment task's: mean 18.5 of 80 steps): min ms per call (speedup "
                 "vs the same call over the padded batch, its mask computed at every step, from the mins and the "
                 "medians; lengths = T: every row full length)")
CELLS_TITLE = ("GRU and SimpleRNN: min ms per call (speedup vs torch.nn.GRU / torch.nn.RNN with the same weights, "
               "from the mins and the medians)")


def _paired_rows(results) -> list[list[str]]:
    """The rows of a section timed against one baseline per shape (GRU/SimpleRNN, bfloat16, lengths)."""
    head = ["mode", "B,T,D,H", "contender", "min ms", "baseline min ms", "speedup (min)", "speedup (median)"]
    rows = [head]
    by_key = {}
    for r in results or ():
        by_key.setdefault((r["mode"], _shape_text(r["shape"]), r["baseline"]), {})[r["contender"]] = r
    for (mode, shape, baseline), by_name in by_key.items():
        for name, r in by_name.items():
            if name == baseline:
                continue
            rows.append([mode, shape, name, _fmt_time(r["min_s"], "ms"), _fmt_time(by_name[baseline]["min_s"], "ms"),
                         _fmt_ratio(r["speedup_vs_baseline_min"]), _fmt_ratio(r["speedup_vs_baseline"])])
    return rows


def _variants_title(report) -> str:
    return (f"LSTM variants: training step at B,T,D,H = {_shape_text(report['variants']['shape'])} (min ms; x plain "
            f"fused = the median over rounds of the variant's time / the plain fused LSTM's in the same round, "
            f"x plain (mins) = their minima's ratio; loop = the reference kernel, a PyTorch per-step loop)")


def _variant_table(report) -> list[list[str]]:
    from . import bench_variants

    return bench_variants.table_rows(report["variants"]["rows"])


def _header(report) -> list[str]:
    m, s = report["machine"], report["settings"]
    kernels_used = sorted({f"{k['forward']} (no_grad) / {k['train']} (autograd)"
                           for k in report["default_kernel"].values()})
    return [
        f"CPU: {m['cpu_model']}, {m['cpus_available']} cores available, {m['threads']} threads; torch {m['torch']}, "
        f"numpy {m['numpy']}, onnxruntime {m['onnxruntime'] or 'not installed'}; {m['date']}; "
        f"load average {_fmt_load(m.get('load_average_at_start'))} at start, {_fmt_load(m.get('load_average_at_end'))} at end",
        f"lstm default kernel: {', '.join(kernels_used) or 'n/a'} (C++ kernels: {m.get('cpp_kernels', 'n/a')}); "
        f"kernels available: "
        f"{', '.join(report['kernels_available'])}",
        f"min / median over repetitions (up to {s['repeats']}, round-robin over contenders, ~{s['budget_s']:g} s "
        f"per shape and mode unless --repeats); "
        f"speedup = baseline time / row time, from the mins and from the medians (> 1 is faster than the "
        f"baseline: torch.nn.LSTM, torch.nn.LSTMCell for streaming); on a busy machine trust the mins",
    ]


def _summary_rows(report):
    """One row per (mode, shape): each contender's median and speedup, README-sized."""
    from . import bench_cases as cases

    head = ["mode", "B,T,D,H"] + [cases.SHORT_NAMES[name] for name in cases.SEQUENCE_CONTENDERS]
    rows, index = [head], {}
    for r in report["results"]:
        if r["mode"] in ("forward", "train"):
            index.setdefault((r["mode"], _shape_text(r["shape"])), {})[r["contender"]] = r
    for (mode, shape), by_name in index.items():
        cells = []
        for name in cases.SEQUENCE_CONTENDERS:
            r = by_name.get(name)
            if r is None or r["status"] != "ok":
                cells.append("n/a")
            elif name == cases.BASELINE:
                cells.append(f"{_fmt_time(r['min_s'], 'ms')} ms")
            else:
                cells.append(f"{_fmt_time(r['min_s'], 'ms')} ms ({_fmt_ratio(r['speedup_vs_baseline_min'])})")
        rows.append([mode, shape] + cells)
    return rows


def render_text(report) -> str:
    lines = [""] + _header(report)
    summary = _summary_rows(report)
    if len(summary) > 1:
        lines += ["", "== Summary: best (min) time per call (speedup vs torch.nn.LSTM, from the mins) =="] + _plain_table(summary)
    for mode in ("forward", "train", "stream"):
        rows, unit = _table_rows(report, mode)
        if not rows:
            continue
        head = ["shape" if mode != "stream" else "D,H", "contender", f"min {unit}", f"median {unit}", "speedup (min)",
                "speedup (median)", "note"]
        lines += ["", f"== {MODE_TITLES[mode]} =="] + _plain_table([head] + rows, right={2, 3, 4, 5})
    if report.get("cells"):
        lines += ["", f"== {CELLS_TITLE} =="] + _plain_table(_paired_rows(report["cells"]), right={3, 4, 5, 6})
    if report.get("bf16"):
        lines += ["", f"== {BF16_TITLE} =="] + _plain_table(_paired_rows(report["bf16"]), right={3, 4, 5, 6})
    if report.get("int8"):
        lines += ["", f"== {INT8_TITLE} =="] + _plain_table(_paired_rows(report["int8"]), right={3, 4, 5, 6})
    if report.get("lengths"):
        lines += ["", f"== {LENGTHS_TITLE} =="] + _plain_table(_paired_rows(report["lengths"]), right={3, 4, 5, 6})
    if report["variants"]:
        lines += ["", f"== {_variants_title(report)} =="] + _plain_table(_variant_table(report), right={1, 2, 3, 4, 5})
    if report["memory"]:
        shape = _shape_text(report["memory"]["shape"])
        head = ["contender", "peak growth MiB", "saved MiB", "vs torch", "step s (that run)"]
        lines += ["", f"== Peak memory of one training step at B,T,D,H = {shape} (ratio = ours / torch.nn.LSTM) =="]
        lines += _plain_table([head] + _memory_rows(report), right={1, 2, 3, 4})
        lines += ["method: " + report["memory"]["method"]]
    return "\n".join(lines)


def _plain_table(rows, right=()) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, row in enumerate(rows):
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _md_table(rows, right=()) -> list[str]:
    out = ["| " + " | ".join(rows[0]) + " |",
           "|" + "|".join("---:" if i in right else "---" for i in range(len(rows[0]))) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows[1:]]
    return out


def render_markdown(report) -> str:
    lines = ["# `lstm bench` results", ""] + [f"- {line}" for line in _header(report)]
    summary = _summary_rows(report)
    if len(summary) > 1:
        lines += ["", "### Summary: best (min) time per call (speedup vs torch.nn.LSTM, from the mins)", ""] + _md_table(summary)
    for mode in ("forward", "train", "stream"):
        rows, unit = _table_rows(report, mode)
        if not rows:
            continue
        head = ["shape (B,T,D,H)" if mode != "stream" else "D,H", "contender", f"min {unit}", f"median {unit}",
                "speedup (min)", "speedup (median)", "note"]
        lines += ["", f"### {MODE_TITLES[mode]}", ""] + _md_table([head] + rows, right={2, 3, 4, 5})
    if report.get("cells"):
        lines += ["", f"### {CELLS_TITLE}", ""] + _md_table(_paired_rows(report["cells"]), right={3, 4, 5, 6})
    if report.get("bf16"):
        lines += ["", f"### {BF16_TITLE}", ""] + _md_table(_paired_rows(report["bf16"]), right={3, 4, 5, 6})
    if report.get("int8"):
        lines += ["", f"### {INT8_TITLE}", ""] + _md_table(_paired_rows(report["int8"]), right={3, 4, 5, 6})
    if report.get("lengths"):
        lines += ["", f"### {LENGTHS_TITLE}", ""] + _md_table(_paired_rows(report["lengths"]), right={3, 4, 5, 6})
    if report["variants"]:
        lines += ["", f"### {_variants_title(report)}", ""] + _md_table(_variant_table(report), right={1, 2, 3, 4, 5})
    if report["memory"]:
        shape = _shape_text(report["memory"]["shape"])
        head = ["contender", "peak growth MiB", "saved for backward MiB", "vs torch.nn.LSTM", "step s (that run)"]
        lines += ["", f"### Peak memory of one training step, B,T,D,H = {shape}", ""]
        lines += _md_table([head] + _memory_rows(report), right={1, 2, 3, 4})
        lines += ["", "Method: " + report["memory"]["method"]]
    lines += ["", f"Generated by `lstm bench{' --quick' if report['settings']['quick'] else ''}` "
                  f"(commit {report['machine']['git_commit'] or '?'}).", ""]
    return "\n".join(lines)
