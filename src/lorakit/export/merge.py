"""`lorakit merge`: fold adapters into the base weights and write a plain transformers checkpoint.

    W' = W + Σᵢ wᵢ · scalingᵢ · Bᵢ·Aᵢ        (wᵢ = 1 unless --weights is given)

The result loads with ``AutoModelForCausalLM.from_pretrained(out)`` (or whatever class the base
config names) and has no LoRA modules left: inference costs exactly what the base costs.

* Several adapters: without weights their deltas are summed (each merged in turn, so variants
  such as DoRA work); with weights they are first combined exactly (rank Σ rᵢ, the "cat"
  combination of :meth:`LoraModel.add_weighted_adapter`), then merged.
* 4-bit bases: a bitsandbytes-format checkpoint (packed NF4/FP4 weights with their
  ``absmax`` / ``quant_map`` / ``quant_state`` entries) is dequantised with ``lorakit.quant``'s
  checkpoint reader, one tensor at a time when streaming, and the merge happens in full precision;
  the report says so.
* Streaming (default): the base is read, merged and written one tensor / shard at a time
  (:mod:`lorakit.export.streaming`), so peak memory is about two output shards (the tensors, then their serialised bytes) plus the adapters;
  the files are those the in-memory path (``streaming=False``, ``--in-memory``) writes.
* Atomic: everything is written to a temporary folder beside ``--out`` and renamed at the end, so a
  failure leaves no partial output (and an existing ``--out`` untouched unless ``--overwrite``).
  Temporary folders a killed merge left behind are removed by the next merge into the same
  ``--out`` (:func:`clean_stale`), and a previous ``--out`` caught mid-swap is put back
  (:func:`lorakit.io.write_folder_atomically`).
* ``--format gguf`` keeps the in-memory path (the GGUF writer takes a whole model).
* ``--format gguf`` (:func:`merge_to_gguf`): the same merge written as one GGUF file for llama.cpp /
  Ollama (Llama-family bases; f32, f16, bf16 or q8_0), see :mod:`lorakit.export.gguf`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import MergeError  # also the layers' refusal (grouped convs, ...): one class

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
# files copied from the base folder so the output is a complete, self-contained checkpoint
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.txt",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
MERGE_INFO = "lorakit_merge.json"
GGUF_TYPE_CHOICES = ("f32", "f16", "bf16", "q8_0")  # lorakit.export.gguf.GGUF_TYPES (not imported: gguf is optional)


@dataclass
class MergeReport:
    """What `merge_to_checkpoint` did (the CLI prints it; tests assert on it)."""

    out_dir: Path
    adapters: list[str]
    weights: list[float] | None
    dtype: str
    dequantized_4bit: str | None = None  # e.g. "nf4 (double quant)" when the base was 4-bit
    files: list[str] = field(default_factory=list)
    streamed: bool = False  # merged tensor by tensor (lorakit.export.streaming), not with the whole base loaded
    gguf: Any = None  # lorakit.export.gguf.GGUFReport for --format gguf


def merge_to_checkpoint(base_dir: str | os.PathLike, adapter_dirs: list[str | os.PathLike],
                        out_dir: str | os.PathLike, weights: list[float] | None = None,
                        dtype: str | None = None, max_shard_size: str | int = "2GB",
                        overwrite: bool = False, streaming: bool = True) -> MergeReport:
    """Merge `adapter_dirs` into the base `base_dir` (a folder, preset or hub id: lorakit.models.resolve_base)
    and save a full checkpoint at `out_dir`.

    dtype: the saved weights' dtype (default: the base's own dtype; the merge itself is fp32).
    max_shard_size: passed to ``save_pretrained`` so large checkpoints are split into shards.
    streaming: read, merge and write one tensor / shard at a time (:mod:`lorakit.export.streaming`),
        so peak memory is about two output shards (tensors + serialised bytes) plus the adapters,
        whatever the model's size; the files are the same as the in-memory path's (``streaming=False``:
        load the whole base, merge, save), which also runs when a base can't be streamed (logged; the
        report's ``streamed`` says which ran).
    """
    from lorakit.models import resolve_base

    base_dir, out_dir = resolve_base(base_dir), Path(out_dir)  # a preset, a folder or a hub id
    adapter_dirs = [Path(a) for a in adapter_dirs]
    clean_stale(out_dir)  # first: a previous --out caught mid-swap by a kill is back before the checks
    _check_inputs(base_dir, adapter_dirs, out_dir, weights, dtype, overwrite)
    max_shard_size = parse_size(max_shard_size)
    plan = _streaming_plan(base_dir, adapter_dirs, weights, dtype) if streaming else None
    if plan is not None:
        from lorakit.export.streaming import NotStreamable

        stream, out_dtype, quant = plan
        report = MergeReport(out_dir=out_dir, adapters=[str(a) for a in adapter_dirs], weights=weights,
                             dtype=out_dtype, dequantized_4bit=quant, streamed=True)
        try:
            _write_checkpoint(lambda tmp: stream.save(tmp, max_shard_size), base_dir, out_dir, report)
            return report
        except (NotStreamable, *_UNSTREAMABLE) as exc:  # nothing was swapped in; the in-memory path still can
            if _out_of_memory(exc):
                raise
            logger.warning("lorakit merge: streaming %s failed (%s: %s); loading the whole base instead",
                           base_dir, type(exc).__name__, exc)

    import torch

    merged, source_dtype, quant = merged_model(base_dir, adapter_dirs, weights)
    out_dtype = dtype or source_dtype
    merged = merged.to(getattr(torch, out_dtype))
    merged.config.dtype = out_dtype
    report = MergeReport(out_dir=out_dir, adapters=[str(a) for a in adapter_dirs], weights=weights,
                         dtype=out_dtype, dequantized_4bit=quant)
    _write_checkpoint(lambda tmp: merged.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True),
                      base_dir, out_dir, report)
    return report


def _streaming_plan(base_dir: Path, adapter_dirs: list[Path], weights: list[float] | None, dtype: str | None):
    """(StreamingMerge, output dtype, 4-bit description) or None when this base can't be streamed (logged)."""
    from lorakit.export.streaming import NotStreamable, StreamingMerge

    config, model_cls, source_dtype, quant_cfg = describe_base(base_dir)
    try:
        if quant_cfg is not None:
            from lorakit.quant.loading import TensorReader, checkpoint_files

            reader = TensorReader(checkpoint_files(base_dir))
            quant = _describe_4bit(reader, base_dir)
            compute = quant_cfg.get("bnb_4bit_compute_dtype")
            source_dtype = _dtype_name(compute) if compute else source_dtype
        else:
            quant = None
        out_dtype = dtype or source_dtype
        return StreamingMerge(base_dir, model_cls, config, adapter_dirs, weights, out_dtype), out_dtype, quant
    except (NotStreamable, *_UNSTREAMABLE) as exc:
        if _out_of_memory(exc):
            raise
        # a model or variant the meta-device plan doesn't cover: the in-memory path gives the same files
        logger.warning("lorakit merge: %s can't be streamed (%s); loading the whole base instead", base_dir, exc)
        return None


