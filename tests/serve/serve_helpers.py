"""Helpers for merge / serve tests: a tiny Llama saved with a word-level tokenizer, and adapters.

Not a conftest.py: a second module named ``conftest`` would shadow tests/conftest.py for the
``from conftest import ...`` lines elsewhere in the suite.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from factories import randomize_lora, tiny_llama

WORDS = (
    "the a an of to and in is it that for on with as was by at from this be are or not have "
    "one two three four five six seven eight nine ten red green blue cat dog bird fish tree sky sun "
    "moon star day night good bad big small hot cold fast slow up down left right yes no hello world "
    "lora adapter model merge serve batch token cache request answer question say tell me you we they "
    "run walk talk eat sleep read write code test . , ! ?"
).split()
SPECIAL = ["[UNK]", "<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer():
    """A word-level tokenizer over WORDS (ids < 128, so the tiny models' vocab fits)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    assert len(vocab) <= 128
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_base(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny Llama (+ tokenizer) saved as a transformers checkpoint; eos = "</s>" (id 3)."""
    # larger init spreads the logits, so greedy choices are not near-ties (robust equality checks)
    cfg = dict(initializer_range=0.2, eos_token_id=3, bos_token_id=2, pad_token_id=1, tie_word_embeddings=False)
    cfg.update(overrides)
    model = tiny_llama(seed, **cfg)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def save_adapter(base_dir: Path, folder: Path, seed: int, r: int = 4,
                 targets: tuple[str, ...] = ("q_proj", "v_proj", "o_proj", "down_proj")) -> Path:
    """A random (non-zero) adapter for the saved base, in PEFT format."""
    from transformers import AutoModelForCausalLM

    import lorakit

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = lorakit.get_lora_model(base, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                                            task_type="CAUSAL_LM"))
    randomize_lora(model, seed)
    with torch.no_grad():  # big enough that each adapter changes the greedy tokens
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.mul_(8.0)
    model.save_pretrained(folder)
    return folder


def build_model_dirs(root: Path) -> dict[str, Path]:
    """{"base": dir, "a": adapter dir, "b": ..., "c": ..., "root": the adapter root}."""
    base = save_base(root / "base")
    adapters = root / "adapters"
    dirs = {"base": base, "root": adapters}
    for seed, name in enumerate(("a", "b", "c"), start=1):
        dirs[name] = save_adapter(base, adapters / name, seed=seed, r=4 + 2 * seed)
    return dirs


def env_for_subprocess() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    return env


_SHARED: dict[str, Path] = {}


def shared_model_dirs() -> dict[str, Path]:
    """build_model_dirs once per test process (the folders are removed at exit)."""
    if not _SHARED:
        import atexit
        import shutil
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="lorakit-serve-"))
        atexit.register(shutil.rmtree, root, True)
        _SHARED.update(build_model_dirs(root))
    return _SHARED


def shared_model_dirs_one_thread():
    """A module fixture's body: the shared model folders with one torch thread until the module ends.

    Tiny matmuls gain nothing from more intra-op threads, and on a small shared machine OpenMP
    threads fighting other processes make them ~50x slower (the server's --threads does the same).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield shared_model_dirs()
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m lorakit serve ...` on a free loopback port; stopped (by its pid) on close()."""

    def __init__(self, args: list[str], ready_timeout: float = 90.0):
        import subprocess
        import sys
        import tempfile
        import time

        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="lorakit-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "lorakit", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--threads", "1", "--log-level", "warning", *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env_for_subprocess())
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.close()
        raise RuntimeError(f"server not ready after {ready_timeout}s:\n{self.output()}")

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-5000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def submit_all(engine, jobs, timeout: float = 120.0, start: bool = False) -> list[list]:
    """Submit every (ids, adapter, params) job to a running engine at once; each job's events (none failed).

    With `start`, the engine is started only after every job is queued, so all are admitted together.
    """
    import threading

    from lorakit.serve.engine import GenerationRequest

    events: list[list] = [[] for _ in jobs]
    done = threading.Semaphore(0)

    def listener(i):
        def on_event(ev):
            events[i].append(ev)
            if ev.final:
                done.release()
        return on_event

    for i, (ids, adapter, params) in enumerate(jobs):
        engine.submit(GenerationRequest(list(ids), params, listener(i), adapter=adapter))
    if start:
        engine.start()
    for _ in jobs:
        assert done.acquire(timeout=timeout), "engine did not finish in time"
    for evs in events:
        assert evs[-1].error is None, evs[-1].error
    return events
