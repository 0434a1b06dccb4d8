"""Per-request generation pieces the engine applies to each batch row.

* :class:`SamplingParams`: what a request asks for (temperature, top_p, stop strings, seed, ...).
* :func:`sample_rows`: next tokens for a batch of rows, each row with its own settings and its own
  ``torch.Generator``: a seeded request draws the same tokens whatever else shares its batch.
* :class:`TextStream`: incremental detokenisation with stop strings. Text that might still turn
  out to be the start of a stop string is held back, so a stop string never reaches the client.
* :func:`token_logprobs` / :func:`prompt_logprobs`: log-probabilities of the chosen (or prompt)
  tokens and the top-k alternatives, from the model's raw logits: ``log_softmax(logits)`` in fp32,
  before temperature and top-p (vLLM's default), so they score the model, not the sampler.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

MAX_LOGPROBS = 20  # top-k alternatives per token at most (vLLM's default max_logprobs)


class SamplingError(ValueError):
    """A sampling parameter is out of range."""


@dataclass
class SamplingParams:
    """One request's decoding settings (OpenAI's names and defaults)."""

    max_tokens: int = 16  # new tokens at most (the server caps this); 0 = score the prompt only
    temperature: float = 1.0  # 0 = greedy (argmax); else softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling: smallest set of tokens with probability mass ≥ top_p
    stop: list[str] = field(default_factory=list)  # generation ends before the first of these strings
    seed: int | None = None  # seeds this request's own generator (None: a random seed)
    ignore_eos: bool = False  # keep going past EOS (benchmarks: fixed-length outputs)
    logprobs: int | None = None  # per generated token: its logprob and the top-k alternatives (None: none)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise SamplingError(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
                raise SamplingError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {k!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 2):
            raise SamplingError(f"temperature must be in [0, 2], got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError("stop strings must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**63)
        return torch.Generator().manual_seed(seed % 2**64)


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of an ``n > 1`` request: choice 0 uses `seed` itself (so n=1 is
    unchanged), the others a hash of (seed, index), so each choice draws differently yet every
    choice repeats exactly when the request does."""
    if seed is None or index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator]) -> list[int]:
    """Next token per row. logits: (B, V) fp32. Greedy rows in one argmax; sampled rows one by one
    (each draws from its own generator, so rows never share random state)."""
    tokens = logits.argmax(dim=-1).tolist()  # (B,) greedy choice for every row
    for i, p in enumerate(params):
        if not p.greedy:
            tokens[i] = _sample(logits[i], p.temperature, p.top_p, generators[i])
    return tokens


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One draw from softmax(logits / temperature), cut to the top-p nucleus.

    Safe for every value the schema accepts: the logits are shifted so the largest is 0 before
    dividing (so a temperature of 1e-45 gives -inf, never inf − inf = NaN) and the work is in
    float64 (a top_p of 1e-300 is not rounded to 0); the most likely token always survives, and a
    distribution that still can't be sampled falls back to it.
    """
    scaled = logits.double()
    scaled = (scaled - scaled.max()) / temperature  # (V,) ≤ 0; the argmax is exactly 0
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        drop = before >= top_p
        drop[0] = False  # the top token always stays
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    total = float(probs.sum())
    if not (total > 0 and torch.isfinite(probs).all()):
        return int(scaled.argmax())
    return int(torch.multinomial(probs, 1, generator=generator).item())


@dataclass
class TokenLogprob:
    """One token's log-probability under the model, and the k most likely tokens at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first; k entries


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], ks: Sequence[int | None]) -> list[TokenLogprob | None]:
    """Per row of logits (B, V): the chosen token's log_softmax and the top-k; None where k is None."""
    rows = [i for i, k in enumerate(ks) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(ks)
    if not rows:
        return out
    logp = torch.log_softmax(logits[rows].float(), dim=-1)  # (R, V) raw distribution, no temperature
    chosen = logp.gather(1, torch.tensor([[tokens[i]] for i in rows])).squeeze(1).tolist()  # (R,)
    k_max = max(ks[i] for i in rows)
    top_vals, top_ids = logp.topk(k_max, dim=-1) if k_max else (logp[:, :0], logp[:, :0].long())  # (R, k_max)
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        k = ks[i]
        out[i] = TokenLogprob(int(tokens[i]), chosen[j], list(zip(top_ids[j][:k], top_vals[j][:k])))
    return out


def prompt_logprobs(logits: torch.Tensor, ids: Sequence[int], k: int) -> list[TokenLogprob | None]:
    """Log-probabilities of each prompt token given the ones before it; logits: (L, V) of the prompt.

    The first token has no context, so its entry is None (OpenAI's / vLLM's null)."""
    if len(ids) < 2:
        return [None] * len(ids)
    return [None] + token_logprobs(logits[:-1], list(ids[1:]), [k] * (len(ids) - 1))


class TextStream:
    """Turns generated token ids into text deltas, stopping at stop strings.

    ``push(token)`` returns ``(delta, stopped)``; the text is re-decoded from all generated ids each
    time (prefix-stable for byte-level, sentencepiece and word-level tokenizers alike), text ending
    in an incomplete UTF-8 sequence (U+FFFD) waits for the next token, and a tail that could begin
    a stop string waits until it can't.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # the final text so far (cut at a stop string once one appears)
        self.emitted = 0  # characters of self.text already returned

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return "", False
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            return self._take(len(self.text)), True
        self.text = text
        return self._take(len(text) - self._held_back(text)), False

    def flush(self) -> str:
        """The rest of the text (generation ended for another reason than a stop string)."""
        if not self.text and self.ids:  # only an incomplete character was generated
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        end = max(end, self.emitted)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest


def check_finite(logits: torch.Tensor) -> None:
    """Raise if the model produced NaN/inf logits (a broken adapter or base)."""
    if not bool(torch.isfinite(logits).all()):
        bad = (~torch.isfinite(logits)).any(dim=-1).nonzero().flatten().tolist()
        raise FloatingPointError(f"non-finite logits in batch rows {bad}")


__all__ = ["MAX_LOGPROBS", "SamplingError", "SamplingParams", "TextStream", "TokenLogprob", "check_finite",
           "choice_seed", "prompt_logprobs", "sample_rows", "token_logprobs"]
