"""The figures of `lorakit bench`: each returns rows (figure, lorakit, reference, ratio, target)."""

from __future__ import annotations

import copy
import gc
import tempfile
import time
from dataclasses import dataclass

import torch

from lorakit.bench import core


@dataclass
class Row:
    figure: str
    ours: float  # seconds or MB
    reference: float
    ref_name: str
    target: str  # e.g. "<= 1.08"
    unit: str = "s"
    wall_ratio: float | None = None  # set when ours/reference are CPU times: the same ratio by wall clock

    @property
    def ratio(self) -> float:
        return self.ours / self.reference

    @property
    def met(self) -> bool | None:
        if not self.target:
            return None
        op, value = self.target.split()
        return self.ratio <= float(value) if op == "<=" else self.ratio >= float(value)

    def as_dict(self) -> dict:
        return {"figure": self.figure, "ours": self.ours, "reference": self.reference, "ref_name": self.ref_name,
                "ratio": self.ratio, "target": self.target, "met": self.met, "unit": self.unit,
                "wall_ratio": self.wall_ratio}


def train_steps(model_name: str, repeats: int, with_peft: bool = True, seq: int = 256) -> list[Row]:
    """LoRA r=16 train step (q,v and all-linear) vs the floor and vs PEFT, interleaved."""
    base = core.llama(**core.MODELS[model_name])
    ids = core.batch(8000, 4, seq)
    fns = {"floor": core.floor_step(copy.deepcopy(base), ids)}
    for target_name, target in core.TARGETS.items():
        fns[f"lorakit {target_name}"] = core.train_step(core.lorakit_model(copy.deepcopy(base), target), ids)
        if with_peft:
            fns[f"peft {target_name}"] = core.train_step(core.peft_model(copy.deepcopy(base), target), ids)
    t = core.interleaved(fns, repeats)
    rows = [
        Row(f"{model_name} train q,v r=16 vs floor", t["lorakit qv"].min, t["floor"].min, "floor", "<= 1.02"),
        Row(f"{model_name} train all-linear r=16 vs floor", t["lorakit all-linear"].min, t["floor"].min, "floor",
            "<= 1.08"),
    ]
    if with_peft:
        rows += [
            Row(f"{model_name} train all-linear r=16 vs PEFT", t["lorakit all-linear"].min, t["peft all-linear"].min,
                "PEFT", "<= 0.90"),
            Row(f"{model_name} train q,v r=16 vs PEFT", t["lorakit qv"].min, t["peft qv"].min, "PEFT", ""),
            Row(f"{model_name} PEFT all-linear vs floor (reference)", t["peft all-linear"].min, t["floor"].min,
                "floor", ""),
        ]
    return rows


def peak_memory(model_name: str, threads: int, seq: int = 256) -> list[Row]:
    """Peak RSS of a training process: floor vs lorakit vs PEFT (all-linear r=16), fresh processes."""
    floor = core.peak_rss_mb("floor", model_name, "all-linear", 4, seq, threads)["peak_mb"]
    ours = core.peak_rss_mb("lorakit", model_name, "all-linear", 4, seq, threads)["peak_mb"]
    peft_mb = core.peak_rss_mb("peft", model_name, "all-linear", 4, seq, threads)["peak_mb"]
    return [
        Row(f"{model_name} peak RSS all-linear vs floor", ours, floor, "floor", "<= 1.15", "MB"),
        Row(f"{model_name} peak RSS all-linear vs PEFT", ours, peft_mb, "PEFT", "<= 1.0", "MB"),
        Row(f"{model_name} PEFT peak RSS vs floor (reference)", peft_mb, floor, "floor", "", "MB"),
    ]


def inference(repeats: int, batch_size: int = 8, seq: int = 128) -> list[Row]:
    """Unmerged and merged inference vs the base (mixed-adapter batches: :func:`mixed_batches`)."""
    base = core.llama(hidden=512, layers=4, inter=1536)
    ids = core.batch(8000, batch_size, seq)
    unmerged = core.lorakit_model(copy.deepcopy(base), "all-linear")
    merged = core.lorakit_model(copy.deepcopy(base), "all-linear").merge_and_unload()
    t = core.interleaved({
        "base": core.forward_step(base, ids),
        "merged": core.forward_step(merged, ids),
        "unmerged": core.forward_step(unmerged, ids),
    }, repeats)
    return [
        _cpu_row("merged inference vs base", t, "merged", "base", "base", "<= 1.01"),
        _cpu_row("unmerged all-linear inference vs base", t, "unmerged", "base", "base", "<= 1.05"),
    ]