# what a meta-device plan can raise for a model or variant it doesn't cover (user errors are MergeError/ValueError)
_UNSTREAMABLE = (RuntimeError, NotImplementedError, AttributeError, KeyError)


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "allocate memory" in str(exc)


def merge_to_gguf(base_dir: str | os.PathLike, adapter_dirs: list[str | os.PathLike], out_file: str | os.PathLike,
                  weights: list[float] | None = None, gguf_type: str = "f16", overwrite: bool = False) -> MergeReport:
    """Merge `adapter_dirs` into a Llama-family base and write one GGUF file (llama.cpp / Ollama / transformers).

    gguf_type: f32, f16, bf16 or q8_0 for the 2-D weights (norms stay f32). See :mod:`lorakit.export.gguf`.
    """
    from transformers import AutoConfig, AutoTokenizer

    from lorakit.export import gguf as gguf_export
    from lorakit.models import resolve_base

    base_dir, out_file = resolve_base(base_dir), Path(out_file)  # a preset, a folder or a hub id
    adapter_dirs = [Path(a) for a in adapter_dirs]
    if out_file.suffix != ".gguf":
        raise MergeError(f"--out {out_file}: with --format gguf, --out is a file name ending in .gguf")
    _check_inputs(base_dir, adapter_dirs, out_file, weights, None, overwrite)
    if gguf_type not in gguf_export.GGUF_TYPES:
        raise MergeError(f"--gguf-type must be one of {sorted(gguf_export.GGUF_TYPES)}, got {gguf_type!r}")
    try:  # refuse before the (slow) merge: architecture and tokenizer are known from the base folder
        import gguf  # noqa: F401
    except ImportError:
        raise MergeError("--format gguf needs the gguf package: pip install gguf") from None
    try:
        gguf_export.check_exportable(AutoConfig.from_pretrained(base_dir))
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except gguf_export.GGUFExportError as exc:
        raise MergeError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise MergeError(f"--format gguf needs the base's tokenizer, and {base_dir} has none that loads ({exc}); "
                         "copy tokenizer.json / tokenizer_config.json into the base folder") from None
    merged, _, quant = merged_model(base_dir, adapter_dirs, weights)
    try:
        result = gguf_export.write_gguf(merged, tokenizer, out_file, gguf_type, name=base_dir.name)
    except gguf_export.GGUFExportError as exc:
        raise MergeError(str(exc)) from None
    report = MergeReport(out_dir=out_file, adapters=[str(a) for a in adapter_dirs], weights=weights,
                         dtype=gguf_type, dequantized_4bit=quant, files=[out_file.name], gguf=result)
    return report


