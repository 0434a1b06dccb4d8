"""Print the PEFT zoo cross-check verdicts and counts (pass / refused / different).

    PYTHONPATH=src python tests/peft_zoo/run_zoo.py [-v] [name-substring ...]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from zoo_cases import CASES, PENDING  # noqa: E402
from zoo_harness import run_case, summarize  # noqa: E402


def main(argv: list[str]) -> int:
    verbose = "-v" in argv
    wanted = [a for a in argv if a != "-v"]
    cases = [c for c in CASES if not wanted or any(w.lower() in c.name.lower() for w in wanted)]
    torch.set_num_threads(1)
    results = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(cases):
            work = Path(tmp) / str(i)
            work.mkdir()
            results[case.name] = result = run_case(case, work)
            line = f"{result.verdict:9s} {case.name}"
            if case.name in PENDING:
                line += f" (pending: {PENDING[case.name]})"
            if verbose or result.verdict != "pass":
                line += f"  | {result.detail[:160]}"
            if verbose and result.notes:
                line += f"  [{'; '.join(result.notes)}]"
            print(line)
    counts = summarize(results)
    pending = sum(1 for name, r in results.items() if r.verdict == "different" and name in PENDING)
    print(f"\n{len(cases)} cases in {time.perf_counter() - start:.1f} s: "
          + ", ".join(f"{k} {v}" for k, v in counts.items())
          + f" (of which pending on the PEFT-exactness branch: {pending})")
    return 1 if counts["different"] > pending else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
