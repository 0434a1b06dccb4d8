"""Side-by-side measurements: lorakit vs PEFT / bitsandbytes on the same models, in one run.

Every figure is a ratio of two timings taken in the same process, interleaved (A B A B ...) over
several repeats after warm-up, so machine noise hits both sides alike. Peak memory is measured in
fresh subprocesses (peak RSS), one per configuration.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Timing:
    name: str
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU time of the same calls

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def cpu_min(self) -> float:
        """Min process CPU time: with one torch thread, the work itself, whatever the other processes do."""
        return min(self.cpu_times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Run each fn `warmup` times, then `repeats` rounds of all fns in turn; wall and CPU time per call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {name: Timing(name) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            out[name].times.append(time.perf_counter() - t0)
            out[name].cpu_times.append(time.process_time() - c0)
    return out


# ---------------------------------------------------------------------------- models
def llama(hidden: int, layers: int, inter: int, vocab: int = 8000, heads: int = 8, seed: int = 0,
          kv_heads: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads, vocab_size=vocab,
                      max_position_embeddings=1024)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg)


MODELS = {
    "llama-512x8": dict(hidden=512, layers=8, inter=1536),
    "llama-2048x2": dict(hidden=2048, layers=2, inter=5632),
}
TARGETS = {"qv": ["q_proj", "v_proj"], "all-linear": "all-linear"}


def batch(vocab: int, size: int, seq: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (size, seq), generator=g)


# ---------------------------------------------------------------------------- steps
def floor_step(model, ids: torch.Tensor) -> Callable[[], None]:
    """Forward + backward with every weight frozen: only activation gradients are computed."""
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step():
        x = embed(ids).detach().requires_grad_(True)
        model(inputs_embeds=x, labels=ids).loss.backward()

    return step


def train_step(model, ids: torch.Tensor) -> Callable[[], None]:
    """LoRA step: forward, backward, AdamW step, zero_grad (same for lorakit and PEFT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def forward_step(model, ids: torch.Tensor, **kwargs) -> Callable[[], None]:
    def step():
        with torch.no_grad():
            model(input_ids=ids, **kwargs)

    return step


def lorakit_model(base, target, r: int = 16, adapters: int = 1, randomize: bool = True):
    from lorakit.core.config import LoraConfig
    from lorakit.core.model import get_lora_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target)
    lm = get_lora_model(base, cfg, "a0")
    for i in range(1, adapters):
        lm.add_adapter(f"a{i}", cfg)
    if randomize:
        _randomize(lm)
    return lm


def peft_model(base, target, r: int = 16):
    import peft

    return peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=target))


def _randomize(model) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


# ---------------------------------------------------------------------------- peak memory
_MEMORY_SCRIPT = r"""
import json, sys, torch
sys.path[:0] = {paths!r}
from lorakit.bench import core
torch.manual_seed(0)
torch.set_num_threads({threads})
base = core.llama(**core.MODELS[{model!r}])
ids = core.batch(8000, {batch}, {seq})
kind = {kind!r}
if kind == "floor":
    step = core.floor_step(base, ids)
elif kind == "lorakit":
    step = core.train_step(core.lorakit_model(base, core.TARGETS[{target!r}]), ids)
else:
    step = core.train_step(core.peft_model(base, core.TARGETS[{target!r}]), ids)
import gc; gc.collect()
before = core.vm_kb("VmRSS")
for _ in range(2):
    step()
# VmHWM, not ru_maxrss: Linux carries the parent's ru_maxrss across fork + exec, so under a `lorakit bench`
# that had already run a bigger model every process here reported the parent's peak
print(json.dumps({{"peak_mb": core.vm_kb("VmHWM") / 1024, "before_mb": before / 1024}}))
"""


def vm_kb(field: str) -> int:
    """A /proc/self/status memory figure (VmRSS, VmHWM) in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def reset_peak() -> None:
    """Restart VmHWM from the current RSS: loading a checkpoint peaks far above training (copies while
    reading), which would hide the training step's own peak."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb(kind: str, model: str, target: str, batch_size: int, seq: int, threads: int) -> dict:
    """Peak RSS (MB) of a fresh process that builds the model and runs two steps of `kind`."""
    script = _MEMORY_SCRIPT.format(paths=sys.path, threads=threads, model=model, batch=batch_size, seq=seq,
                                   kind=kind, target=target)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