def merged_model(base_dir: Path, adapter_dirs: list[Path], weights: list[float] | None = None):
    """(base with the adapters folded in, fp32; the base checkpoint's dtype name; "nf4 ..." if it was 4-bit)."""
    from lorakit.export.adapters import attach_adapters

    model, source_dtype, quant = load_base(base_dir)
    lora, names = attach_adapters(model, adapter_dirs, weights)
    lora.set_adapter(names)
    try:
        merged = lora.merge_and_unload(names)
    except ValueError as exc:  # e.g. lora_bias on a base layer without a bias: no checkpoint can hold it
        raise MergeError(f"can't fold the adapter into {base_dir}: {exc}") from None
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    return merged, source_dtype, quant


def _check_inputs(base_dir: Path, adapter_dirs: list[Path], out_dir: Path, weights: list[float] | None,
                  dtype: str | None, overwrite: bool) -> None:
    if not (base_dir / "config.json").is_file():
        raise MergeError(f"--base {base_dir}: no config.json there; pass a transformers checkpoint folder")
    if not adapter_dirs:
        raise MergeError("give at least one --adapter folder")
    for folder in adapter_dirs:
        if not (folder / "adapter_config.json").is_file():
            raise MergeError(f"--adapter {folder}: no adapter_config.json there; pass a PEFT-format adapter folder")
        init = _check_adapter_folder(folder).get("init_lora_weights")
        weighted = weights is not None and any(w != 1.0 for w in weights)
        if weighted and isinstance(init, str) and (init.startswith("pissa") or init == "olora"):
            # its update is s·(B·A − B0·A0) on the original base, but the loaded model holds the residual
            # W0 − s·B0·A0: a weighted combination of B·A would keep the residual at full weight
            raise MergeError(f"--adapter {folder}: init_lora_weights={init!r} can't be combined with --weights "
                             "(the adapter rewrote the base to its residual). Merge it alone or with weights 1, or "
                             "convert it to a plain LoRA first (lorakit.core.variants.pissa.to_lora_factors)")
    if weights is not None and len(weights) != len(adapter_dirs):
        raise MergeError(f"--weights has {len(weights)} values for {len(adapter_dirs)} adapters; give one each")
    if weights is not None and not all(math.isfinite(w) for w in weights):
        raise MergeError(f"--weights must be finite numbers, got {weights}")
    if dtype is not None and dtype not in DTYPES:
        raise MergeError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if out_dir.exists() and not overwrite:
        raise MergeError(f"--out {out_dir} exists; remove it or pass --overwrite")
    if out_dir.resolve() in {base_dir.resolve(), *(a.resolve() for a in adapter_dirs)}:
        raise MergeError("--out must not be the base or an adapter folder")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: str | int) -> int:
    """'2GB' / '500MiB' / 1000000 -> bytes; MergeError for anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?\s*", str(value), re.IGNORECASE)
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]) if match else 0
    if size <= 0:
        raise MergeError(f"--max-shard-size must be a positive size such as 2GB, 500MB or 1GiB, got {value!r}")
    return size


def clean_stale(out_dir: Path) -> None:
    """Remove what killed merges into `out_dir` left beside it; a previous --out caught mid-swap is put back
    (:func:`lorakit.io.atomic.clean_stale`)."""
    from lorakit.io.atomic import clean_stale as clean

    clean(out_dir)


def _check_adapter_folder(folder: Path) -> dict:
    """Refuse a broken adapter (types, ranges, NaN/inf, dtypes) before the base is loaded."""
    from lorakit.io import read_adapter_folder
    from lorakit.io.config_validation import validate_adapter_config, validate_adapter_tensors

    config, tensors = read_adapter_folder(folder)
    validate_adapter_config(config, str(folder / "adapter_config.json"))
    validate_adapter_tensors(tensors, str(folder))
    return config


def describe_base(base_dir: Path):
    """(config, the model class to build, the dtype name its checkpoint has, 4-bit quantization_config or None)."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    source_dtype = _dtype_name(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None))
    arch = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    if model_cls is None:
        model_cls = transformers.AutoModelForCausalLM if arch and arch.endswith("ForCausalLM") else transformers.AutoModel
    return config, model_cls, source_dtype, _quantization_config(config)


