"""Records -> token ids and labels, with the prompt masked, plus packing, batching and padding.

Causal LM: ``input_ids = [bos] + prompt + answer + [eos]`` and ``labels`` equal to ``input_ids``
except ``-100`` over ``[bos] + prompt``, so the loss only teaches the answer. Prompt templates:

* instruction: ``### Instruction:\\n{instruction}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n``
  (Alpaca's layout without its one-sentence preamble);
* chat: the tokenizer's chat template when it has one (each assistant turn is learned, the rest
  masked); otherwise the fallback ``<|role|>\\n{content}\\n`` per message, the assistant's
  content followed by eos (the Zephyr layout);
* prompt_completion: the prompt text exactly as given; text: everything is learned.

Classification: the tokenizer's own special tokens ([CLS] ... [SEP]) and an integer label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.train.records import DataError, Record

IGNORE = -100  # label value CrossEntropyLoss skips


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int  # per-token labels (causal LM) or one class index


@dataclass
class Encoded:
    examples: list[Example]
    truncated: int = 0  # examples cut to max_length
    dropped: int = 0  # examples with nothing left to learn after truncation


INSTRUCTION = "### Instruction:\n{instruction}\n\n"
INSTRUCTION_INPUT = "### Input:\n{input}\n\n"
RESPONSE = "### Response:\n"
FALLBACK_TURN = "<|{role}|>\n"


def instruction_prompt(instruction: str, input_text: str = "") -> str:
    text = INSTRUCTION.format(instruction=instruction)
    if input_text:
        text += INSTRUCTION_INPUT.format(input=input_text)
    return text + RESPONSE


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def eos_id(tokenizer: Any) -> int:
    for attr in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise DataError("the tokenizer has no eos (or sep) token to end answers with; set tokenizer.eos_token")


def pad_id(tokenizer: Any) -> int:
    value = getattr(tokenizer, "pad_token_id", None)
    return int(value) if value is not None else eos_id(tokenizer)


def _bos(tokenizer: Any) -> list[int]:
    value = getattr(tokenizer, "bos_token_id", None)
    return [int(value)] if value is not None else []


def prompt_ids(tokenizer: Any, fmt: str, prompt: str, input_text: str = "") -> list[int]:
    """Token ids a generation should start from, laid out as training laid out prompts."""
    if fmt == "instruction":
        return _bos(tokenizer) + _ids(tokenizer, instruction_prompt(prompt, input_text))
    if fmt == "chat":
        segments = chat_segments(tokenizer, [{"role": "user", "content": prompt}], generation=True)
        return [i for ids, _ in segments for i in ids]
    return _bos(tokenizer) + _ids(tokenizer, prompt)


def chat_segments(tokenizer: Any, messages: Sequence[dict], generation: bool = False) -> list[tuple[list[int], bool]]:
    """(ids, learned) pieces of a conversation; assistant turns are the learned pieces."""
    segments: list[tuple[list[int], bool]] = []
    if has_chat_template(tokenizer):
        def render(msgs: Sequence[dict], gen: bool) -> str:
            return tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen)

        done = ""
        for k, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            head, full = render(messages[:k], True), render(messages[: k + 1], False)
            if not head.startswith(done) or not full.startswith(head):
                raise DataError("the tokenizer's chat template re-renders earlier turns differently, so assistant "
                                "turns can't be located; remove tokenizer.chat_template to use the fallback layout")
            segments += [(_ids(tokenizer, head[len(done):]), False), (_ids(tokenizer, full[len(head):]), True)]
            done = full
        if generation:
            rest = render(messages, True)
            segments.append((_ids(tokenizer, rest[len(done):]), False))
        return segments
    segments.append((_bos(tokenizer), False))
    for msg in messages:
        head = FALLBACK_TURN.format(role=msg["role"])
        if msg["role"] == "assistant":
            segments += [(_ids(tokenizer, head), False), (_ids(tokenizer, msg["content"]) + [eos_id(tokenizer)], True)]
        else:
            segments.append((_ids(tokenizer, head + msg["content"] + "\n"), False))
    if generation:
        segments.append((_ids(tokenizer, FALLBACK_TURN.format(role="assistant")), False))
    return segments


def lm_segments(tokenizer: Any, fmt: str, fields: dict[str, Any], text_field: str) -> list[tuple[list[int], bool]]:
    eos = [eos_id(tokenizer)]
    if fmt == "instruction":
        prompt = instruction_prompt(fields["instruction"], fields.get("input", ""))
        return [(_bos(tokenizer) + _ids(tokenizer, prompt), False), (_ids(tokenizer, fields["output"]) + eos, True)]
    if fmt == "prompt_completion":
        return [(_bos(tokenizer) + _ids(tokenizer, fields["prompt"]), False),
                (_ids(tokenizer, fields["completion"]) + eos, True)]
    if fmt == "chat":
        return chat_segments(tokenizer, fields["messages"])
    if fmt == "text":
        return [(_bos(tokenizer), False), (_ids(tokenizer, fields[text_field]) + eos, True)]
    raise DataError(f"format {fmt!r} is not a causal-LM format; use model.task: classification for it")


def encode_lm(records: Sequence[Record], tokenizer: Any, fmt: str, max_length: int,
              text_field: str = "text") -> Encoded:
    out = Encoded([])
    for record in records:
        ids: list[int] = []
        labels: list[int] = []
        for piece, learned in lm_segments(tokenizer, fmt, record.fields, text_field):
            ids += piece
            labels += piece if learned else [IGNORE] * len(piece)
        if len(ids) > max_length:
            out.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        # the label at position 0 is never predicted (nothing comes before it)
        if all(v == IGNORE for v in labels[1:]):
            out.dropped += 1
            continue
        out.examples.append(Example(ids, labels))
    return out


def label_index(labels: list[str], value: str | int, where: str) -> int:
    if isinstance(value, int):
        if not 0 <= value < len(labels):
            raise DataError(f"{where}: label {value} is out of range for {len(labels)} labels {labels}")
        return value
    if value not in labels:
        raise DataError(f"{where}: label {value!r} is not one of {labels}; list every label in data.labels")
    return labels.index(value)


def encode_classification(records: Sequence[Record], tokenizer: Any, labels: list[str], max_length: int,
                          text_field: str = "text", label_field: str = "label") -> Encoded:
    out = Encoded([])
    for record in records:
        ids = list(tokenizer(record.fields[text_field], truncation=True, max_length=max_length)["input_ids"])
        out.truncated += len(ids) == max_length
        out.examples.append(Example(ids, label_index(labels, record.fields[label_field], record.where)))
    return out


def infer_labels(records: Sequence[Record], label_field: str) -> list[str]:
    """Sorted distinct string labels; integer labels become "0".."max"."""
    values = [r.fields[label_field] for r in records]
    if all(isinstance(v, int) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    return sorted({str(v) for v in values})


def pack(examples: Sequence[Example], max_length: int) -> list[Example]:
    """Concatenate examples (in order) and cut the stream into max_length rows."""
    ids = [i for e in examples for i in e.input_ids]
    labels = [v for e in examples for v in e.labels]  # type: ignore[union-attr]
    rows = []
    for start in range(0, len(ids), max_length):
        row_labels = labels[start:start + max_length]
        if any(v != IGNORE for v in row_labels[1:]):
            rows.append(Example(ids[start:start + max_length], row_labels))
    return rows


def collate(examples: Sequence[Example], pad: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row. Returns input_ids/attention_mask (B, T) and labels ((B, T) or (B,))."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, : len(e.input_ids)] = 1
    if isinstance(examples[0].labels, int):
        labels = torch.tensor([e.labels for e in examples], dtype=torch.long)  # (B,)
    else:
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (B, T)
        for row, e in enumerate(examples):
            labels[row, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  group_by_length: bool = True, chunk_batches: int = 32) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch; a pure function of (seed, epoch).

    With grouping, a shuffled order is cut into chunks of ``chunk_batches`` batches, each chunk is
    sorted by length (longest first) and cut into batches, and the batch order is shuffled again:
    random batches of similar-length rows.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        size = batch_size * chunk_batches
        order = [i for s in range(0, len(order), size)
                 for i in sorted(order[s:s + size], key=lambda j: -lengths[j])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation order: sorted by length (least padding), fixed."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
