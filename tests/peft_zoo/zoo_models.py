"""Small models in the spirit of PEFT's custom-model zoo (tests/test_custom_models.py), written here.

Same layer kinds and sizes as PEFT's zoo where that matters for LoRA (grouped convs with
groups 8 and 2, a 1×1 conv, an unbatched MultiheadAttention, a GRU, transformers' Conv1D after an
Embedding, a layer that uses its weight as a raw parameter). Unlike PEFT's, every model here
keeps batch rows independent (except the unbatched MHA, whose rows are tokens), so a per-row
adapter choice can be checked row by row.

``MODELS[name]()`` builds the model (seeded, eval mode); ``make_input(name, seed)`` a batch of 4.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin1(self.drop(torch.relu(self.lin0(x)))), dim=-1)


class MLPWithGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.gru = nn.GRU(input_size=20, hidden_size=20, num_layers=1, batch_first=True)
        self.fc = nn.Linear(20, 2)

    def forward(self, x):
        h = torch.relu(self.lin0(x)).unsqueeze(1)  # (B, 1, 20): one time step
        h, _ = self.gru(h)
        return torch.log_softmax(self.fc(h.squeeze(1)), dim=-1)


class EmbConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)  # GPT-2's transposed linear: 5 -> 1
        self.lin0 = nn.Linear(10, 2)

    def forward(self, ids):
        h = torch.relu(self.conv1d(self.emb(ids))).flatten(1)  # (B, 10)
        return torch.log_softmax(self.lin0(h), dim=-1)


class _ConvNet(nn.Module):
    """input (B, features) -> reshape -> conv -> relu -> flatten -> lin0 -> log-softmax."""

    def __init__(self, conv: nn.Module, in_shape: tuple[int, ...], flat: int, repeat: int = 1):
        super().__init__()
        self.in_shape, self.repeat = in_shape, repeat
        setattr(self, self.conv_name(conv), conv)
        self._conv_attr = self.conv_name(conv)
        self.lin0 = nn.Linear(flat, 2)

    @staticmethod
    def conv_name(conv: nn.Module) -> str:
        return {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}[type(conv)]

    def forward(self, x):
        x = x.reshape(x.shape[0], *self.in_shape)
        if self.repeat > 1:  # the same signal on several channels, as PEFT's zoo does
            x = torch.cat([x] * self.repeat, dim=1)
        h = torch.relu(getattr(self, self._conv_attr)(x)).flatten(1)
        return torch.log_softmax(self.lin0(h), dim=-1)


class Conv2dGroups(nn.Module):
    """lin0 feeds a grouped conv (groups = 8 = PEFT's default r), as in PEFT's zoo."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 144)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.lin1 = nn.Linear(16, 2)

    def forward(self, x):
        h = torch.relu(self.lin0(x)).reshape(-1, 16, 3, 3)
        h = torch.relu(self.conv2d(h)).flatten(1)
        return torch.log_softmax(self.lin1(h), dim=-1)


class Mha(nn.Module):
    """PEFT's zoo case: an unbatched (L, E) sequence through nn.MultiheadAttention(10, 2)."""

    def __init__(self, batch_first: bool = False):
        super().__init__()
        self.batch_first = batch_first
        self.mha = nn.MultiheadAttention(10, 2, batch_first=batch_first)
        self.lin0 = nn.Linear(10, 2)

    def forward(self, x):
        if self.batch_first:  # (B, 30) -> (B, 3, 10): rows are batch items
            x = x.reshape(x.shape[0], 3, 10)
        h, _ = self.mha(x, x, x)
        if self.batch_first:
            h = h.mean(dim=1)
        return torch.log_softmax(self.lin0(h), dim=-1)


class _LinearUsingParameter(nn.Module):
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x):
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = _LinearUsingParameter(10, 20)
        self.lin1 = _LinearUsingParameter(20, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(x))), dim=-1)


_BUILDERS = {
    "MLP": MLP,
    "MLPWithGRU": MLPWithGRU,
    "EmbConv1D": EmbConv1D,
    "Conv1d": lambda: _ConvNet(nn.Conv1d(1, 1, 2), (1, 10), 9),
    "Conv1dGroups": lambda: _ConvNet(nn.Conv1d(8, 8, 3, groups=2), (1, 10), 64, repeat=8),
    "Conv1dKernel1": lambda: _ConvNet(nn.Conv1d(3, 10, 1), (3, 10), 100),
    "Conv2d": lambda: _ConvNet(nn.Conv2d(5, 10, 3), (5, 3, 3), 10),
    "Conv2d1x1": lambda: _ConvNet(nn.Conv2d(1, 10, 1), (1, 3, 3), 90),
    "Conv2dStrided": lambda: _ConvNet(nn.Conv2d(4, 6, 3, stride=2, padding=1), (4, 5, 5), 54),
    "Conv2dReflect": lambda: _ConvNet(nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (4, 5, 5), 150),
    "Conv2dDilated": lambda: _ConvNet(nn.Conv2d(4, 6, 3, padding="same", dilation=2), (4, 5, 5), 150),
    "Conv2dGroups": Conv2dGroups,
    "Conv2dGroups2": lambda: _ConvNet(nn.Conv2d(16, 32, 3, padding=1, groups=2), (16, 4, 4), 512),
    "Conv3d": lambda: _ConvNet(nn.Conv3d(5, 10, 3), (5, 3, 3, 3), 10),
    "MHA": Mha,
    "MHABatched": lambda: Mha(batch_first=True),
    "MlpUsingParameters": MlpUsingParameters,
}

# features per input row, for the models that take floats
_IN_FEATURES = {"Conv2dReflect": 100, "Conv2dDilated": 100, "Conv1dKernel1": 30, "Conv2d": 45, "Conv2dStrided": 100, "Conv2dGroups2": 256, "Conv3d": 135,
                "Conv2d1x1": 9, "MHABatched": 30}

# models whose batch rows don't interact (a per-row adapter choice can be checked row by row)
ROW_INDEPENDENT = set(_BUILDERS) - {"MHA"}

MODELS = {name: (lambda b=b: _seeded(b)) for name, b in _BUILDERS.items()}


def _seeded(builder) -> nn.Module:
    torch.manual_seed(0)
    return builder().eval()


def make_input(name: str, seed: int = 0, rows: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "EmbConv1D":
        return torch.randint(0, 100, (rows, 10), generator=g)
    if name == "MHA":
        return torch.randn(6, 10, generator=g)  # (L, E): one unbatched sequence
    return torch.randn(rows, _IN_FEATURES.get(name, 10), generator=g)


def reduction_length(model: nn.Module) -> int:
    """An upper bound on the summation lengths along the forward: Σ over weights of max(fan-in, fan-out).

    (Fan-out too because a raw-parameter weight may be stored (in, out).) Adapter ranks, softmax
    and attention sums add little; callers add a margin for them.
    """
    return sum(max(p.shape[0], p[0].numel()) for p in model.parameters() if p.dim() >= 2)