def load_base(base_dir: Path):
    """(model in fp32, the dtype name its checkpoint had, "nf4 ..." if it was 4-bit else None): the whole base."""
    import torch

    config, model_cls, source_dtype, quant_cfg = describe_base(base_dir)
    if quant_cfg is None:
        model = model_cls.from_pretrained(base_dir, dtype=torch.float32)
        return model.eval(), source_dtype, None
    model, description, compute_dtype = _load_dequantized(base_dir, config, quant_cfg, model_cls)
    return model.eval(), compute_dtype or source_dtype, description


def _quantization_config(config) -> dict | None:
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    if quant.get("load_in_4bit") or str(quant.get("quant_method", "")).lower() in ("bitsandbytes_4bit", "lorakit_4bit"):
        return quant
    raise MergeError(f"unsupported quantization_config {quant}; only 4-bit (NF4/FP4, bitsandbytes format) bases merge")


def _load_dequantized(base_dir: Path, config, quant_cfg: dict, model_cls):
    """A bitsandbytes-format 4-bit checkpoint rebuilt as a dense fp32 model (lorakit.quant's reader dequantises)."""
    import copy

    import torch

    from lorakit.quant.loading import TensorReader, checkpoint_files

    reader = TensorReader(checkpoint_files(base_dir))
    description = _describe_4bit(reader, base_dir)
    try:
        tensors = {key: reader.get_dense(key, torch.float32) for key in reader.dense_keys()}
    except ValueError as exc:
        raise MergeError(f"--base {base_dir}: {exc}") from None
    dense_config = copy.deepcopy(config)
    del dense_config.quantization_config
    model = model_cls(dense_config).float()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {k for k in missing if "lm_head" in k and getattr(dense_config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise MergeError(f"--base {base_dir}: 4-bit checkpoint doesn't fit its config "
                         f"(missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()
    compute = quant_cfg.get("bnb_4bit_compute_dtype")
    compute = _dtype_name(compute) if compute else None
    return model, description, compute


def _describe_4bit(reader, base_dir: Path) -> str:
    """'nf4, double quant' (each kind found, joined by ' + ') from the checkpoint's quant states."""
    kinds = set()
    for key in reader.quantized():
        try:
            state = reader.get_state(key)
        except ValueError as exc:
            raise MergeError(f"--base {base_dir}: {exc}") from None
        kinds.add(state.quant_type + (", double quant" if state.nested else ""))
    return " + ".join(sorted(kinds)) or "4-bit"


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return name if name in DTYPES else "float32"


def _write_checkpoint(write_weights, base_dir: Path, out_dir: Path, report: MergeReport) -> None:
    """``write_weights(tmp)`` (save_pretrained) plus tokenizer files and the merge record, swapped in atomically."""

    def fill(tmp: Path) -> None:
        write_weights(tmp)
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp / name)
        info = {"adapters": report.adapters, "weights": report.weights, "dtype": report.dtype,
                "dequantized_4bit": report.dequantized_4bit, "base": str(base_dir)}
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2) + "\n")

    from lorakit.io.atomic import write_folder_atomically

    write_folder_atomically(out_dir, fill)
    report.files = sorted(p.name for p in out_dir.iterdir())


