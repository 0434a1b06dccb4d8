"""Built-in real text tasks that need no download, for the demo, tests and benchmarks.

* ``docstring-topics``: docstrings of the Python standard library, labelled by the area of the
  module they come from (text, files, network, math, concurrency, formats) — ~1,100 real
  English paragraphs written by many authors.
* ``word-sentiment``: words of the VADER sentiment lexicon (PyPI ``vaderSentiment``; 7,500
  entries rated by 10 people each), labelled negative/positive by their mean rating.

Splits are deterministic (a hash of the text), so every machine and run sees the same ones.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.resources
import inspect
from dataclasses import dataclass

from lorakit.errors import ConfigError

_DOC_AREAS: dict[str, list[str]] = {
    "text": ["string", "re", "textwrap", "difflib", "unicodedata", "codecs"],
    "files": ["os", "shutil", "pathlib", "glob", "tempfile", "filecmp", "fnmatch", "stat"],
    "network": ["socket", "http.client", "urllib.request", "urllib.parse", "smtplib", "ftplib", "ssl",
                "http.server", "email.message"],
    "math": ["math", "statistics", "decimal", "fractions", "random", "cmath", "numbers"],
    "concurrency": ["threading", "multiprocessing.pool", "asyncio.tasks", "asyncio.locks", "queue",
                    "concurrent.futures", "subprocess", "sched"],
    "formats": ["json", "csv", "pickle", "xml.etree.ElementTree", "configparser", "zipfile", "tarfile", "gzip",
                "base64", "plistlib"],
}


@dataclass
class Task:
    name: str
    labels: list[str]
    train: list[tuple[str, int]]  # (text, label index)
    test: list[tuple[str, int]]


def _is_test(text: str, test_fraction: float) -> bool:
    digest = hashlib.md5(text.encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < test_fraction


def _split(name: str, labels: list[str], examples: list[tuple[str, int]], test_fraction: float) -> Task:
    examples = sorted(set(examples))
    train = [e for e in examples if not _is_test(e[0], test_fraction)]
    test = [e for e in examples if _is_test(e[0], test_fraction)]
    return Task(name, labels, train, test)


def docstring_topics(test_fraction: float = 0.25, max_chars: int = 300) -> Task:
    labels = list(_DOC_AREAS)
    examples: list[tuple[str, int]] = []
    for label, modules in enumerate(_DOC_AREAS.values()):
        for module_name in modules:
            module = importlib.import_module(module_name)
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                objs = [obj]
                if inspect.isclass(obj):
                    objs += [v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and callable(v)]
                for o in objs:
                    doc = inspect.getdoc(o)
                    if doc and len(doc) > 40:
                        examples.append((" ".join(doc.split())[:max_chars], label))
    # a docstring shared by two areas (inherited boilerplate) has no single right answer
    counts: dict[str, set[int]] = {}
    for text, label in examples:
        counts.setdefault(text, set()).add(label)
    examples = [(t, lab) for t, lab in examples if len(counts[t]) == 1]
    return _split("docstring-topics", labels, examples, test_fraction)


def word_sentiment(test_fraction: float = 0.25, min_abs_rating: float = 1.0) -> Task:
    try:
        lexicon = importlib.resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_text("utf-8")
    except ModuleNotFoundError:
        raise ConfigError(
            "the word-sentiment task needs the vaderSentiment package: pip install --no-deps vadersentiment"
        ) from None
    examples = []
    for line in lexicon.splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0].isalpha():
            continue  # emoticons and abbreviations with symbols
        rating = float(parts[1])
        if abs(rating) >= min_abs_rating:
            examples.append((parts[0], int(rating > 0)))
    return _split("word-sentiment", ["negative", "positive"], examples, test_fraction)


TASKS = {"docstring-topics": docstring_topics, "word-sentiment": word_sentiment}


def load_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown built-in task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]()
