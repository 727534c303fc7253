"""`lstm export CHECKPOINT --format keras|onnx`: a trained run's model as a file other tools load: a
Keras 3 `.keras` model that `keras.saving.load_model` reads with no custom objects, or an ONNX
graph (opset 17) that ONNX Runtime runs (`--state`: with each recurrent layer's state as inputs and
outputs, to run a sequence chunk by chunk; `--int8`: quantized; `lstm predict RUN --onnx FILE` and
`lstm evaluate RUN --onnx FILE` run it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FORMATS = {"keras": ".keras", "onnx": ".onnx"}


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a run folder or one of its checkpoints")
    parser.add_argument("--format", choices=FORMATS, default="keras", help="the file format (default keras)")
    parser.add_argument("--output", metavar="PATH", help="where to write (default: model.keras or model.onnx in the "
                                                         "run folder; for a checkpoint folder, <checkpoint>.keras or "
                                                         ".onnx beside it)")
    parser.add_argument("--state", action="store_true",
                        help="onnx: each recurrent layer's initial state as graph inputs (<layer>/initial_h, "
                             "<layer>/initial_c) and its final state as outputs (<layer>/h, <layer>/c)")
    parser.add_argument("--int8", action="store_true",
                        help="onnx: int8 weights, activations quantized at run time (ONNX Runtime's "
                             "quantize_dynamic; default file model-int8.onnx)")


def run(args) -> int:
    from .. import export_onnx, save_keras
    from ..train.models import keras_model
    from ..train.restore import restore

    for flag, given in (("--state", args.state), ("--int8", args.int8)):
        if given and args.format != "onnx":
            raise ValueError(f"{flag}: only for --format onnx, got --format {args.format}")
    task, model, _, folder = restore(args.checkpoint)
    run_folder = Path(args.checkpoint)
    suffix = ("-int8" if args.int8 else "") + FORMATS[args.format]
    if args.output:
        output = Path(args.output)
    elif (run_folder / "latest.json").exists():
        output = run_folder / f"model{suffix}"
    else:
        output = folder.parent / f"{folder.name}{suffix}"
    if args.format == "keras":
        save_keras(keras_model(model, task.name), output)
        print(f"wrote {output} (a Keras 3 model: keras.saving.load_model({str(output)!r}))")
        return 0
    import onnx

    layers = keras_model(model, task.name, "ONNX")
    export_onnx(layers, output, example_input(layers), state=args.state, mask=task.takes_mask, quantize=args.int8)
    graph = onnx.load(str(output)).graph
    print(f"wrote {output} (ONNX opset 17{', int8' if args.int8 else ''}; inputs "
          f"{', '.join(i.name for i in graph.input)}; outputs {', '.join(o.name for o in graph.output)})")
    return 0


def example_input(model) -> np.ndarray:
    """One step of what `model` (a task's Sequential) reads: token ids, or features."""
    from ..layers import Bidirectional, Embedding

    first = model.layers[0]
    if isinstance(first, Embedding):
        return np.ones((1, 1), np.int64)
    cell = (first.forward_layer if isinstance(first, Bidirectional) else first).cell
    return np.zeros((1, 1, cell.input_dim), np.float32)
