"""`lstm train TASK`: train a task on its real data; a run folder gets metrics.json, curves.png and
a checkpoint each epoch. `--resume RUN` continues a run exactly; `--quick` is a smoke test under a
minute. Under `torchrun --nproc_per_node=N` the same command trains with DistributedDataParallel."""

from __future__ import annotations

import argparse
import sys

# option -> (type, help); None values keep the task's default
OPTIONS = {
    "epochs": (int, "epochs to train"),
    "batch_size": (int, "examples per step (over all ranks)"),
    "lr": (float, "peak learning rate (AdamW, warm-up then cosine decay)"),
    "weight_decay": (float, "AdamW weight decay"),
    "seed": (int, "training seed (weights, order, dropout); the data splits are fixed"),
    "steps_per_epoch": (int, "cap on the steps of an epoch (0: the whole training split)"),
    "units": (int, "LSTM units"),
    "embedding": (int, "embedding size (text tasks)"),
    "dropout": (float, "dropout rate"),
    "maxlen": (int, "words kept per text (sentiment) / steps per series (vowels)"),
    "seq_len": (int, "characters per training sequence (charlm)"),
    "season": (int, "season length of the series (forecast; Taylor: 336 half hours = a week)"),
    "horizon": (int, "steps to forecast (forecast)"),
    "read": (int, "steps of the window the LSTM reads (forecast; at most --season)"),
    "day": (int, "a second, shorter season whose changes the LSTM also reads (forecast; default season / 7)"),
    "ar": (int, "seasonal differences the linear highway reads (forecast; 0: none)"),
    "length": (int, "sequence length of the adding problem"),
    "delay": (int, "blank steps to remember over (copy)"),
    "bptt": (int, "truncated BPTT: gradients flow back at most K steps, the state detached every K (charlm, "
                  "forecast, adding)"),
    "recompute": (int, "backward recomputes chunks of N steps instead of storing them: less memory, about "
                       "one more forward (charlm, forecast, adding; with --bptt, a divisor of it)"),
    "precision": (str, "fp32 (default), bf16 (torch.autocast in bfloat16, float32 weights) or fp16 (autocast in "
                       "float16 with loss scaling)"),
    "data": (str, "your own data: a CSV file (sentiment, forecast) or a text file (charlm)"),
    "text_column": (str, "CSV column of the texts (sentiment --data; default 'text')"),
    "label_column": (str, "CSV column of the labels (sentiment --data; default 'label')"),
    "column": (str, "CSV column of the series (forecast --data; default 'value')"),
}


def add_arguments(parser) -> None:
    from ..train.tasks import TASKS

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "tasks:\n" + task_list()
    # (no `choices`: argparse would answer a mistyped task with the whole usage before the tasks; run()
    # names the known tasks and the closest one)
    parser.add_argument("task", nargs="?", metavar="TASK", help=f"one of {', '.join(TASKS)} (omit with --resume)")
    parser.add_argument("--out", metavar="DIR", help="run folder (default runs/TASK-DATE-TIME)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    parser.add_argument("--quick", action="store_true", help="a tiny run (under a minute), for smoke tests")
    parser.add_argument("--save-every", type=int, default=0, metavar="N",
                        help="also checkpoint every N steps inside an epoch")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    for name, (kind, help_text) in OPTIONS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=help_text)


def task_list() -> str:
    """One line per task: its name and what it trains on (the task registry's own description)."""
    from ..train.tasks import TASKS

    return "\n".join(f"  {name:<10} {task.help}" for name, task in TASKS.items())


def run(args) -> int:
    import torch

    from ..train import TrainError
    from ..train.interrupt import TrainingInterrupted
    from ..train.loop import train

    if args.task is None and not args.resume:
        raise TrainError("give a TASK to train (or --resume RUN to continue a run); the tasks:\n" + task_list()
                         + "\nTo start: `lstm train sentiment` (add --quick for a smoke run under a minute); "
                           "`lstm train --help` lists the options")
    if args.task is not None and args.resume:
        raise TrainError("give either a TASK or --resume RUN, not both (a resumed run keeps its task)")
    if args.resume and args.quick:
        raise TrainError("--quick cannot change a resumed run")
    torch.set_num_threads(max(1, args.threads))
    options = {name: getattr(args, name) for name in OPTIONS}
    if args.device:
        options["device"] = args.device
    from ..train import distributed

    # the process group is torn down after a run every rank ended (done, or stopped at the same step);
    # not after an error, when the other ranks may be inside a collective and the teardown would hang
    try:
        train(options, task_name=args.task, out=args.out, resume=args.resume, quick=args.quick,
              progress=not args.no_progress, save_every=args.save_every)
    except TrainingInterrupted as stopped:
        distributed.cleanup()
        print(f"lstm train: {stopped}", file=sys.stderr)
        return stopped.exit_code
    distributed.cleanup()
    return 0
