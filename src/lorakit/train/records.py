"""Read training records from JSONL / CSV / built-in tasks, checking each against its format.

A record that doesn't fit (bad JSON, missing field, wrong type) raises :class:`DataError` naming
``file:line``, or with ``on_bad_record="skip"`` is dropped and counted. Formats:

====================  ==========================================================
instruction           ``{"instruction": str, "input": str (optional), "output": str}`` (Alpaca)
prompt_completion     ``{"prompt": str, "completion": str}``
chat                  ``{"messages": [{"role": "system|user|assistant", "content": str}, ...]}``
text                  ``{"text": str}`` (every token is learned)
classification        ``{"text": str, "label": str | int}``; CSV with the same columns
====================  ==========================================================
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

FORMATS = ("instruction", "prompt_completion", "chat", "text", "classification")
ROLES = ("system", "user", "assistant")


class DataError(LorakitError, ValueError):
    """A data file is missing, empty, or has a malformed record."""


@dataclass
class Record:
    fields: dict[str, Any]
    where: str  # "file:line" for messages


@dataclass
class Records:
    items: list[Record]
    format: str
    bad: int = 0  # records skipped under on_bad_record=skip
    bad_examples: list[str] = field(default_factory=list)  # the first few reasons, for the report
    labels: list[str] | None = None  # built-in tasks know their label order


def detect_format(fields: dict[str, Any], text_field: str = "text", label_field: str = "label") -> str:
    """The format a record's keys suggest (used for data.format: auto)."""
    if "messages" in fields:
        return "chat"
    if "instruction" in fields:
        return "instruction"
    if "prompt" in fields or "completion" in fields:
        return "prompt_completion"
    if label_field in fields:
        return "classification"
    if text_field in fields:
        return "text"
    raise DataError(
        f"cannot tell the format of a record with keys {sorted(fields)}; set data.format to one of {FORMATS}"
    )


def check_record(fields: Any, fmt: str, text_field: str = "text", label_field: str = "label") -> None:
    """Raise ValueError saying what is wrong with this record for this format."""
    if not isinstance(fields, dict):
        raise ValueError(f"expected a JSON object, got {type(fields).__name__}")

    def need_str(key: str, optional: bool = False) -> None:
        if key not in fields:
            if optional:
                return
            raise ValueError(f"missing field {key!r}")
        if not isinstance(fields[key], str):
            raise ValueError(f"field {key!r} must be a string, got {type(fields[key]).__name__}")

    if fmt == "instruction":
        need_str("instruction")
        need_str("input", optional=True)
        need_str("output")
    elif fmt == "prompt_completion":
        need_str("prompt")
        need_str("completion")
    elif fmt == "text":
        need_str(text_field)
    elif fmt == "classification":
        need_str(text_field)
        label = fields.get(label_field)
        if label_field not in fields:
            raise ValueError(f"missing field {label_field!r}")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise ValueError(f"field {label_field!r} must be a string or an integer, got {type(label).__name__}")
    elif fmt == "chat":
        messages = fields.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("field 'messages' must be a non-empty list of {role, content} objects")
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
                raise ValueError(f"messages[{i}] must be {{'role': one of {ROLES}, 'content': str}}, got {msg!r}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("the conversation has no assistant message, so there is nothing to learn")
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


def read_records(path: str, fmt: str = "auto", on_bad_record: str = "error", text_field: str = "text",
                 label_field: str = "label", split: str = "train", limit: int | None = None) -> Records:
    """All records of a data file (``builtin:<task>`` reads a lorakit.train.tasks split)."""
    if path.startswith("builtin:"):
        return _builtin(path.removeprefix("builtin:"), split, fmt, text_field, label_field, limit)
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file {path} does not exist (paths are relative to the working directory)")
    if file.suffix.lower() == ".csv":
        raw = _read_csv(file, label_field)
        if fmt == "auto":
            fmt = "classification"
    elif file.suffix.lower() in (".jsonl", ".json"):
        raw = _read_jsonl(file)
    else:
        raise DataError(f"{path}: unsupported file type {file.suffix!r}; use .jsonl (any format) or .csv")
    out = Records([], fmt)
    for where, fields, parse_error in raw:
        try:
            if parse_error:
                raise ValueError(parse_error)
            if out.format == "auto":
                out.format = detect_format(fields, text_field, label_field)
            check_record(fields, out.format, text_field, label_field)
        except ValueError as exc:
            if on_bad_record != "skip":
                raise DataError(f"{where}: {exc} (set data.on_bad_record: skip to skip such records)") from None
            out.bad += 1
            if len(out.bad_examples) < 3:
                out.bad_examples.append(f"{where}: {exc}")
            continue
        out.items.append(Record(fields, where))
        if limit is not None and len(out.items) >= limit:
            break
    if not out.items:
        raise DataError(f"{path} has no usable records" + (f" ({out.bad} malformed)" if out.bad else ""))
    return out


def _read_jsonl(file: Path):
    """(where, record, parse error) per non-blank line; a line that is not UTF-8 or is nested too
    deeply is a bad record (skippable), a file that is not UTF-8 text at all is a DataError."""
    with file.open("rb") as fh:
        head = fh.read(4096)
        if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
            kind = "UTF-16" if head.startswith((b"\xff\xfe", b"\xfe\xff")) or head[1:2] == b"\x00" else "binary"
            raise DataError(f"{file} is not UTF-8 text (it looks {kind}); JSONL data must be UTF-8, one JSON "
                            "object per line — convert it (e.g. iconv -f UTF-16 -t UTF-8)")
        fh.seek(0)
        for number, raw in enumerate(fh, start=1):
            where = f"{file}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield where, None, f"not valid UTF-8 (byte {exc.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield where, None, f"bad JSON ({exc.msg} at column {exc.colno})"
            except RecursionError:
                yield where, None, "JSON nested too deeply"


def _read_csv(file: Path, label_field: str):
    with file.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            where = f"{file}:{reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                yield where, None, f"expected {len(reader.fieldnames or [])} columns {reader.fieldnames}"
                continue
            label = row.get(label_field)
            if isinstance(label, str) and label.lstrip("-").isdigit():
                row[label_field] = int(label)
            yield where, dict(row), None


def _builtin(name: str, split: str, fmt: str, text_field: str, label_field: str, limit: int | None) -> Records:
    from lorakit.train.tasks import load_task

    if fmt not in ("auto", "classification"):
        raise DataError(f"builtin:{name} is a classification task; data.format must be auto or classification")
    task = load_task(name)
    rows = task.train if split == "train" else task.test
    items = [Record({text_field: text, label_field: task.labels[label]}, f"builtin:{name}/{split}[{i}]")
             for i, (text, label) in enumerate(rows)]
    return Records(items[:limit] if limit else items, "classification", labels=list(task.labels))
