"""Adapters written by the real `peft` package, and their dense ΔW as PEFT itself computes it.

Not a conftest.py (a second module named ``conftest`` would shadow tests/conftest.py for the
``from conftest import ...`` lines elsewhere). The adapters are built once per test session.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=128)).eval()


def randomize_lora(model: nn.Module, seed: int) -> None:
    """Non-zero A and B (PEFT initialises B = 0), so every ΔW is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


class Mixed(nn.Module):
    """One Embedding, one Conv2d (3×3), one Linear: the three LoRA layer kinds PEFT writes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 12)
        self.conv = nn.Conv2d(3, 10, 3)
        self.lin = nn.Linear(12, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(x))


@dataclass
class Written:
    path: Path
    dense: dict[str, torch.Tensor]  # module name -> ΔW (float64) in our (d, k) layout
    model: nn.Module  # the PeftModel that wrote it


def peft_dense(peft_model, name: str) -> torch.Tensor:
    """ΔW of one layer from PEFT's own get_delta_weight, in (d, k) = (out, in·kh·kw) layout."""
    module = peft_model.base_model.model.get_submodule(name)
    delta = module.get_delta_weight("default").detach().double()
    if isinstance(module.get_base_layer(), nn.Embedding):
        return delta.T  # PEFT: (num_embeddings, dim); ours: s·B·A = (dim, num_embeddings)
    return delta.reshape(delta.shape[0], -1)


def write_peft(path: Path, base: nn.Module, config, seed: int) -> Written:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, config)
    randomize_lora(model, seed)
    model.save_pretrained(path)
    names = sorted({n.rsplit(".lora_", 1)[0] for n, _ in model.base_model.model.named_parameters() if ".lora_" in n})
    return Written(path, {n: peft_dense(model, n) for n in names}, model)


def peft_load(path: Path, base: nn.Module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(path))


def loaded_dense(path: Path, base: nn.Module) -> dict[str, torch.Tensor]:
    """What PEFT computes for every layer of the adapter at `path`."""
    model = peft_load(path, base)
    names = sorted({n.rsplit(".lora_", 1)[0] for n, _ in model.base_model.model.named_parameters() if ".lora_" in n})
    return {n: peft_dense(model, n) for n in names}


def _session_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="lorakit-analysis-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.lru_cache(maxsize=1)
def build_adapters() -> dict[str, Written]:
    """a: r=8/α=16 with rank and alpha patterns; b: r=4 rsLoRA; c: r=6; qv: q,v only; mixed: emb/conv/linear."""
    root = _session_dir()
    LoraConfig = peft.LoraConfig
    out = {
        "a": write_peft(root / "a", tiny_llama(), LoraConfig(
            r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={"q_proj": 4},
            alpha_pattern={"layers.1.mlp.down_proj": 5}), seed=1),
        "b": write_peft(root / "b", tiny_llama(), LoraConfig(r=4, lora_alpha=8, use_rslora=True,
                                                              target_modules="all-linear"), seed=2),
        "c": write_peft(root / "c", tiny_llama(), LoraConfig(r=6, lora_alpha=12, target_modules="all-linear"), seed=3),
        "qv": write_peft(root / "qv", tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                         seed=4),
        "mixed": write_peft(root / "mixed", Mixed(), LoraConfig(r=4, lora_alpha=8, target_modules=["emb", "conv", "lin"]),
                            seed=5),
    }
    return out


@functools.lru_cache(maxsize=1)
def build_base_checkpoint() -> Path:
    path = _session_dir() / "base"
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(name="adapters")
def adapters_fixture() -> dict[str, Written]:
    return build_adapters()


@pytest.fixture(name="base_checkpoint")
def base_checkpoint_fixture() -> Path:
    return build_base_checkpoint()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices on a shared 2-core machine: OpenMP threads only add spinning."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
