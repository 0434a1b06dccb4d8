"""Generators of hostile input for the adversarial suite: adapter folders, training configs and
data files, HTTP requests. Deterministic (seeded), so a failure reproduces; every case has a name.

Each generator yields ``(name, thing)``; the suite decides what "refused clearly" means for each
kind (a LorakitError, a one-line CLI error, a 4xx OpenAI error object).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# values of the wrong type / out of range, tried against every adapter_config.json key
HOSTILE_VALUES = [None, True, 0, -1, 10**9, 1e9, 1e999, -1e999, float("nan"), "", "8", "x" * 10_000, [], [1, 2],
                  ["q_proj", 3], {}, {"q_proj": "8"}, {"q_proj": [1]}, [[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]
CONFIG_KEYS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern",
               "alpha_pattern", "layers_to_transform", "layers_pattern", "bias", "modules_to_save",
               "init_lora_weights", "use_rslora", "use_dora", "fan_in_fan_out", "task_type", "peft_type"]


def _json_text(value) -> str:
    return json.dumps(value, allow_nan=True)


def _copy(good: Path, out: Path) -> Path:
    shutil.copytree(good, out)
    return out


def adapter_folders(good: Path, out_root: Path, seed: int = 0, config_cases: int = 80) -> Iterator[tuple[str, Path]]:
    """Broken copies of the adapter folder `good` under `out_root`."""
    rng = random.Random(seed)
    config = json.loads((good / "adapter_config.json").read_text())
    tensors = load_file(good / "adapter_model.safetensors")
    pairs = [(k, v) for k in CONFIG_KEYS for v in HOSTILE_VALUES]
    rng.shuffle(pairs)
    for i, (key, value) in enumerate(pairs[:config_cases]):
        folder = _copy(good, out_root / f"cfg{i}")
        (folder / "adapter_config.json").write_text(_json_text({**config, key: value}))
        yield f"config {key}={_json_text(value)[:40]}", folder
    whole = {
        "config not json": b"{not json", "config array": b"[1, 2]", "config empty": b"",
        "config binary": bytes(range(256)), "config utf16": json.dumps(config).encode("utf-16"),
        "config deep": b"[" * 100_000 + b"]" * 100_000, "config lone surrogate key": b'{"\\ud800": 1}',
    }
    for i, (name, data) in enumerate(whole.items()):
        folder = _copy(good, out_root / f"whole{i}")
        (folder / "adapter_config.json").write_bytes(data)
        yield name, folder
    first = sorted(tensors)[0]
    lora_b = sorted(k for k in tensors if "lora_B" in k)[0]

    def tensor_case(fn: Callable[[dict], None]) -> dict:
        changed = {k: v.clone() for k, v in tensors.items()}
        fn(changed)
        return changed

    def set_value(key, value):
        def fn(t):
            t[key][0, 0] = value
        return fn

    tensor_cases = {
        "tensor missing": lambda t: t.pop(first),
        "tensor wrong shape": lambda t: t.__setitem__(first, torch.zeros(t[first].shape[0] + 1, t[first].shape[1])),
        "tensor transposed": lambda t: t.__setitem__(first, t[first].T.contiguous()),
        "tensor nan": set_value(lora_b, float("nan")),
        "tensor inf": set_value(first, float("inf")),
        "tensor int32": lambda t: t.__setitem__(first, t[first].to(torch.int32)),
        "tensor bool": lambda t: t.__setitem__(first, t[first] > 0),
        "tensor complex": lambda t: t.__setitem__(first, t[first].to(torch.complex64)),
        "tensor huge values": lambda t: t.__setitem__(lora_b, torch.full_like(t[lora_b], 3e38)),
        "tensors empty": lambda t: t.clear(),
    }
    for i, (name, fn) in enumerate(tensor_cases.items()):
        folder = _copy(good, out_root / f"tensor{i}")
        changed = tensor_case(fn)
        if changed:
            save_file(changed, folder / "adapter_model.safetensors")
        else:
            (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        yield name, folder
    raw = (good / "adapter_model.safetensors").read_bytes()
    for i, (name, data) in enumerate({
        "weights truncated": raw[: len(raw) // 2], "weights empty": b"", "weights random": rng.randbytes(4096),
        "weights header huge": (10**15).to_bytes(8, "little") + raw[8:],
    }.items()):
        folder = _copy(good, out_root / f"bytes{i}")
        (folder / "adapter_model.safetensors").write_bytes(data)
        yield name, folder
    folder = _copy(good, out_root / "noweights")
    (folder / "adapter_model.safetensors").unlink()
    yield "weights missing", folder
    folder = _copy(good, out_root / "dirweights")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").mkdir()
    yield "weights is a folder", folder
    folder = _copy(good, out_root / "pickle")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    yield "legacy bin with a pickle payload", folder


def train_configs(data_file: Path, out_dir: Path, seed: int = 0) -> Iterator[tuple[str, str | bytes, list[str]]]:
    """(name, YAML text or raw bytes, --set overrides) of invalid `lorakit train` configs."""
    base = {"model": {"name_or_path": "tiny-llama", "overrides": {"hidden_size": 32, "intermediate_size": 64,
                                                                   "num_hidden_layers": 1}},
            "data": {"train_file": str(data_file), "max_length": 32},
            "train": {"output_dir": str(out_dir), "max_steps": 1, "batch_size": 2, "threads": 1}}

    def with_(section, key, value):
        import copy

        cfg = copy.deepcopy(base)
        cfg.setdefault(section, {})[key] = value
        return json.dumps(cfg, allow_nan=True)  # JSON is YAML

    cases = [("train", "adam_betas", [2, 3]), ("train", "adam_betas", "x"), ("train", "lr", -1),
             ("train", "lr", "fast"), ("train", "max_steps", 0), ("train", "batch_size", 1.5),
             ("train", "epochs", float("nan")), ("train", "keep_last", 0), ("train", "warmup_ratio", 2),
             ("train", "unknown_key", 1), ("data", "max_length", 3), ("data", "format", "xml"),
             ("data", "train_file", 5), ("data", "train_file", "/does/not/exist.jsonl"),
             ("model", "overrides", {"num_attention_heads": 5}), ("model", "overrides", {"hidden_size": -1}),
             ("model", "overrides", "x"), ("model", "name_or_path", "/nope"), ("lora", "target_modules", 5),
             ("lora", "rank_pattern", [1]), ("lora", "r", 0), ("lora", "r", "8"), ("lora", "lora_alpha", 1e999),
             ("lora", "layers_to_transform", "0"), ("lora", "peft_type", "IA3"), ("quant", "method", "int3")]
    for section, key, value in cases:
        yield f"config {section}.{key}={json.dumps(value, allow_nan=True)[:30]}", with_(section, key, value), []
    good = json.dumps(base)
    for override in ("lora.rank_pattern=7", "train.lr=", "train=5", "=1", "nokey", "lora.r=[1", "train.adam_betas=[2,3]"):
        yield f"--set {override}", good, ["--set", override]
    yield "config binary", bytes(range(256)) * 4, []
    yield "config utf16", good.encode("utf-16"), []
    yield "config list", "[1, 2, 3]", []
    yield "config deep", "a: " + "[" * 50_000 + "]" * 50_000, []
    yield "config yaml bomb", "a: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n" \
        "c: [*b, *b, *b, *b, *b, *b, *b, *b]\n", []


def data_files(good_line: str, seed: int = 0) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of malformed JSONL data files."""
    rng = random.Random(seed)
    good = (good_line + "\n").encode() * 4
    yield "binary", rng.randbytes(8192)
    yield "utf16", (good_line + "\n").encode("utf-16") * 4
    yield "utf16-be", (good_line + "\n").encode("utf-16-be") * 4
    yield "invalid utf8 after valid lines", good + b'{"prompt": "\xff\xfe", "completion": "x"}\n'
    yield "deep line", b"[" * 100_000 + b"]" * 100_000 + b"\n"
    yield "empty", b""
    yield "only blank lines", b"\n\n \n"
    yield "not objects", b"1\n[1]\n\"x\"\nnull\n"
    yield "wrong types", b'{"prompt": 1, "completion": [2]}\n' * 3
    yield "nan values", b'{"prompt": NaN, "completion": Infinity}\n'
    yield "huge line", b'{"prompt": "' + b"a" * 2_000_000 + b'", "completion": "b"}\n'
    yield "lone surrogate", b'{"prompt": "\\ud800", "completion": "x"}\n' * 3
    yield "nul bytes", b'{"prompt": "a\x00b", "completion": "c"}\n'


