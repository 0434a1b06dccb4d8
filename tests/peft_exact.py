"""Helpers for the PEFT-exactness tests: build the same model in PEFT and lorakit, load the same
folder in both, compare outputs with torch.equal and the re-saved files tensor by tensor."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import torch
import torch.nn as nn
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig

# keys PEFT writes that describe the writer, not the adapter
_BOOKKEEPING = {"peft_version", "inference_mode", "base_model_name_or_path", "auto_mapping", "revision"}


class MLP(nn.Module):
    """PEFT's test-suite MLP shape, with biases everywhere."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.lin2 = nn.Linear(20, 2)

    def forward(self, x):
        return self.lin2(self.relu(self.lin1(self.relu(self.lin0(x)))))


class GRUTagger(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = nn.GRU(6, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0])


class ConvNet(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3)
        self.lin = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.lin(torch.relu(self.conv(x)).flatten(1))


def randomize_trainable(model: nn.Module, seed: int = 1) -> None:
    """Give every trainable tensor (what training changes) fresh values: factors, biases, token rows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def run(model: nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model(x, **kw) if not isinstance(x, dict) else model(**x, **kw)
    return out.logits if hasattr(out, "logits") else out


def assert_same_folder(a: Path, b: Path) -> None:
    """Same tensors (names, dtypes, values) and the same adapter settings in both folders."""
    ta, tb = load_file(Path(a) / "adapter_model.safetensors"), load_file(Path(b) / "adapter_model.safetensors")
    assert sorted(ta) == sorted(tb), (sorted(ta), sorted(tb))
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), (key, (ta[key] - tb[key]).abs().max())
    ca = json.loads((Path(a) / "adapter_config.json").read_text())
    cb = json.loads((Path(b) / "adapter_config.json").read_text())
    for key in set(ca) - _BOOKKEEPING:
        va, vb = ca[key], cb.get(key)
        if isinstance(va, list) and isinstance(vb, list):
            va, vb = sorted(map(str, va)), sorted(map(str, vb))
        assert va == vb, (key, ca[key], cb.get(key))


def peft_to_lorakit_to_peft(make, kwargs: dict, x, tmp_path: Path, randomize=randomize_trainable) -> lorakit.LoraModel:
    """PEFT writes, lorakit loads (torch.equal) and re-saves (same files), PEFT loads that (torch.equal)."""
    pm = peft.get_peft_model(make(), peft.LoraConfig(**kwargs))
    randomize(pm)
    pm.eval().requires_grad_(False)
    # frozen like a loaded adapter: for a non-contiguous 3-D input (a GRU's output) F.linear takes
    # another BLAS path when the weight requires grad, even under no_grad, and rounds differently
    ref = run(pm, x)
    pm.save_pretrained(tmp_path / "peft")
    ours = lorakit.LoraModel.from_pretrained(make(), tmp_path / "peft")
    assert torch.equal(run(ours, x), ref)
    ours.save_pretrained(tmp_path / "ours")
    assert_same_folder(tmp_path / "peft", tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    assert torch.equal(run(back, x), ref)
    return ours


def lorakit_to_peft(make, kwargs: dict, x, tmp_path: Path, randomize=randomize_trainable):
    """lorakit writes, PEFT loads with torch.equal outputs; returns (ours, peft model)."""
    ours = lorakit.get_lora_model(make(), LoraConfig(**kwargs))
    randomize(ours)
    ours.eval().requires_grad_(False)
    ours.save_pretrained(tmp_path / "lk")
    pm = peft.PeftModel.from_pretrained(make(), tmp_path / "lk").eval()
    assert torch.equal(run(pm, x), run(ours, x))
    return ours, pm
