"""The LLM demo's task: which exception does a one-line Python expression raise?

Every example is generated from a template with random values and labelled by *running* it
with this Python (``eval`` with empty builtins except a few safe functions), so the labels are
the interpreter's own. About 30% of the expressions run fine (answer: ``no exception``); the
others raise ZeroDivisionError, IndexError, KeyError, ValueError, TypeError, AttributeError or
NameError. Telling them apart needs reading the values (is the index past the end? is the key
there? is the string a number?), which a 135M chat model can't do out of the box.

Train and held-out examples come from disjoint random draws and never share an expression.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

SYSTEM = "Which exception does this Python expression raise? Answer with its name, or: no exception."
NO_ERROR = "no exception"
_SAFE_BUILTINS = {name: __builtins__[name] if isinstance(__builtins__, dict) else getattr(__builtins__, name)
                  for name in ("int", "float", "len", "str", "list", "dict", "sorted", "sum", "max", "min", "abs",
                               "round", "chr", "ord", "pow", "divmod", "range", "tuple", "set")}
WORDS = ("apple", "river", "cloud", "stone", "tiger", "piano", "lemon", "robot", "orbit", "pixel", "maple",
         "delta", "sugar", "ocean", "amber", "comet", "honey", "quartz", "violet", "zebra")
METHODS_OK = ("upper", "lower", "strip", "title", "split", "isdigit", "capitalize", "swapcase")
METHODS_BAD = ("uppercase", "to_upper", "trim", "length", "size", "push", "reverse", "toLowerCase")
LIST_OK = ("copy", "pop", "reverse", "sort", "clear")
LIST_BAD = ("push", "length", "size", "first", "add")


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _ints(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(0, 99) for _ in range(n)]


def _division(rng: random.Random) -> str:
    op = rng.choice(["/", "//", "%"])
    b = 0 if rng.random() < 0.5 else rng.randint(1, 9)
    return f"{rng.randint(1, 99)} {op} {b}" if rng.random() < 0.7 else f"divmod({rng.randint(1, 99)}, {b})"


def _list_index(rng: random.Random) -> str:
    items = _ints(rng, rng.randint(1, 5))
    i = rng.randint(0, len(items) + 2) * (-1 if rng.random() < 0.2 else 1)
    return f"{items}[{i}]"


def _string_index(rng: random.Random) -> str:
    word = _word(rng)
    return f"'{word}'[{rng.randint(0, len(word) + 3)}]"


def _dict_key(rng: random.Random) -> str:
    keys = rng.sample(WORDS, rng.randint(1, 3))
    table = "{" + ", ".join(f"'{k}': {rng.randint(0, 9)}" for k in keys) + "}"
    key = rng.choice(keys) if rng.random() < 0.5 else _word(rng)
    return f"{table}['{key}']"


def _to_number(rng: random.Random) -> str:
    kind = rng.random()
    text = (str(rng.randint(0, 999)) if kind < 0.4 else f"{rng.randint(0, 99)}.{rng.randint(0, 9)}" if kind < 0.6
            else rng.choice([_word(rng), f"{rng.randint(1, 9)}{rng.choice(string.ascii_lowercase)}", "", "1,000"]))
    return f"{rng.choice(['int', 'float'])}('{text}')"


def _mixed_types(rng: random.Random) -> str:
    word, n = _word(rng), rng.randint(1, 9)
    return rng.choice([f"'{word}' + {n}", f"'{word}' * {n}", f"{n} + '{word}'", f"'{word}' + '{n}'",
                       f"len({n})", f"len('{word}')", f"None + {n}", f"sum(['{word}', '{n}'])",
                       f"sorted([{n}, '{word}'])", f"max({n}, {rng.randint(1, 9)})"])


def _method(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return f"'{_word(rng)}'.{rng.choice(METHODS_OK if rng.random() < 0.5 else METHODS_BAD)}()"
    return f"{_ints(rng, rng.randint(1, 3))}.{rng.choice(LIST_OK if rng.random() < 0.5 else LIST_BAD)}()"


def _name(rng: random.Random) -> str:
    known = rng.choice(["len", "abs", "str", "max"])
    unknown = rng.choice(["length", "size", "absolute", "maximum", "strlen", "count"])
    arg = f"'{_word(rng)}'" if known in ("len", "str") else str(rng.randint(-9, 9))
    return f"{known if rng.random() < 0.5 else unknown}({arg})"


def _chr_range(rng: random.Random) -> str:
    return rng.choice([f"chr({rng.randint(-50, 200)})", f"[{', '.join(map(str, _ints(rng, 3)))}]"
                       f".index({rng.randint(0, 99)})"])


TEMPLATES: tuple[Callable[[random.Random], str], ...] = (
    _division, _list_index, _string_index, _dict_key, _to_number, _mixed_types, _method, _name, _chr_range)


def label(expression: str) -> str:
    """The exception's class name, or ``no exception`` (the interpreter decides)."""
    try:
        eval(expression, {"__builtins__": _SAFE_BUILTINS}, {})  # noqa: S307 - our own generated expressions
    except Exception as exc:  # noqa: BLE001 - the label is whatever it raises
        return type(exc).__name__
    return NO_ERROR


def make_split(n: int, seed: int, exclude: set[str] | None = None) -> list[dict[str, str]]:
    """`n` distinct (expression, answer) records, none of whose expressions is in `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[dict[str, str]] = []
    while len(out) < n:
        expression = rng.choice(TEMPLATES)(rng)
        if expression in seen:
            continue
        answer = label(expression)
        if answer == NO_ERROR and rng.random() < 0.5:  # keep "no exception" near 30%, not 47%
            continue
        seen.add(expression)
        out.append({"expression": expression, "answer": answer})
    return out


def messages(expression: str, answer: str | None = None) -> list[dict[str, str]]:
    """The chat layout: the question as the system prompt, the expression as the user turn."""
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": expression}]
    return chat + ([{"role": "assistant", "content": answer}] if answer is not None else [])