def mixed_batches(repeats: int, shapes: tuple[tuple[int, int], ...] = ((8, 128), (16, 1))) -> list[Row]:
    """Rows over 4 adapters in one batch vs every row on one adapter, lorakit and PEFT (issue 16 item 2).

    4-layer Llama (hidden 512, intermediate 1536, vocab 8000), 4 random adapters r=16 (B != 0) on every
    linear layer, inference. Per shape (batch x tokens: a prefill-like 8 x 128 and a decode step's 16 x 1)
    every configuration is interleaved in one process. Besides the targets, references: at one token per
    row, one rank-64 adapter reads as many factor bytes per layer as four rank-16 ones, so "single r=64 vs
    single r=16" is what reading the mixed batch's factors costs with no routing at all; the mixed batch
    forced through the concatenate-and-mask path (the autograd-capable one); PEFT's own mixed/single.
    """
    import peft

    from lorakit.core.layers.base import LoraLayer

    base = core.llama(hidden=512, layers=4, inter=1536).eval()
    ours = core.lorakit_model(copy.deepcopy(base), "all-linear", adapters=4).eval()
    wide = core.lorakit_model(copy.deepcopy(base), "all-linear", r=64).eval()
    cfg = dict(r=16, lora_alpha=32, target_modules="all-linear")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg), adapter_name="a0")
    for i in range(1, 4):
        pm.add_adapter(f"a{i}", peft.LoraConfig(**cfg))
    core._randomize(pm)
    pm.eval()

    def concat_path(ids, names):  # the mask path, forced
        def step():
            original = LoraLayer._can_gather
            LoraLayer._can_gather = lambda *a, **k: False
            try:
                with torch.no_grad():
                    ours(input_ids=ids, adapter_names=names)
            finally:
                LoraLayer._can_gather = original
        return step

    rows = []
    for size, seq in shapes:
        ids = core.batch(8000, size, seq)
        mixed = [f"a{i % 4}" for i in range(size)]
        fns = {
            "single": core.forward_step(ours, ids),
            "mixed": core.forward_step(ours, ids, adapter_names=mixed),
            "concat": concat_path(ids, mixed),
            "peft single": core.forward_step(pm, ids),
            "peft mixed": core.forward_step(pm, ids, adapter_names=mixed),
        }
        if seq == 1:  # at one token the factors' bytes, not the rank FLOPs (4x at r=64), set the LoRA cost
            fns["single r64"] = core.forward_step(wide, ids)
        t = core.interleaved(fns, repeats, warmup=2)
        shape = f"{size} x {seq}"
        rows += [
            _cpu_row(f"mixed batch {shape}, 4 adapters vs 1 adapter", t, "mixed", "single", "1 adapter", "<= 1.05"),
            _cpu_row(f"mixed batch {shape} vs PEFT's mixed batch", t, "mixed", "peft mixed", "PEFT mixed", "<= 1.0"),
        ]
        if seq == 1:
            rows.append(_cpu_row(f"(mixed batch {shape}: 1 adapter r=64 vs r=16: 4 adapters' factor bytes, no routing)",
                                 t, "single r64", "single", "1 adapter", ""))
        rows += [
            _cpu_row(f"(mixed batch {shape}: concat+mask path vs 1 adapter)", t, "concat", "single", "1 adapter", ""),
            _cpu_row(f"(mixed batch {shape}: PEFT 4 adapters vs PEFT 1 adapter)", t, "peft mixed", "peft single",
                     "PEFT 1 adapter", ""),
        ]
    return rows


def adapter_loading(count: int = 50) -> list[Row]:
    """Time to load the k-th adapter onto one base, 1st vs `count`-th (lorakit and PEFT)."""
    import peft

    from lorakit.core.config import LoraConfig
    from lorakit.core.model import LoraModel, get_lora_model

    base = core.llama(hidden=256, layers=4, inter=768, vocab=4000)
    with tempfile.TemporaryDirectory() as tmp:
        get_lora_model(copy.deepcopy(base), LoraConfig(r=16, target_modules="all-linear")).save_pretrained(tmp)
        lm = LoraModel.from_pretrained(copy.deepcopy(base), tmp, adapter_name="a0")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp, adapter_name="a0")
        ours, theirs = [], []
        for i in range(1, count + 1):
            # a collection first, as core.interleaved does: otherwise a cyclic-GC pass over both growing models
            # (PEFT's is far larger) lands inside whichever load happens to trigger it
            gc.collect()
            t0 = time.perf_counter()
            lm.load_adapter(tmp, adapter_name=f"a{i}")
            ours.append(time.perf_counter() - t0)
            gc.collect()
            t0 = time.perf_counter()
            pm.load_adapter(tmp, adapter_name=f"a{i}")
            theirs.append(time.perf_counter() - t0)
    first, last = min(ours[:3]), min(ours[-3:])
    return [
        Row(f"load adapter #{count} vs #1", last, first, "#1", "<= 1.10"),
        Row(f"load adapter #{count} vs PEFT's #{count}", last, min(theirs[-3:]), "PEFT", ""),
        Row(f"PEFT load adapter #{count} vs its #1 (reference)", min(theirs[-3:]), min(theirs[:3]), "PEFT #1", ""),
    ]


