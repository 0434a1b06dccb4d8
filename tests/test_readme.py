"""README.md's code blocks stay true: the Python runs, the YAML validates, the commands parse and run.

Every fenced block is accounted for: run as written (in a scratch folder), run with a named
placeholder filled in, or only checked (parsed / compiled) for a stated reason. A new block has to
be added to one of those lists, so the README can't grow an example nobody ran.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# (first line of a block) -> why it is not run as a whole here
ONLY_CHECKED = {
    "make demo": "builds .venv and runs the minutes-long demo; `make test` is this suite itself",
}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def commands(block: str) -> list[list[str]]:
    """The block's command lines (continuations joined, comments dropped), split as the shell would."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip()
            and not line.lstrip().startswith("#")]


def lorakit_argv(argv: list[str]) -> list[str] | None:
    """`lorakit ARGS` (or `torchrun ... -m lorakit ARGS`) -> ARGS; None for other programs.

    README's `[--opt value]` marks an optional part: kept, without the brackets, so it is checked too.
    """
    if argv[0] == "lorakit":
        args = argv[1:]
    elif argv[0] == "torchrun" and "lorakit" in argv:
        args = argv[argv.index("lorakit") + 1:]
    else:
        return None
    return [a.strip("[]") for a in args]


def python_block(marker: str) -> str:
    (block,) = [b for b in blocks("python") if marker in b]
    return block


PYTHON_BLOCKS = {"print_trainable_parameters": "the quickstart", "OpenAI(": "the serving client",
                 "with_lora_checkpoints": "transformers.Trainer / TRL"}


def test_every_block_is_accounted_for():
    for block in blocks("python"):
        compile(block, "README.md", "exec")
        assert any(marker in block for marker in PYTHON_BLOCKS), \
            f"a new Python block in README.md: run it in tests/test_readme.py\n{block[:300]}"
    firsts = [b.splitlines()[0] for b in blocks("bash")]
    assert all(any(f.startswith(k) for f in firsts) for k in ONLY_CHECKED)
    assert blocks("yaml") and blocks("bash")


def test_quickstart_runs_as_written_and_prints_what_it_says(tmp_path, monkeypatch):
    quickstart = python_block("print_trainable_parameters")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(quickstart, "README.md (quickstart)", "exec"), {"__name__": "readme"})
    printed = out.getvalue().splitlines()
    claimed = [line.removeprefix("# ") for line in quickstart.splitlines() if line.startswith("# trainable params")]
    assert claimed and claimed == printed  # the sample output is the real output of that code
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


def test_trainer_block_runs_as_written(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    block = python_block("with_lora_checkpoints")
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(block, "README.md (Trainer / TRL)", "exec"), {"__name__": "readme"})
    for step in (2, 4, 6):  # 6: the resumed run went on from checkpoint-4
        names = {p.name for p in (tmp_path / "out" / "trainer" / f"checkpoint-{step}").iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
    assert (tmp_path / "out" / "sft" / "checkpoint-2" / "adapter_model.safetensors").is_file()


def test_config_blocks_are_valid_configs():
    from lorakit.train.config import load_config

    for block in blocks("yaml"):
        raw = yaml.safe_load(block)
        load_config(raw=raw)  # every key exists and every value is allowed
        assert set(raw) <= {"model", "quant", "lora", "data", "train"}


def test_every_lorakit_command_parses(capsys):
    """Flags, choices and types of every README command, checked by the real parser (nothing runs)."""
    from lorakit.cli import build_parser, main

    seen = 0
    for block in blocks("bash"):
        for argv in commands(block):
            args = lorakit_argv(argv)
            if args is None:
                assert argv[0] == "make", argv
                continue
            seen += 1
            if "--help" in args:
                with pytest.raises(SystemExit) as info:
                    main(args)
                assert info.value.code == 0 and capsys.readouterr().out
                continue
            parsed = build_parser(args[0]).parse_args(args)
            assert parsed.func is not None
    # and the commands the example configs' header comments suggest
    for example in sorted((ROOT / "examples").glob("*.yaml")):
        for line in example.read_text().splitlines():
            if line.startswith("# lorakit "):
                args = lorakit_argv(shlex.split(line.removeprefix("# ")))
                assert build_parser(args[0]).parse_args(args).func is not None
                seen += 1
    assert seen >= 9


# ---------------------------------------------------------------------- running the commands
def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    e["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p and "site-packages" not in p])
    e["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")])
    return e