# ---------------------------------------------------------------------------------------------- CLI
def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge", help="merge adapters into the base and save a plain transformers checkpoint",
        description="Fold one or more LoRA adapters into the base weights (W + Σ w·ΔW) and write a full "
                    "safetensors checkpoint that loads with AutoModel*.from_pretrained, or with --format gguf one GGUF "
                    "file for llama.cpp / Ollama (Llama-family bases). Safetensors output is streamed: the base is "
                    "read, merged and written one tensor / shard at a time (peak memory about twice the largest "
                    "shard plus the adapters). Atomic: a failed or killed merge leaves no partial output.")
    p.add_argument("--base", required=True, help="base model: checkpoint folder (4-bit bnb format ok), preset "
                   "(smollm2-135m-instruct, minilm) or Hugging Face id")
    p.add_argument("--adapter", required=True, action="append", help="PEFT-format adapter folder (repeatable)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per --adapter (default: 1 each)")
    p.add_argument("--out", required=True,
                   help="output folder (safetensors) or .gguf file (--format gguf); must not exist unless --overwrite")
    p.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors",
                   help="safetensors: a transformers checkpoint folder (default); gguf: one llama.cpp / Ollama file "
                        "(Llama-family bases with a byte-level BPE tokenizer)")
    p.add_argument("--gguf-type", choices=GGUF_TYPE_CHOICES, default="f16",
                   help="--format gguf: storage of the 2-D weights (default f16; norms stay f32)")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of the saved weights (default: the base's; safetensors only)")
    p.add_argument("--max-shard-size", default="2GB",
                   help="largest safetensors shard (default 2GB); the streaming merge's memory follows it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically)")
    p.add_argument("--in-memory", action="store_true",
                   help="load the whole base before merging (the default streams it, holding about two output shards "
                        "at a time; the files are the same); safetensors only")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lorakit.errors import LorakitError, one_line

    try:
        if args.format == "gguf":
            if args.dtype:
                raise MergeError("--dtype is for safetensors output; with --format gguf use --gguf-type")
            report = merge_to_gguf(args.base, args.adapter, args.out, weights=args.weights, gguf_type=args.gguf_type,
                                   overwrite=args.overwrite)
        else:
            report = merge_to_checkpoint(args.base, args.adapter, args.out, weights=args.weights, dtype=args.dtype,
                                         max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                                         streaming=not args.in_memory)
    except (LorakitError, MergeError, OSError, ValueError) as exc:
        print(f"lorakit merge: {one_line(exc)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:  # torch reports a failed allocation as RuntimeError
        if not isinstance(exc, MemoryError) and "allocate memory" not in str(exc):
            raise
        hint = ("lower --max-shard-size (the streaming merge holds about two shards)" if not args.in_memory
                and args.format == "safetensors" else "drop --in-memory (the streaming merge holds about two shards)"
                if args.in_memory else "the GGUF export holds the whole model; use --format safetensors")
        print(f"lorakit merge: out of memory ({one_line(exc) or 'MemoryError'}); {hint}. Nothing was written.",
              file=sys.stderr)
        return 2
    if report.dequantized_4bit:
        print(f"base is 4-bit ({report.dequantized_4bit}): dequantised to full precision, then merged")
    weights = f" with weights {report.weights}" if report.weights else ""
    if report.gguf is not None:
        fallback = f", {len(report.gguf.fallback_f16)} tensor(s) kept f16" if report.gguf.fallback_f16 else ""
        print(f"merged {len(report.adapters)} adapter(s){weights} -> {report.out_dir} (GGUF {report.dtype}, "
              f"{report.gguf.tensors} tensors{fallback}, pre-tokenizer {report.gguf.pre_tokenizer!r})")
        return 0
    how = "streamed" if report.streamed else "in memory"
    print(f"merged {len(report.adapters)} adapter(s){weights} -> {report.out_dir} ({report.dtype}, {how}; "
          f"{', '.join(report.files)})")
    return 0

