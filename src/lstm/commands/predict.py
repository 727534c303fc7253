"""`lstm predict CHECKPOINT INPUT...`: a sentence -> label and probability (sentiment); a series (numbers
or a CSV file) -> its forecast (forecast) or speaker (vowels). Several inputs, or `--file PATH` with one
per line, give one result per line; `--onnx FILE` runs the exported model in ONNX Runtime; `--int8` the model
with its LSTM layers quantized (`lstm.quantize`)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a run folder or one of its checkpoints")
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="a sentence; or numbers / a CSV file for series tasks; several give one result each")
    parser.add_argument("--file", metavar="PATH", help="read the inputs from PATH, one per line (blank lines skipped)")
    parser.add_argument("--json", action="store_true", help="print JSON (a list when there are several inputs)")
    parser.add_argument("--onnx", metavar="FILE", help="run the model exported to FILE (`lstm export CHECKPOINT "
                                                       "--format onnx`) in ONNX Runtime instead of the checkpoint's")
    parser.add_argument("--int8", action="store_true", help="run the model with its LSTM layers on int8 weights "
                                                            "(lstm.quantize)")


def run(args) -> int:
    import torch

    from ..train import TrainError
    from ..train.restore import caveat, restore

    torch.set_num_threads(2)
    task, model, hp, folder = restore(args.checkpoint)
    if task.name == "charlm":
        prompt = shlex.quote(args.inputs[0]) if args.inputs else "TEXT"
        raise TrainError(f"{args.checkpoint} is a charlm run: a character model writes text rather than labelling "
                         f"it; use `lstm generate {shlex.quote(args.checkpoint)} --prompt {prompt}`")
    inputs = _inputs(args)
    if args.int8:
        from ..train.restore import quantized

        model = quantized(model, args.onnx)
    if args.onnx:
        from .onnx_model import OnnxModel

        model = OnnxModel(args.onnx)
    meta = _meta(folder)
    results = [task.predict(model, hp, meta, text) for text in inputs]
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0]))
    else:
        for result in results:
            if "label" in result:
                print(f"{result['label']}  (probability {result['probability']:.3f})")
            else:
                print(" ".join(f"{v:g}" for v in result["forecast"]))
    warning = caveat(task, folder)
    if warning:
        print(f"lstm predict: {warning}", file=sys.stderr)
    return 0


def _inputs(args) -> list:
    """The INPUTs given, or the non-blank lines of --file; never none."""
    from ..train import TrainError

    if args.file is None:
        if not args.inputs:
            raise TrainError("INPUT: none given; give one or more (a sentence; numbers or a CSV file for series "
                             "tasks), or --file PATH with one per line")
        return args.inputs
    if args.inputs:
        raise TrainError(f"--file {args.file}: give the inputs either on the command line or in the file, not both "
                         f"(got {len(args.inputs)} on the command line)")
    path = Path(args.file)
    if not path.is_file():
        raise TrainError(f"--file {args.file}: no such file")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise TrainError(f"--file {args.file}: no input in it (expected one input per line; blank lines are "
                         f"skipped)")
    return lines


def _meta(folder):
    from ..train.checkpoint import read_config

    return read_config(folder)["meta"]