# ---------------------------------------------------------------------------------------------- HTTP
def _nest(depth: int) -> str:
    return "[" * depth + "]" * depth


def http_bodies(seed: int = 0) -> Iterator[tuple[str, str, bytes]]:
    """(name, path, raw body) of invalid API requests (all must be 4xx OpenAI error objects)."""
    rng = random.Random(seed)
    completion = {"model": "a", "prompt": "hello world", "max_tokens": 4}
    chat = {"model": "a", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    fields = {
        "model": [None, 5, "", "nope", "mix:", "mix:a=nan", "mix:a=1,a=2", "mix:a=1e999", "../../etc", "x" * 5000],
        "max_tokens": [0, -1, 10**12, "4", 4.5, None, True, [4]],
        "temperature": [-1, 2.5, "hot", [1], {"v": 1}, True],
        "top_p": [0, -0.1, 1.5, "x", [0.5]],
        "n": [0, 10**6, "1"], "stream": ["yes", 1, "true", None, [True]], "stop": [5, [1], ["a"] * 10, [""], {"a": 1}],
        "seed": ["x", 1.5, [1]], "logprobs": [True, -1, 21, "5"], "logit_bias": [{"1": 100}], "presence_penalty": [1, "x"],
        "stream_options": ["x", [1]], "ignore_eos": ["yes", 2],
    }
    for key, values in fields.items():
        for value in values:
            yield f"completions {key}={json.dumps(value)[:30]}", "/v1/completions", \
                json.dumps({**completion, key: value}).encode()
    for value in [None, "hi", 5, [], [{"role": "user"}], [{"role": "hacker", "content": "x"}],
                  [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image", "url": "x"}]}],
                  [{"role": "user", "content": [{"type": "text"}]}]]:
        yield f"chat messages={json.dumps(value)[:30]}", "/v1/chat/completions", \
            json.dumps({**chat, "messages": value}).encode()
    for value in [None, 5, [], [[]], [-1], [10**9], ["a", 1], [[1, "a"]], [1.5], [[1]] * 100, [True]]:
        yield f"prompt={json.dumps(value)[:30]}", "/v1/completions", json.dumps({**completion, "prompt": value}).encode()
    for path in ("/v1/completions", "/v1/chat/completions"):
        for name, raw in {
            "not json": b"{model: a}", "truncated": b'{"model": "a", "prompt": "hi', "array": b"[1, 2]",
            "string": b'"hello"', "null": b"null", "empty": b"", "binary": rng.randbytes(200),
            "utf16": json.dumps(completion).encode("utf-16"), "deep 1000": b'{"x": ' + _nest(1000).encode() + b"}",
            "deep 100k": b'{"x": ' + _nest(100_000).encode() + b"}", "nan literal": b'{"model": "a", "temperature": NaN}',
            "lone surrogate": b'{"model": "a", "prompt": "\\ud800", "messages": [{"role": "user", "content": "\\udfff"}]}',
            "invalid utf8": b'{"model": "a", "prompt": "\xff\xfe"}', "huge number": b'{"model": "a", "max_tokens": '
            + b"9" * 5000 + b"}", "dup keys": b'{"model": "a", "model": "b", "prompt": "x"}',
        }.items():
            yield f"{path} {name}", path, raw
    yield "tiny temperature", "/v1/completions", json.dumps({**completion, "temperature": 1e-45}).encode()


ADMIN_BODIES = [
    {"name": "../x", "path": "a"}, {"name": "", "path": "a"}, {"name": "ok1", "path": ""},
    {"name": "ok2", "path": "/etc"}, {"name": "ok3", "path": "../../"}, {"name": "ok4", "path": "a\x00b"},
    {"name": "ok5", "path": 5}, {"name": 5, "path": "a"}, {"name": "ok6", "path": "a", "load": "yes"},
    {"name": "ok7", "path": "a", "extra": 1}, {"name": "_internal", "path": "a"}, {"name": "x" * 100, "path": "a"},
    {"name": "ok8", "path": "nonexistent"}, {"name": "ok9"},
]

RAW_HTTP = [
    b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: -5\r\n\r\n", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n", b"\x00\x01\x02\x03\r\n\r\n",
    b"GET /health HTTP/1.1\r\n" + b"X-Long: " + b"a" * 100_000 + b"\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n",
]
