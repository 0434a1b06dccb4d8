"""`lorakit serve`: one base model, many LoRA adapters, an OpenAI-compatible HTTP API.

    lorakit serve --base ./llama --adapter sql=./adapters/sql --adapter chat=./adapters/chat \\
        --api-key "$KEY" --adapter-root ./adapters --max-adapters 8

Heavy imports (torch, transformers, fastapi) happen in the handler so `lorakit --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    from lorakit.threads import THREADS_HELP

    p = subparsers.add_parser(
        "serve", help="serve a base model and its adapters over an OpenAI-compatible HTTP API",
        description="Serve one base model and many LoRA adapters with continuous batching across adapters. "
                    "The request's `model` picks an adapter by name, the base by its name, or a weighted "
                    "mixture as 'mix:a=0.7,b=0.3'.")
    p.add_argument("--base", required=True, help="base model: checkpoint folder with a tokenizer, preset "
                   "(smollm2-135m-instruct) or Hugging Face id (org/name, from the hub cache)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter to serve as NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LORAKIT_API_KEY"),
                   help="bearer key for every endpoint (default: $LORAKIT_API_KEY; admin endpoints are off "
                        "without one)")
    p.add_argument("--max-adapters", type=int, default=8,
                   help="adapters resident at once (usable in a batch); least recently used evicted beyond")
    p.add_argument("--max-adapter-memory", default="4GiB",
                   help="host memory for registered adapters' factors (e.g. 512MiB, 4GiB; default 4GiB): each "
                        "folder is read once at registration and kept here, so making it resident again is a "
                        "copy; beyond the budget the least recently used are dropped and re-read when needed")
    p.add_argument("--adapter-root", help="POST /v1/adapters may load only folders under this one")
    p.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request before a 408")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (413 beyond)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds for a request's headers, and again for its body, to arrive (408 beyond)")
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (continuous batching)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--served-model-name", help="the base model's id in the API (default: the --base folder name)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--access-log", default="stderr", metavar="stderr|off|FILE",
                   help="one JSON line per request (no prompt text): to stderr (default), a file, or off")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds running requests get to finish while new ones get 503 (default 30)")
    p.set_defaults(func=_run)


def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """['a=dir', ...] -> {'a': Path('dir')}; raises ValueError with a clear message."""
    from lorakit.serve.registry import NAME_RE

    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not NAME_RE.fullmatch(name) or not folder:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR with NAME of letters, digits, '_' or '-'")
        if name in out:
            raise ValueError(f"--adapter {name!r} given twice")
        if not (Path(folder) / "adapter_config.json").is_file():
            raise ValueError(f"--adapter {spec!r}: no adapter_config.json in {folder}")
        out[name] = Path(folder).resolve()
    return out


def build_app(args: argparse.Namespace):
    """Model, registry, engine and app from parsed arguments (tests call this in-process)."""
    import torch
    from transformers import AutoTokenizer

    from lorakit.core.model import LoraModel
    from lorakit.models import resolve_base
    from lorakit.serve.app import create_app
    from lorakit.serve.engine import Engine, load_base_model
    from lorakit.serve.http import ServeSettings
    from lorakit.serve.registry import AdapterRegistry
    from lorakit.serve.store import parse_bytes

    if getattr(args, "threads", None):  # the CLI chose it (lorakit.threads); tests may pass their own
        torch.set_num_threads(args.threads)
    adapters = parse_adapter_specs(args.adapter)
    base_dir = resolve_base(args.base)  # a preset, a folder or a hub id
    if args.adapter_root is not None and not Path(args.adapter_root).is_dir():
        raise ValueError(f"--adapter-root {args.adapter_root} is not a folder")
    # a folder is named by its last part; a preset or hub id by what was typed
    base_name = args.served_model_name or (base_dir.resolve().name if Path(args.base).is_dir() else args.base)
    if base_name in adapters:
        raise ValueError(f"adapter name {base_name!r} is the base model's name; rename one")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = LoraModel(load_base_model(base_dir, args.dtype))  # no adapters yet: the registry loads them
    registry = AdapterRegistry(model, base_name, max_loaded=args.max_adapters, root=args.adapter_root,
                               max_memory=parse_bytes(getattr(args, "max_adapter_memory", "4GiB")))
    for i, (name, folder) in enumerate(adapters.items()):
        registry.add(name, folder, load=i < args.max_adapters)  # the rest load on first use
    engine = Engine(model, registry, tokenizer, max_batch=args.max_batch, max_queue=args.max_queue)
    settings = ServeSettings(base_name=base_name, api_key=args.api_key or None, max_body_bytes=args.max_body_bytes,
                             max_tokens_cap=args.max_tokens_cap, request_timeout=args.request_timeout,
                             body_timeout=getattr(args, "body_timeout", 30.0))
    return create_app(engine, registry, tokenizer, settings)


def _run(args: argparse.Namespace) -> int:
    from lorakit.errors import LorakitError
    from lorakit.serve.errors import ServeError

    logging.getLogger("lorakit").setLevel(args.log_level.upper())
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"lorakit serve: warning: listening on {args.host} without --api-key", file=sys.stderr)
    try:
        app = build_app(args)
    except (ValueError, OSError, LorakitError, ServeError) as exc:
        from lorakit.errors import one_line

        print(f"lorakit serve: {one_line(exc)}", file=sys.stderr)
        return 2
    import uvicorn

    from lorakit.serve.transport import DrainingServer, protocol_class

    _access_log(args.access_log)
    print(f"lorakit serve: http://{args.host}:{args.port}/v1 (models: GET /v1/models)", flush=True)
    # our h11 protocol: slow headers time out, malformed HTTP gets an OpenAI error object
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            http=protocol_class(args.body_timeout), timeout_keep_alive=5,
                            timeout_graceful_shutdown=2)
    server = DrainingServer(config, app.state.drain, args.drain_timeout)
    server.run()
    if server.drained is not None:
        print(f"lorakit serve: drained ({'all requests finished' if server.drained else 'timed out'}), "
              "stopped", file=sys.stderr)
    return 0


def _access_log(target: str) -> None:
    """Route the `lorakit.access` JSON lines (bare, one per line) to stderr, a file, or nowhere."""
    access = logging.getLogger("lorakit.access")
    access.propagate = False
    if target == "off":
        access.setLevel(logging.WARNING)
        return
    handler = logging.StreamHandler(sys.stderr) if target == "stderr" else logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)

