"""Records, prompt masking, truncation, packing, batching. Tokenizers only; no model."""

from __future__ import annotations

import json

import pytest

from lorakit.train.data import (
    IGNORE,
    chat_segments,
    collate,
    encode_classification,
    encode_lm,
    epoch_batches,
    instruction_prompt,
    pack,
    prompt_ids,
)
from lorakit.train.presets import byte_tokenizer, load_tokenizer
from lorakit.train.records import DataError, read_records


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_byte_tokenizer_round_trips_text(tok):
    text = "héllo wörld – 2+2=4\n"
    assert len(tok) == 259 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.decode(ids(tok, text)) == text
    assert len(ids(tok, text)) == len(text.encode())


@pytest.mark.parametrize("line, reason", [
    ('{"instruction": "a", "output": "b"', "bad JSON"),
    ({"instruction": "a"}, "missing field 'output'"),
    ({"instruction": "a", "output": 3}, "field 'output' must be a string, got int"),
    ([1, 2], "expected a JSON object, got list"),
])
def test_malformed_record_names_file_and_line(tmp_path, line, reason):
    path = write(tmp_path, "d.jsonl", [{"instruction": "q", "output": "a"}, "", line])
    with pytest.raises(DataError) as info:
        read_records(path, "instruction")
    assert str(info.value).startswith(f"{path}:3: {reason}")
    assert "data.on_bad_record: skip" in str(info.value)
    records = read_records(path, "instruction", on_bad_record="skip")
    assert (len(records.items), records.bad) == (1, 1)
    assert records.bad_examples[0].startswith(f"{path}:3: {reason}")


def test_format_detection_and_chat_checks(tmp_path):
    for record, fmt in [({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
                         "chat"), ({"instruction": "x", "output": "y"}, "instruction"),
                        ({"prompt": "x", "completion": "y"}, "prompt_completion"), ({"text": "x"}, "text"),
                        ({"text": "x", "label": "pos"}, "classification")]:
        assert read_records(write(tmp_path, "a.jsonl", [record])).format == fmt
    bad = {"messages": [{"role": "user", "content": "only a question"}]}
    with pytest.raises(DataError, match=":1: the conversation has no assistant message"):
        read_records(write(tmp_path, "b.jsonl", [bad]), "chat")
    with pytest.raises(DataError, match=r"messages\[0\] must be"):
        read_records(write(tmp_path, "c.jsonl", [{"messages": [{"role": "bot", "content": "x"}]}]), "chat")


def test_csv_classification(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"good, really",pos\nbad,neg\nextra,pos,oops\n')
    with pytest.raises(DataError, match=r"d.csv:4: expected 2 columns"):
        read_records(str(path))
    records = read_records(str(path), on_bad_record="skip")
    assert [r.fields for r in records.items] == [{"text": "good, really", "label": "pos"},
                                                 {"text": "bad", "label": "neg"}]
    assert records.format == "classification" and records.bad == 1


def test_instruction_labels_mask_exactly_the_prompt(tok):
    records = read_records_from([{"instruction": "Add", "input": "2 3", "output": "5"}])
    enc = encode_lm(records, tok, "instruction", 512)
    (ex,) = enc.examples
    prompt = [tok.bos_token_id] + ids(tok, "### Instruction:\nAdd\n\n### Input:\n2 3\n\n### Response:\n")
    answer = ids(tok, "5") + [tok.eos_token_id]
    assert ex.input_ids == prompt + answer
    assert ex.labels == [IGNORE] * len(prompt) + answer
    assert prompt_ids(tok, "instruction", "Add", "2 3") == prompt
    assert instruction_prompt("Q") == "### Instruction:\nQ\n\n### Response:\n"


def read_records_from(rows):
    from lorakit.train.records import Record

    return [Record(r, f"mem:{i}") for i, r in enumerate(rows)]


def test_prompt_completion_and_text(tok):
    (pc,) = encode_lm(read_records_from([{"prompt": "ab", "completion": "cd"}]), tok, "prompt_completion", 64).examples
    assert pc.labels == [IGNORE] * 3 + ids(tok, "cd") + [2]
    (tx,) = encode_lm(read_records_from([{"text": "ab"}]), tok, "text", 64).examples
    assert tx.input_ids == [1] + ids(tok, "ab") + [2] and tx.labels == [IGNORE] + ids(tok, "ab") + [2]


def test_chat_template_masks_everything_but_assistant_turns(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
            {"role": "assistant", "content": "A2"}]
    (ex,) = encode_lm(read_records_from([{"messages": msgs}]), tok, "chat", 512).examples
    full = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ex.input_ids) == full
    learned = tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])
    assert learned == "A1</s>\nA2</s>\n"


