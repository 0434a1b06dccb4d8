"""Before training: how many parameters LoRA trains, and how much memory a step will need.

    trainable = Σ_targeted r·(d + k)
    peak ≈ weights + LoRA params + grads (= LoRA params) + AdamW state (2 × LoRA params) + activations

Nothing is loaded: the model is built from its config on the meta device, wrapped with lorakit's
own LoRA layers, and one forward + backward runs on fake CPU tensors (memtrace) to find the peak of
live activation memory, including the backward's transient buffers. AdamW state is counted as
alive through that step (steady state after the first optimizer step).

Several processes (``processes`` > 1, torchrun): ``batch`` is per process. ``parallel="ddp"``: each
process holds everything, so its peak is the one-process peak at its batch. ``parallel="fsdp"``
(``lorakit train``'s ``train.parallel: fsdp``): every parameter (the 4-bit codes too) is split
along dim 0 into N padded shards, so weights, LoRA, gradients and AdamW state count 1/N (the largest
shard, rank 0's); buffers and 4-bit scales stay whole; and the step gathers whole units
(transformer blocks, an untied embedding and head, each on its own). Counted as alive at once:
the largest unit twice (its all-gather buffer and the parameters copied out of it), the largest
block once more (FSDP2 gathers the next block of the backward while one runs), and the root's own
parameters (final norm, a tied embedding) for the whole step. This form was chosen against the
measurements in BENCHMARKS.md ("FSDP: memory per process", a 4-layer Llama-512) and checked on
SmolLM2-135M (within −8% … −1%), so it is a fit, not a proof.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from lorakit.analysis.errors import PlanError

GIB = 1024**3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PlanRequest:
    model: str  # checkpoint/config folder, a preset name or a Hugging Face id (lorakit.models.resolve_base)
    r: int = 16  # LoRA rank
    target: str | list[str] = "all-linear"  # target_modules, PEFT syntax
    quant: str | None = None  # None or "nf4" (4-bit base weights, QLoRA)
    batch: int = 1  # sequences per step
    seq: int = 512  # tokens per sequence
    grad_checkpointing: bool = False  # recompute each block's activations in backward
    dtype: str | None = None  # base weights / compute: float32 (default) or bfloat16 / float16 (default with nf4)
    processes: int = 1  # torchrun processes; the plan is per process
    parallel: str = "ddp"  # with processes > 1: "ddp" (whole model each) or "fsdp" (sharded, lorakit train's)

    def resolved_dtype(self) -> str:
        return self.dtype or ("bfloat16" if self.quant else "float32")


@dataclass
class MemoryPlan:
    request: dict[str, Any]
    task: str  # causal-lm (next-token loss) or embedding (mean-pooled hidden state loss)
    adapted_layers: int
    trainable_params: int  # Σ r·(d + k)
    base_params: int  # frozen model parameters (before quantisation)
    weights_bytes: int  # frozen parameters + buffers as stored (4-bit + scales with nf4)
    lora_bytes: int
    grads_bytes: int
    optimizer_bytes: int  # AdamW exp_avg + exp_avg_sq (+ step counters)
    activation_bytes: int  # peak of forward+backward allocations, net of the gradients
    notes: list[str] = field(default_factory=list)
    gather_bytes: int = 0  # fsdp: whole units gathered during the step (0 for one process or ddp)

    @property
    def total_bytes(self) -> int:
        return (self.weights_bytes + self.lora_bytes + self.grads_bytes + self.optimizer_bytes + self.activation_bytes
                + self.gather_bytes)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / (self.trainable_params + self.base_params)

    def parts(self) -> dict[str, int]:
        parts = {"weights": self.weights_bytes, "lora_params": self.lora_bytes, "grads": self.grads_bytes,
                 "optimizer": self.optimizer_bytes, "activations": self.activation_bytes}
        return {**parts, "fsdp_gather": self.gather_bytes} if self.gather_bytes else parts

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes, "trainable_fraction": self.trainable_fraction}


def load_model_config(model: str) -> Any:
    """A transformers config from a preset name or a folder holding config.json.

    ``tiny-llama`` is the model ``lorakit train`` builds under that name (:mod:`lorakit.models`).
    """
    from transformers import AutoConfig

    from lorakit.errors import ConfigError
    from lorakit.models import resolve_base, tiny_llama_config

    if model == "tiny-llama":
        return tiny_llama_config()

    try:
        folder = resolve_base(model)  # a preset, a folder or a hub id
    except ConfigError as exc:
        raise PlanError(f"--model: {exc}") from None
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def is_causal_lm(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)


def build_model(config: Any, dtype: torch.dtype, device: str | torch.device = "meta") -> nn.Module:
    """The task model for `config` (causal LM, else the bare encoder), random init, in train mode."""
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device(device):
            model = cls.from_config(config, dtype=dtype)
    return model.train()


def step_loss(model: nn.Module, input_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """The loss the plan (and its measurement) trains on."""
    if causal:
        return model(input_ids=input_ids, labels=input_ids).loss
    hidden = model(input_ids=input_ids).last_hidden_state  # (B, T, h)
    return hidden.mean(dim=1).float().pow(2).mean()  # stands in for a pooled-embedding loss


def lora_config(request: PlanRequest) -> Any:
    from lorakit.core.config import LoraConfig

    return LoraConfig(r=request.r, lora_alpha=2 * request.r, target_modules=request.target)


def enable_checkpointing(model: nn.Module) -> None:
    # non-reentrant: works with a frozen embedding (no input requires_grad hack needed)
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5 name
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _unique_tensors(module: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in [*module.parameters(), *module.buffers()]:
        seen.setdefault(id(t), t)
    return list(seen.values())


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def validate(request: PlanRequest) -> None:
    for name in ("r", "batch", "seq"):
        value = getattr(request, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"{name} must be a positive integer, got {value!r}")
    if request.quant not in (None, "nf4"):
        raise PlanError(f"quant must be None or 'nf4', got {request.quant!r}")
    if isinstance(request.processes, bool) or not isinstance(request.processes, int) or request.processes < 1:
        raise PlanError(f"processes must be a positive integer, got {request.processes!r}")
    if request.parallel not in ("ddp", "fsdp"):
        raise PlanError(f"parallel must be 'ddp' or 'fsdp', got {request.parallel!r}")
    if request.resolved_dtype() not in DTYPES:
        raise PlanError(f"dtype must be one of {', '.join(DTYPES)}, got {request.dtype!r}")


@dataclass
class ParamCount:
    trainable: int  # Σ r·(d + k) over adapted layers
    base: int  # parameters of the model before LoRA
    adapted_layers: int


def count_parameters(model: nn.Module, r: int, target: str | list[str]) -> ParamCount:
    """LoRA parameter counts for `model` (any nn.Module; build it on the meta device), which is wrapped in place."""
    from lorakit.core.config import LoraConfig
    from lorakit.core.layers import LoraLayer
    from lorakit.core.model import get_lora_model

    base = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    wrapped = get_lora_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=target))
    trainable = sum(p.numel() for p in {id(p): p for p in wrapped.parameters()}.values() if p.requires_grad)
    return ParamCount(trainable, base, sum(1 for m in wrapped.modules() if isinstance(m, LoraLayer)))


def plan_memory(request: PlanRequest) -> MemoryPlan:
    """Parameter counts and the peak-memory split of one LoRA training step (see module doc)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lorakit.analysis.memtrace import LiveMemory, fake_cpu_module
    from lorakit.analysis.nf4_standin import quantize_standins
    from lorakit.core.layers import LoraLayer
    from lorakit.core.model import get_lora_model
    from lorakit.errors import LorakitError

    validate(request)
    config = load_model_config(request.model)
    dtype = DTYPES[request.resolved_dtype()]
    causal = is_causal_lm(config)
    model = build_model(config, dtype)
    if request.grad_checkpointing:
        enable_checkpointing(model)
    base_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    notes: list[str] = []
    if request.quant == "nf4":
        n = quantize_standins(model)
        notes.append(f"nf4: {n} Linear weights at 4 bits + double-quantised scales (not validated by a measured run)")
    try:
        model = get_lora_model(model, lora_config(request))
    except (LorakitError, ValueError) as exc:
        raise PlanError(f"LoRA config doesn't fit {request.model}: {exc}") from None
    trainable = [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]
    frozen = [t for t in _unique_tensors(model) if not (isinstance(t, nn.Parameter) and t.requires_grad)]
    lora_bytes = _nbytes(trainable)
    adapted = sum(1 for m in model.modules() if isinstance(m, LoraLayer))
    sharded = request.parallel == "fsdp" and request.processes > 1
    if sharded:
        shards = fsdp_shards(model, request.processes)

    mode = FakeTensorMode()
    fake_cpu_module(model, mode)
    with mode:
        input_ids = torch.zeros(request.batch, request.seq, dtype=torch.long)
        tracker = LiveMemory(_unique_tensors(model) + [input_ids])
        try:
            with tracker:
                step_loss(model, input_ids, causal).backward()
        except RuntimeError as exc:
            raise PlanError(f"could not trace a training step of {request.model}: {exc}") from None
    grads_bytes = lora_bytes
    # AdamW: exp_avg and exp_avg_sq like each parameter, plus a 4-byte step counter per parameter
    optimizer_bytes = 2 * lora_bytes + 4 * len(trainable)
    if request.grad_checkpointing:
        notes.append("gradient checkpointing: non-reentrant, one block recomputed at a time")
    if request.processes > 1:
        notes.append(f"per process of {request.processes} ({request.parallel}), batch {request.batch} each")
    if sharded:
        return MemoryPlan(
            request=dataclasses.asdict(request), task="causal-lm" if causal else "embedding", adapted_layers=adapted,
            trainable_params=sum(p.numel() for p in trainable), base_params=base_params,
            weights_bytes=shards.frozen_local + shards.whole, lora_bytes=shards.trainable_local,
            grads_bytes=shards.trainable_local, optimizer_bytes=2 * shards.trainable_local + 4 * len(trainable),
            activation_bytes=max(0, tracker.peak - grads_bytes), gather_bytes=2 * shards.largest_unit + shards.largest_block + shards.root,
            notes=notes)
    return MemoryPlan(
        request=dataclasses.asdict(request), task="causal-lm" if causal else "embedding", adapted_layers=adapted,
        trainable_params=sum(p.numel() for p in trainable), base_params=base_params,
        weights_bytes=_nbytes(frozen), lora_bytes=lora_bytes, grads_bytes=grads_bytes,
        optimizer_bytes=optimizer_bytes, activation_bytes=max(0, tracker.peak - grads_bytes), notes=notes,
    )


