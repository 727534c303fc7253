"""`lstm generate CHECKPOINT --prompt TEXT --temperature T`: sample text from a character model."""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a charlm run folder or one of its checkpoints")
    parser.add_argument("--prompt", default="\n", help="text to start from (default: a new line)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (> 0; default 0.8)")
    parser.add_argument("--length", type=int, default=500, help="characters to generate (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")


def run(args) -> int:
    import torch

    from ..train import TrainError
    from ..train.generate import sample
    from ..train.restore import caveat, restore

    if not args.temperature > 0:
        raise TrainError(f"--temperature must be > 0, got {args.temperature}")
    if args.length < 0:
        raise TrainError(f"--length must be >= 0, got {args.length}")
    torch.set_num_threads(2)
    task, model, hp, folder = restore(args.checkpoint)
    if task.name != "charlm":
        raise TrainError(f"generate needs a charlm checkpoint; {folder} is a {task.name} checkpoint")
    from ..train.checkpoint import read_config

    text = sample(model, read_config(folder)["meta"], args.prompt, args.length, args.temperature, args.seed)
    print(args.prompt + text)
    warning = caveat(task, folder)
    if warning:
        print(f"lstm generate: {warning}", file=sys.stderr)
    return 0
