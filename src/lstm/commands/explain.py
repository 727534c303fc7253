"""`lstm explain [gates|gradients|memory|all] --out DIR`: what the tutorial teaches, measured on
this library's layers and drawn: gate traces and the gate table, vanishing and exploding gradients,
long memory against T. Writes PNG figures, report.md and numbers.json into DIR."""

from __future__ import annotations

import sys
import time

PARTS = ("gates", "gradients", "memory")


def add_arguments(parser) -> None:
    parser.add_argument("parts", nargs="*", metavar="PART",
                        help="gates, gradients, memory or all (default all); several may be given")
    parser.add_argument("--out", metavar="DIR", help="output folder (default runs/explain-DATE-TIME)")
    parser.add_argument("--quick", action="store_true", help="tiny settings: the whole run in under a minute")
    parser.add_argument("--run", metavar="RUN", help="a run folder of `lstm train` (or a checkpoint): trace the "
                                                     "gates of its model instead of the adding LSTM trained here")
    parser.add_argument("--input", metavar="TEXT", help="the input to trace with --run: a sentence (sentiment), "
                                                        "a text (charlm), numbers or a CSV file (forecast, vowels)")
    parser.add_argument("--seed", type=int, default=0, help="which generated example to trace (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr (which part runs, "
                                                             "seconds so far)")


def parts_of(names: list) -> list:
    """The parts asked for, in report order; 'all' (or nothing) means every part."""
    for name in names:
        if name not in (*PARTS, "all"):
            raise ValueError(f"PART: unknown part {name!r}; expected one of {', '.join(PARTS)} or all")
    return list(PARTS) if not names or "all" in names else [part for part in PARTS if part in names]


def progress(args, line: str) -> None:
    if not args.quiet:
        print(f"lstm explain: {line}", file=sys.stderr, flush=True)


def run(args) -> int:
    import os
    from pathlib import Path

    import torch

    from ..explain import report, sections

    parts = parts_of(args.parts)
    if args.input is not None and not args.run:
        raise ValueError("--input: give --run RUN too (the trained model that reads the input)")
    if args.run and "gates" not in parts:
        raise ValueError("--run: only the gates part traces a trained run; add the part `gates`")
    if args.run and not Path(args.run).exists():
        raise ValueError(f"--run {args.run}: no such folder (give a run folder of `lstm train` or a checkpoint)")
    torch.set_num_threads(max(1, args.threads))
    settings = sections.QUICK if args.quick else sections.FULL
    out = Path(args.out or f"runs/explain-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    started, cpu_started, load_at_start = time.time(), time.process_time(), os.getloadavg()[0]
    built = []
    for number, part in enumerate(parts, 1):
        # on stderr, so that the numbers the parts print (stdout) stay clean; a full run takes many minutes
        progress(args, f"[{number}/{len(parts)}] {part} ({settings.label} settings) ...")
        if part == "gates":
            built.append(sections.gates_section(out, settings, args.run, args.input, args.seed))
        elif part == "gradients":
            built.append(sections.gradients_section(out, settings))
        else:
            built.append(sections.memory_section(out, settings))
        progress(args, f"[{number}/{len(parts)}] {part} done in {built[-1].seconds:.0f} s "
                       f"({time.time() - started:.0f} s elapsed)")
    command = "lstm explain " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["explain"] else "lstm explain"
    timing = report.Timing(time.time() - started, time.process_time() - cpu_started, load_at_start,
                           os.getloadavg()[0])
    path = report.write(out, built, command, timing)
    print(f"wrote {path}, {out / 'numbers.json'} and {sum(len(s.figures) for s in built)} figures "
          f"in {time.time() - started:.0f} s")
    return 0
