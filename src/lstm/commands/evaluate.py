"""`lstm evaluate CHECKPOINT`: the metrics of a checkpoint (a run folder: its best checkpoint) on the
validation and test splits, beside the task's baseline; `--onnx FILE`: of its exported model, run
by ONNX Runtime; `--int8`: of the model with its LSTM layers quantized (`lstm.quantize`)."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a run folder or one of its checkpoints")
    parser.add_argument("--split", choices=["val", "test", "both"], default="both")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline")
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--onnx", metavar="FILE", help="measure the model exported to FILE (`lstm export CHECKPOINT "
                                                       "--format onnx [--int8]`) in ONNX Runtime instead")
    parser.add_argument("--int8", action="store_true", help="measure the model with its LSTM layers on int8 weights "
                                                            "(lstm.quantize)")


def run(args) -> int:
    import torch

    from ..train.loop import evaluate
    from ..train.restore import restore

    torch.set_num_threads(2)
    task, model, hp, folder = restore(args.checkpoint)
    if args.int8:
        from ..train.restore import quantized

        model = quantized(model, args.onnx)
    if args.onnx:
        from ..train.models import CharLM
        from .onnx_model import OnnxModel

        model = OnnxModel(args.onnx, returns_state=isinstance(model, CharLM))
    data = task.load(hp)
    splits = ["val", "test"] if args.split == "both" else [args.split]
    result = {"task": task.name, "checkpoint": str(folder)}
    for split in splits:
        result[split] = evaluate(task, model, data, split, hp)
    if not args.no_baseline:
        result["baseline"] = task.baseline(data, hp)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{task.name} checkpoint {folder}")
    for split in splits:
        print(f"  {split:<5} " + "  ".join(f"{k} {v:.4f}" for k, v in result[split].items()))
    if "baseline" in result:
        print(f"  baseline: {json.dumps(result['baseline'])}")
    return 0