SMOLLM2_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in): q/o, k/v, gate/up, down


def _cpu_row(figure: str, t: dict, ours: str, ref: str, ref_name: str, target: str = "") -> Row:
    """By min process CPU time (one thread: the work itself), with the wall-clock ratio alongside."""
    return Row(figure, t[ours].cpu_min, t[ref].cpu_min, ref_name, target, wall_ratio=t[ours].min / t[ref].min)


def one_thread(fn):
    """Run a section with one torch thread: bitsandbytes' OpenMP pool and torch's fight otherwise,
    turning 2 ms ops into 20 ms ones and distorting the ratio (see benchmarks/bench_quant.py, which
    also separates the two libraries into their own processes)."""

    def wrapped(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapped


def _calls(n: int, fn, *args) -> None:
    for _ in range(n):
        fn(*args)


@one_thread
def nf4(repeats: int) -> list[Row]:
    """NF4 quantize/dequantize (double quant, blocksize 64) vs bitsandbytes on a 4096×4096 weight."""
    try:
        import bitsandbytes.functional as bnbf

        from lorakit.quant import dequantize_nf4, quantize_nf4
    except ImportError as exc:
        return [Row(f"NF4 skipped ({exc})", float("nan"), 1.0, "-", "")]
    w = torch.randn(4096, 4096)
    packed, state = quantize_nf4(w)
    bpacked, bstate = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    t = core.interleaved({
        "q ours": lambda: quantize_nf4(w),
        "q bnb": lambda: bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
        "dq ours": lambda: dequantize_nf4(packed, state),
        "dq bnb": lambda: bnbf.dequantize_4bit(bpacked, bstate),
    }, repeats)
    rows = [  # by CPU time (one thread), as the QLoRA rows: wall-clock minima swing with other processes
        _cpu_row("NF4 quantize 4096² vs bitsandbytes (time)", t, "q ours", "q bnb", "bnb", "<= 1.0"),
        _cpu_row("NF4 dequantize 4096² vs bitsandbytes (time)", t, "dq ours", "dq bnb", "bnb", "<= 1.0"),
    ]
    for out_f, in_f in SMOLLM2_SHAPES:  # sub-millisecond calls: each sample is a loop of 50
        w = torch.randn(out_f, in_f)
        packed, state = quantize_nf4(w)
        bpacked, bstate = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        t = core.interleaved({  # each output is dropped before the next call, as in a layer's forward
            "ours": lambda p=packed, s=state: _calls(50, dequantize_nf4, p, s),
            "bnb": lambda p=bpacked, s=bstate: _calls(50, bnbf.dequantize_4bit, p, s),
        }, repeats)
        rows.append(_cpu_row(f"NF4 dequantize {out_f}×{in_f} (SmolLM2) vs bitsandbytes (time, 50 calls)",
                             t, "ours", "bnb", "bnb", "<= 1.0"))
    return rows


COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16}


