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
import os
import sys

from lorakit.errors import one_line
from lorakit.threads import THREADS_HELP

# command name -> (module defining register(subparsers), one-line help for `lorakit --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("lorakit.bench.cli", "benchmark lorakit against PEFT and bitsandbytes (ratios measured in one run)"),
    "combine": ("lorakit.analysis.cli", "merge several adapters into one (weighted sum, concat, SVD, TIES, DARE)"),
    "compress": ("lorakit.analysis.cli", "lower an adapter's rank by truncated SVD of each layer's ΔW"),
    "demo": ("lorakit.demos.cli", "end-to-end demos: SmolLM2 LoRA/QLoRA + serving (llm), MiniLM (minilm)"),
    "generate": ("lorakit.train.generate", "generate text with a causal LM + LoRA adapter"),
    "inspect": ("lorakit.analysis.cli", "per-layer norms, singular values and effective rank of an adapter"),
    "merge": ("lorakit.export.merge", "merge adapters into the base and save a plain transformers checkpoint"),
    "plan": ("lorakit.analysis.cli", "parameter counts and peak-memory estimate of a LoRA training run"),
    "predict": ("lorakit.train.predict", "classify texts with a sequence classifier + LoRA adapter"),
    "serve": ("lorakit.serve.cli", "serve a base model and its adapters over an OpenAI-compatible HTTP API"),
    "train": ("lorakit.train.cli", "fine-tune a LoRA adapter from a YAML config"),
}


DEBUG_FLAG = "--debug"


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr (exit 2), like every other lorakit error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (None: every module, for tests and docs).

    Lazy imports keep `lorakit --help` fast and stop one command's missing optional dependency
    (e.g. the server's) from breaking the others.
    """
    parser = OneLineParser(
        prog="lorakit",
        description="LoRA fine-tuning for PyTorch: train, inspect, merge and serve PEFT-format adapters.",
        epilog="Every command takes --threads N: " + THREADS_HELP + ". An automatic choice is printed on stderr.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"lorakit {version()}",
                        help="print lorakit's version and exit")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="on an error, show the full traceback instead of one line (anywhere on the line; "
                             "or LORAKIT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = list(COMMANDS) if command == "*" else [command] if command in COMMANDS else []
    for name in wanted:
        if name not in sub.choices:
            module = COMMANDS[name][0]
            importlib.import_module(module).register(sub)
            if name not in sub.choices:
                raise RuntimeError(f"{module}.register() did not add the '{name}' command")
    for command_parser in sub.choices.values():  # a module may register several commands
        _add_threads_option(command_parser)
    for name, (_, help_text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def version() -> str:
    """The installed package's version (its metadata), or the source tree's when not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("lorakit")
    except PackageNotFoundError:
        from lorakit import __version__

        return __version__


def _add_threads_option(command: argparse.ArgumentParser) -> None:
    """Every command takes --threads (commands that document their own keep theirs, default None)."""
    if "--threads" not in command._option_string_actions:
        command.add_argument("--threads", type=int, default=None, help=THREADS_HELP)


def _command_in(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Any error is one line on stderr and a non-zero exit code, never a traceback
    (``--debug`` anywhere on the command line, or LORAKIT_DEBUG=1, shows the traceback instead)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = DEBUG_FLAG in argv or os.environ.get("LORAKIT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != DEBUG_FLAG]
    command = _command_in(argv)
    prog = f"lorakit {command}" if command in COMMANDS else "lorakit"
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
        )
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        from lorakit.threads import apply_threads

        try:
            choice = apply_threads(getattr(args, "threads", None))
        except ValueError as exc:
            print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
            return 2
        args.threads = choice.threads
        if choice.automatic:  # say what was picked for the user (stderr: --json output and pipes stay clean)
            print(f"lorakit: {choice.threads} torch thread{'s' if choice.threads > 1 else ''} ({choice.reason}; "
                  "change with --threads N or $LORAKIT_THREADS)", file=sys.stderr)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        from lorakit.errors import LorakitError

        if isinstance(exc, (LorakitError, OSError)):
            print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        else:  # not one of ours: still one line, with the way to the details
            print(f"{prog}: error: {type(exc).__name__}: {one_line(exc)} (run again with --debug for the traceback)",
                  file=sys.stderr)
        return 1


def run_command(name: str, argv: list[str] | None = None) -> int:
    """`lorakit NAME ARGV...`, for modules that can also be run on their own."""
    return main([name, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