def advise(request: PlanRequest, plan: MemoryPlan, budget_gb: float) -> list[str]:
    """What to change when the plan exceeds `budget_gb` GiB; every option is re-planned, not guessed."""
    budget = budget_gb * GIB
    if plan.total_bytes <= budget:
        return [f"fits: {plan.total_bytes / GIB:.2f} GiB of {budget_gb:g} GiB"]
    largest = max(plan.parts().items(), key=lambda kv: kv[1])
    lines = [f"does not fit: {plan.total_bytes / GIB:.2f} GiB > {budget_gb:g} GiB budget "
             f"(largest part: {largest[0]} {largest[1] / GIB:.2f} GiB). Options:"]
    replace = dataclasses.replace
    singles = [replace(request, grad_checkpointing=True), replace(request, quant="nf4"),
               replace(request, batch=max(1, request.batch // 2)), replace(request, r=max(1, request.r // 2))]
    fitted = False
    for option in [o for i, o in enumerate(singles) if o != request and o not in singles[:i]]:
        total = plan_memory(option).total_bytes
        fitted |= total <= budget
        lines.append(f"  {_flags(request, option)}: {total / GIB:.2f} GiB "
                     f"({'fits' if total <= budget else 'still too big'})")
    if fitted:
        return lines
    # nothing single fits: the largest batch that fits with checkpointing, then with a 4-bit base too
    combos = [replace(request, grad_checkpointing=True), replace(request, grad_checkpointing=True, quant="nf4")]
    for option in [o for i, o in enumerate(combos) if o not in combos[:i]]:
        batch = request.batch
        while batch >= 1:
            candidate = replace(option, batch=batch)
            total = plan_memory(candidate).total_bytes
            if total <= budget:
                lines.append(f"  {_flags(request, candidate)}: {total / GIB:.2f} GiB (fits)")
                return lines
            batch //= 2
    lines.append(f"  even {_flags(request, candidate)} needs {total / GIB:.2f} GiB: "
                 "use a shorter --seq or a smaller model")
    return lines


def _flags(before: PlanRequest, after: PlanRequest) -> str:
    """The command-line changes that turn `before` into `after`."""
    flags = []
    if after.grad_checkpointing and not before.grad_checkpointing:
        flags.append("--grad-checkpointing")
    if after.quant != before.quant:
        flags.append(f"--quant {after.quant}")
    if after.batch != before.batch:
        flags.append(f"--batch {after.batch}")
    if after.r != before.r:
        flags.append(f"--r {after.r}")
    return " ".join(flags) or "as is"


def format_plan(plan: MemoryPlan) -> str:
    req = plan.request
    target = req["target"] if isinstance(req["target"], str) else ",".join(req["target"])
    lines = [
        f"model {req['model']} ({plan.task}), r={req['r']}, target={target}, quant={req['quant'] or 'none'}, "
        f"dtype={req['dtype'] or ('bfloat16' if req['quant'] else 'float32')}, batch={req['batch']} x seq={req['seq']}"
        f"{', grad checkpointing' if req['grad_checkpointing'] else ''}",
        f"trainable params: {plan.trainable_params:,} in {plan.adapted_layers} layers || base params: "
        f"{plan.base_params:,} || trainable%: {100 * plan.trainable_fraction:.4f}",
        "peak memory estimate:",
    ]
    for name, value in plan.parts().items():
        lines.append(f"  {name:<12} {_human(value):>10}")
    lines.append(f"  {'total':<12} {_human(plan.total_bytes):>10}")
    lines.extend(f"note: {n}" for n in plan.notes)
    lines.append("note: excludes the framework itself (Python + torch ≈ 0.4 GB RSS on CPU; the CUDA context on GPU)")
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_target(text: str) -> str | list[str]:
    """'all-linear', comma-separated module-name suffixes, or (anything with regex syntax) a regex."""
    if text == "all-linear" or not re.fullmatch(r"[\w.,\s-]+", text):
        return text
    return [t.strip() for t in text.split(",") if t.strip()]



@dataclass
class FsdpShards:
    frozen_local: int  # bytes of frozen parameters (and 4-bit codes) in rank 0's shards
    trainable_local: int  # bytes of trainable parameters in rank 0's shards
    whole: int  # buffers and 4-bit scales, whole on every process
    largest_unit: int  # bytes of the largest unit's parameters, gathered whole
    root: int  # bytes of the parameters outside every unit: gathered for the whole step
    largest_block: int  # bytes of the largest transformer block's parameters


_SHARDED_BUFFERS = ("packed",)  # the 4-bit stand-in's codes: a parameter once lorakit shards the model


def fsdp_shards(model: nn.Module, processes: int) -> FsdpShards:
    """How ``train.parallel: fsdp`` (lorakit.train.distributed.shard_model) splits `model`."""
    from lorakit.models import embedding_units, transformer_blocks

    def local(t: torch.Tensor) -> int:
        if t.dim() == 0:
            return t.element_size()
        rows = -(-t.shape[0] // processes)  # torch.chunk's first (largest) shard
        return rows * (t.numel() // max(t.shape[0], 1)) * t.element_size()

    def sharded_tensors(module: nn.Module) -> dict[int, torch.Tensor]:
        out = {id(p): p for p in module.parameters()}
        out.update({id(b): b for name, b in module.named_buffers() if name.rsplit(".", 1)[-1] in _SHARDED_BUFFERS})
        return out

    every = sharded_tensors(model)
    frozen = sum(local(t) for t in every.values() if not t.requires_grad)
    trainable = sum(local(t) for t in every.values() if t.requires_grad)
    whole = sum(t.numel() * t.element_size() for i, t in {id(b): b for b in model.buffers()}.items() if i not in every)
    blocks = transformer_blocks(model)
    units = blocks + embedding_units(model)
    in_units = {i for u in units for i in sharded_tensors(u)}
    rest = sum(t.numel() * t.element_size() for i, t in every.items() if i not in in_units)

    def largest(modules: list[nn.Module]) -> int:
        return max([_nbytes(list(sharded_tensors(u).values())) for u in modules], default=0)

    return FsdpShards(frozen, trainable, whole, largest(units), rest, largest(blocks))