@one_thread
def qlora_step(repeats: int) -> list[Row]:
    """QLoRA train step (NF4 + double quant base, LoRA all-linear r=16) vs PEFT + bitsandbytes and vs the
    floor, on a Llama with SmolLM2-135M's layer shapes; then one 4-bit LoRA linear's forward + backward at
    each SmolLM2 shape and at 4096², with the dense frozen linear as its floor.

    Each figure in two compute dtypes, interleaved in one loop: fp32, and bf16 (the QLoRA paper's
    recipe): the whole model in bf16 (embeddings, norms, head, activations), the 4-bit matmuls
    computing in bf16, the LoRA factors in fp32 (PEFT's default for a half-precision base, and
    lorakit's); the floor is the same model with dense bf16 weights."""
    try:
        import bitsandbytes as bnb
        import peft
    except ImportError as exc:
        return [Row(f"QLoRA skipped ({exc})", float("nan"), 1.0, "-", "")]
    from lorakit.quant import quantize_model

    base32 = core.llama(hidden=576, layers=4, inter=1536, heads=9, kv_heads=3)
    ids = core.batch(8000, 4, 128)
    fns = {}
    for tag, dtype in COMPUTE.items():
        base = copy.deepcopy(base32).to(dtype)
        ours = quantize_model(copy.deepcopy(base), "nf4", double_quant=True, skip=["lm_head"], compute_dtype=dtype)
        ours = core.lorakit_model(ours, "all-linear")
        theirs = copy.deepcopy(base)
        _bnb_quantize(theirs, bnb, dtype)
        theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        fns.update({f"ours {tag}": core.train_step(ours, ids), f"theirs {tag}": core.train_step(theirs, ids),
                    f"floor {tag}": core.floor_step(base, ids)})
    t = core.interleaved(fns, repeats)
    rows = []
    for tag in COMPUTE:
        name = f"QLoRA step {tag}, SmolLM2 shapes (576/1536, 9/3 heads), 4 layers, 4×128, all-linear r=16"
        rows += _vs_peft_bnb(t, name, tag, "PEFT + bitsandbytes")
        rows.append(_cpu_row(f"{name}: lorakit vs the floor (reference)", t, f"ours {tag}", f"floor {tag}", "floor"))
    rows.append(_cpu_row("QLoRA step bf16 vs fp32, lorakit (reference)", t, "ours bf16", "ours fp32", "fp32"))
    rows.append(_cpu_row("QLoRA step bf16 vs fp32, PEFT + bnb (reference)", t, "theirs bf16", "theirs fp32", "fp32"))
    for out_f, in_f in SMOLLM2_SHAPES + [(4096, 4096)]:
        rows += _qlora_layer(out_f, in_f, repeats if out_f < 4096 else max(2, repeats - 2), bnb, peft)
    return rows


def _qlora_layer(out_f: int, in_f: int, repeats: int, bnb, peft, tokens: int = 512) -> list[Row]:
    """One NF4 linear + LoRA r=16: forward and backward of 512 tokens (grad to the input and LoRA), in each
    compute dtype (x, base weight and output in that dtype; LoRA factors fp32)."""
    import torch.nn as nn

    from lorakit.core.config import LoraConfig
    from lorakit.core.model import get_lora_model
    from lorakit.quant import Linear4bit

    class One(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    def step(model, x):
        def run():
            y = model(x)
            y.backward(torch.ones_like(y))
            x.grad = None
            model.zero_grad(set_to_none=True)

        return run

    torch.manual_seed(0)
    linear32 = nn.Linear(in_f, out_f, bias=False).requires_grad_(False)
    x32 = torch.randn(tokens, in_f)
    cfg = dict(r=16, lora_alpha=32, target_modules=["proj"])
    fns = {}
    for tag, dtype in COMPUTE.items():
        linear = copy.deepcopy(linear32).to(dtype)
        ours = get_lora_model(One(Linear4bit.from_linear(copy.deepcopy(linear), compute_dtype=dtype)),
                              LoraConfig(**cfg))
        holder = One(copy.deepcopy(linear))
        _bnb_quantize(holder, bnb, dtype)
        theirs = peft.get_peft_model(holder, peft.LoraConfig(**cfg))
        x = x32.to(dtype).requires_grad_(True)
        fns.update({f"ours {tag}": step(ours, x), f"theirs {tag}": step(theirs, x),
                    f"floor {tag}": step(One(linear), x)})
    t = core.interleaved(fns, repeats)
    rows = []
    for tag in COMPUTE:
        name = f"QLoRA linear {out_f}×{in_f} (out×in) {tag}, fwd+bwd of {tokens} tokens, r=16"
        rows += _vs_peft_bnb(t, name, tag, "PEFT + bnb")
    return rows


def _vs_peft_bnb(t: dict, name: str, tag: str, theirs: str) -> list[Row]:
    """lorakit vs PEFT + bitsandbytes (target ≤ 0.8) and the floor vs PEFT + bitsandbytes, for one compute dtype."""
    return [
        _cpu_row(f"{name} vs {theirs}", t, f"ours {tag}", f"theirs {tag}", "PEFT+bnb", "<= 0.8"),
        _cpu_row(f"{name}: the floor (dense, frozen) vs PEFT + bnb (reference)", t, f"floor {tag}",
                 f"theirs {tag}", "PEFT+bnb"),
    ]


def _bnb_quantize(model, bnb, compute_dtype: torch.dtype = torch.float32) -> None:
    """Every nn.Linear but lm_head -> bitsandbytes' Linear4bit (NF4, double quant, blocksize 64), quantised
    from the weight in its own dtype, computing in ``compute_dtype``: what transformers' load_in_4bit builds."""
    import torch.nn as nn

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name != "lm_head":
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True, blocksize=64)._quantize("cpu")
                if child.bias is not None:
                    q.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(module, child_name, q)