def test_chat_fallback_without_template(tok):
    plain = byte_tokenizer()
    plain.chat_template = None
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (ex,) = encode_lm(read_records_from([{"messages": msgs}]), plain, "chat", 512).examples
    assert plain.decode(ex.input_ids) == "<s><|user|>\nhi\n<|assistant|>\nyo</s>"
    assert [v for v in ex.labels if v != IGNORE] == ids(plain, "yo") + [2]
    gen = [i for piece, _ in chat_segments(plain, msgs[:1], generation=True) for i in piece]
    assert plain.decode(gen) == "<s><|user|>\nhi\n<|assistant|>\n"


def test_truncation_and_dropping(tok):
    rows = [{"prompt": "x" * 10, "completion": "y" * 10}, {"prompt": "x" * 40, "completion": "y"}]
    enc = encode_lm(read_records_from(rows), tok, "prompt_completion", 16)
    assert (enc.truncated, enc.dropped, len(enc.examples)) == (2, 1, 1)
    assert len(enc.examples[0].input_ids) == 16 and enc.examples[0].labels[-1] != IGNORE


def test_classification_encoding_and_labels():
    tok = load_tokenizer("minilm")
    rows = read_records_from([{"text": "Great film", "label": "pos"}, {"text": "bad", "label": 0}])
    enc = encode_classification(rows, tok, ["neg", "pos"], 8)
    assert [e.labels for e in enc.examples] == [1, 0]
    assert enc.examples[0].input_ids[0] == tok.cls_token_id and enc.examples[0].input_ids[-1] == tok.sep_token_id
    with pytest.raises(DataError, match="mem:0: label 'meh' is not one of"):
        encode_classification(read_records_from([{"text": "x", "label": "meh"}]), tok, ["neg", "pos"], 8)


def test_packing_fills_rows(tok):
    rows = read_records_from([{"text": "abcdefg"}] * 5)  # 9 tokens each with bos/eos
    examples = encode_lm(rows, tok, "text", 64).examples
    packed = pack(examples, 16)
    assert [len(e.input_ids) for e in packed] == [16, 16, 13]
    assert [i for e in packed for i in e.input_ids] == [i for e in examples for i in e.input_ids]


def test_epoch_batches_are_deterministic_permutations_grouped_by_length():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    a = epoch_batches(lengths, 8, seed=3, epoch=1)
    assert a == epoch_batches(lengths, 8, seed=3, epoch=1)
    assert a != epoch_batches(lengths, 8, seed=3, epoch=2)
    assert sorted(i for b in a for i in b) == list(range(200))
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in a)
    plain = epoch_batches(lengths, 8, seed=3, epoch=1, group_by_length=False)
    waste_plain = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in plain)
    assert waste * 5 < waste_plain


def test_collate_pads_right():
    from lorakit.train.data import Example

    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [IGNORE])], pad=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, IGNORE]]
    cls = collate([Example([1, 2], 3), Example([4], 0)], pad=0)
    assert cls["labels"].tolist() == [3, 0]


def test_builtin_task_records():
    records = read_records("builtin:word-sentiment", split="test", limit=5)
    assert records.labels == ["negative", "positive"] and len(records.items) == 5
    with pytest.raises(DataError, match="does not exist"):
        read_records("nope.jsonl")
