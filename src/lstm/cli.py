"""The `lstm` command. Each subcommand is a module with `add_arguments(parser)` and `run(args)`."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, one-line help); modules are imported only when their command runs
COMMANDS = {
    "demo": ("lstm.commands.demo", "walk through the tutorial's example: one step's gates, the config, a sequence"),
    "bench": ("lstm.commands.bench", "time this LSTM against torch.nn.LSTM, a PyTorch loop and ONNX Runtime"),
    "train": ("lstm.commands.train", "train a task on real data (sentiment, charlm, forecast, vowels, adding, copy)"),
    "evaluate": ("lstm.commands.evaluate", "metrics of a trained checkpoint on the validation and test splits"),
    "predict": ("lstm.commands.predict", "a sentence -> label and probability; a series -> forecast"),
    "generate": ("lstm.commands.generate", "sample text from a charlm checkpoint"),
    "export": ("lstm.commands.export", "a trained model as a Keras 3 .keras file or an ONNX graph"),
    "explain": ("lstm.commands.explain", "see inside: gate traces, the gate table, vanishing gradients, long memory"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lstm", description="The LSTM of the tutorial, exact to Keras, on PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(module_name=module_name)
        importlib.import_module(module_name).add_arguments(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        print(f"lstm: error: COMMAND: expected one of {', '.join(COMMANDS)}, got none (`lstm COMMAND -h` for one's "
              "options)", file=sys.stderr)
        return 2
    try:
        return importlib.import_module(args.module_name).run(args) or 0
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"lstm {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
