"""The `lorakit` command line.

Each subcommand lives beside the code it drives and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` (called with the parsed args, returns an exit code). This file
only lists them, so adding a command is one line here and imports stay lazy (``lorakit --help``
must not import torch-heavy modules it does not need).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command name -> module defining register(subparsers)
COMMANDS: dict[str, str] = {
    "bench": "lorakit.bench.cli",
    "combine": "lorakit.analysis.cli",
    "compress": "lorakit.analysis.cli",
    "demo": "lorakit.demo",
    "generate": "lorakit.generate",
    "inspect": "lorakit.analysis.cli",
    "merge": "lorakit.export",
    "plan": "lorakit.analysis.cli",
    "predict": "lorakit.train.predict",
    "serve": "lorakit.serve.cli",
    "train": "lorakit.train.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning for PyTorch: train, inspect, merge and serve PEFT-format adapters.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(module).register(sub)
        if name not in sub.choices:
            raise RuntimeError(f"{module}.register() did not add the '{name}' command")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
