"""`lstm export CHECKPOINT --format keras`: a trained run's model as a file other tools load (a Keras 3
`.keras` model that `keras.saving.load_model` reads with no custom objects)."""

from __future__ import annotations

from pathlib import Path

FORMATS = ("keras",)


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a run folder or one of its checkpoints")
    parser.add_argument("--format", choices=FORMATS, default="keras", help="the file format (default keras)")
    parser.add_argument("--output", metavar="PATH", help="where to write (default: model.keras in the run folder; "
                                                         "for a checkpoint folder, <checkpoint>.keras beside it)")


def run(args) -> int:
    from .. import save_keras
    from ..train.models import keras_model
    from ..train.restore import restore

    task, model, _, folder = restore(args.checkpoint)
    run_folder = Path(args.checkpoint)
    if args.output:
        output = Path(args.output)
    elif (run_folder / "latest.json").exists():
        output = run_folder / "model.keras"
    else:
        output = folder.parent / f"{folder.name}.keras"
    save_keras(keras_model(model, task.name), output)
    print(f"wrote {output} (a Keras 3 model: keras.saving.load_model({str(output)!r}))")
    return 0
