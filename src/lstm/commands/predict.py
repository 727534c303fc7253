"""`lstm predict CHECKPOINT INPUT`: a sentence -> label and probability (sentiment); a series (numbers
or a CSV file) -> its forecast (forecast) or speaker (vowels)."""

from __future__ import annotations

import json


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a run folder or one of its checkpoints")
    parser.add_argument("input", metavar="INPUT", help="a sentence; or numbers / a CSV file for series tasks")
    parser.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    import torch

    from ..train.restore import restore

    torch.set_num_threads(2)
    task, model, hp, folder = restore(args.checkpoint)
    result = task.predict(model, hp, _meta(folder), args.input)
    if args.json:
        print(json.dumps(result))
    elif "label" in result:
        print(f"{result['label']}  (probability {result['probability']:.3f})")
    else:
        print(" ".join(f"{v:g}" for v in result["forecast"]))
    return 0


def _meta(folder):
    from ..train.checkpoint import read_config

    return read_config(folder)["meta"]
