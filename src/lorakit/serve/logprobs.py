"""Logprobs as the API returns them: token strings, completions' and chat's response shapes.

The engine hands over token ids and numbers (:class:`~lorakit.serve.generation.TokenLogprob`);
this module turns them into text. A token's string is its text *in context*: the text the token
adds after the few tokens before it (``decode(prev + [t])`` minus ``decode(prev)``), so " cat"
keeps its leading space with byte-level BPE and sentencepiece tokenizers alike, and the strings of
a sequence concatenate to its text. Special tokens (BOS, EOS) show their own text ("</s>") but add
no characters to ``text_offset``, because the returned text skips them.

Completions (vLLM's shape, OpenAI's legacy one)::

    {"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{str: float} | None],
     "text_offset": [int]}

``top_logprobs[i]`` holds the k most likely tokens plus the chosen one (so up to k+1 entries, as
OpenAI documents); the echoed prompt's first token has no context, so its logprob and top are null.
Chat (OpenAI's shape)::

    [{"token": str, "logprob": float, "bytes": [int], "top_logprobs": [{"token", "logprob", "bytes"}]}]
"""

from __future__ import annotations

from collections.abc import Sequence

from lorakit.serve.generation import TokenLogprob

CONTEXT = 4  # tokens of context a token's string is decoded after (enough for sentencepiece's "▁")


class TokenTexts:
    """Token strings in the context of the tokens before them (one instance per sequence)."""

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.context = list(context)[-CONTEXT:]
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])

    def piece(self, token_id: int) -> str:
        """The text `token_id` adds after the current context (the context does not move)."""
        if not self.context:
            return self._decode([token_id])
        before = self._decode(self.context)
        after = self._decode(self.context + [token_id])
        return after[len(before):] if after.startswith(before) else self._decode([token_id])

    def advance(self, token_id: int) -> None:
        self.context = (self.context + [token_id])[-CONTEXT:]

    def width(self, token_id: int, piece: str) -> int:
        """Characters the token adds to the returned text (special tokens are skipped there)."""
        return 0 if token_id in self.special else len(piece)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class CompletionLogprobs:
    """Builds completions' ``logprobs`` objects for one choice, chunk by chunk, offsets running on."""

    def __init__(self, tokenizer, context: Sequence[int] = (), offset: int = 0):
        self.texts = TokenTexts(tokenizer, context)
        self.offset = offset  # text_offset of the next token

    def add(self, entries: Sequence[TokenLogprob | None], ids: Sequence[int] | None = None) -> dict:
        """The object for these tokens. entries[i] None (the prompt's first token): null logprob and top;
        `ids` gives the token ids then (else they are the entries' own)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, entry in enumerate(entries):
            token_id = entry.token_id if entry is not None else ids[i]
            piece = self.texts.piece(token_id)
            out["tokens"].append(piece)
            out["text_offset"].append(self.offset)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                top = {self.texts.piece(t): lp for t, lp in entry.top}
                top.setdefault(piece, entry.logprob)  # the chosen token is always there
                out["token_logprobs"].append(entry.logprob)
                out["top_logprobs"].append(top)
            self.offset += self.texts.width(token_id, piece)
            self.texts.advance(token_id)
        return out

    def skip_to(self, offset: int) -> None:
        """Continue offsets from `offset` (the echoed prompt's text length, for the completion)."""
        self.offset = offset


def merge(parts: Sequence[dict]) -> dict:
    """One completions logprobs object from chunks of it, in order."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for part in parts:
        for key in out:
            out[key].extend(part[key])
    return out


class ChatLogprobs:
    """Builds chat's ``logprobs.content`` entries for one choice, chunk by chunk."""

    def __init__(self, tokenizer, context: Sequence[int] = (), top: int = 0):
        self.texts = TokenTexts(tokenizer, context)
        self.top = top

    def add(self, entries: Sequence[TokenLogprob]) -> list[dict]:
        out = []
        for entry in entries:
            piece = self.texts.piece(entry.token_id)
            alternatives = [_chat_token(self.texts.piece(t), lp) for t, lp in entry.top[:self.top]]
            out.append({**_chat_token(piece, entry.logprob), "top_logprobs": alternatives})
            self.texts.advance(entry.token_id)
        return out


def _chat_token(piece: str, logprob: float) -> dict:
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}
