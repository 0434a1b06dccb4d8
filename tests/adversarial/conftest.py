"""The adversarial suite's tally: every hostile input is counted as tried, and as refused clearly,
served, or bad (a traceback, a 5xx for invalid input, an engine death, a model changed by a failed
load, a read outside the adapter root, a partial folder after a kill). The tests assert bad == 0;
the totals print at the end of the run (and go to $LORAKIT_RELIABILITY_JSON when set), which is
where BENCHMARKS.md's RELIABILITY table comes from."""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

_TALLY: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
_BAD: list[str] = []


class Tally:
    """tally.record(area, outcome, detail): outcome is "refused", "served" or a bad kind."""

    BAD_KINDS = ("traceback", "http_5xx", "engine_death", "model_changed", "read_outside_root", "partial_folder",
                 "unclear")

    def record(self, area: str, outcome: str, detail: str = "") -> None:
        _TALLY[area]["tried"] += 1
        _TALLY[area][outcome] += 1
        if outcome in self.BAD_KINDS:
            _BAD.append(f"{area}: {outcome}: {detail}")

    def bad(self, area: str) -> list[str]:
        return [b for b in _BAD if b.startswith(area)]


@pytest.fixture(scope="session")
def tally() -> Tally:
    return Tally()


def pytest_terminal_summary(terminalreporter) -> None:
    if not _TALLY:
        return
    kinds = ("tried", "refused", "served", *Tally.BAD_KINDS)
    short = {"read_outside_root": "outside_root", "partial_folder": "partial", "engine_death": "engine_dead",
             "model_changed": "model_chg"}
    terminalreporter.write_sep("-", "adversarial tally")
    terminalreporter.write_line(f"{'area':<34}" + "".join(f"{short.get(k, k):>13}" for k in kinds))
    totals: dict[str, int] = defaultdict(int)
    for area in sorted(_TALLY):
        row = _TALLY[area]
        terminalreporter.write_line(f"{area[:34]:<34}" + "".join(f"{row.get(k, 0):>13}" for k in kinds))
        for k in kinds:
            totals[k] += row.get(k, 0)
    terminalreporter.write_line(f"{'TOTAL':<34}" + "".join(f"{totals[k]:>13}" for k in kinds))
    for line in _BAD[:20]:
        terminalreporter.write_line("BAD " + line)
    out = os.environ.get("LORAKIT_RELIABILITY_JSON")
    if out:
        Path(out).write_text(json.dumps({"areas": {a: dict(r) for a, r in _TALLY.items()}, "totals": dict(totals),
                                         "bad": _BAD}, indent=2) + "\n")