# the test's one substitution: training commands run fewer steps (the configs' own lengths take minutes)
QUICK = ["--no-progress", "--set", "train.max_steps=12", "--set", "train.eval_batch_size=64"]


def run_in_process(args: list[str], capsys) -> str:
    """`lorakit ARGS` through the CLI's main() in this process (saves a torch import per command)."""
    from lorakit.cli import main

    try:
        code = main(args)
    except SystemExit as exc:  # --help
        code = exc.code
    out, err = capsys.readouterr()
    assert code == 0, f"lorakit {shlex.join(args)}\n{err[-3000:]}"
    return out


@pytest.mark.slow
def test_training_block_runs_in_order(tmp_path, monkeypatch, capsys):
    block = next(b for b in blocks("bash") if "lorakit train examples/" in b)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    ran = set()
    for argv in commands(block):
        args = lorakit_argv(argv)
        if args[:1] == ["train"] and "--help" not in args:
            args = args + QUICK
        # each command succeeds in this order: a run reusing an earlier run's folder would be refused here
        out = run_in_process(args, capsys)
        ran.add(args[0])
        if args[0] == "predict":
            assert all(text in out for text in args[1:] if not text.startswith("-") and "/" not in text)
        if "--help" in args:
            assert "CONFIG KEYS" in out
    assert {"train", "generate", "predict"} <= ran


def _tiny_checkpoint(folder: Path) -> None:
    """A small random Llama with a tokenizer and two LoRA adapters: what the serving block's paths stand for."""
    import torch

    import lorakit
    from lorakit.train.presets import byte_tokenizer, load_base, save_base

    base = load_base("tiny-llama", "causal_lm", overrides={"hidden_size": 32, "intermediate_size": 64})
    save_base(base, byte_tokenizer(), folder / "llama")
    for i, name in enumerate(("sql", "chat", "a", "b")):
        torch.manual_seed(i)
        cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = lorakit.get_lora_model(load_base("tiny-llama", "causal_lm", overrides={"hidden_size": 32,
                                                                                          "intermediate_size": 64}), cfg)
        model.save_pretrained(folder / "adapters" / name)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serving_blocks_run_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    openai = pytest.importorskip("openai")
    _tiny_checkpoint(tmp_path)
    monkeypatch.chdir(tmp_path)
    merge_block, serve_block = [b for b in blocks("bash") if b.lstrip().startswith(("# a plain", "lorakit serve"))]
    for argv in commands(merge_block):
        run_in_process(lorakit_argv(argv), capsys)
    assert (tmp_path / "llama-sql" / "config.json").is_file() and (tmp_path / "llama-ab" / "config.json").is_file()

    # the server as written, on a free port instead of 8000 (tests may run side by side)
    port = _free_port()
    (argv,) = commands(serve_block)
    args = [a.replace("$KEY", "test-key") for a in lorakit_argv(argv)] + ["--port", str(port)]
    server = subprocess.Popen([sys.executable, "-m", "lorakit", *args], cwd=tmp_path, env=env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        import httpx

        deadline = time.time() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            assert time.time() < deadline, "the server did not come up"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        client_block = python_block("OpenAI(").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        namespace = {"__name__": "readme", "KEY": "test-key"}  # the block's placeholder for the API key
        exec(compile(client_block, "README.md (client)", "exec"), namespace)
        assert isinstance(namespace["client"], openai.OpenAI)
    finally:
        server.terminate()
        server.wait(timeout=60)
