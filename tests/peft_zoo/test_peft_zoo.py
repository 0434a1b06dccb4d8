"""PEFT's custom-model zoo, both directions: every case passes or is refused clearly, none differs.

See zoo_harness.py for what each verdict checks. `python tests/peft_zoo/run_zoo.py` prints the
counts recorded in BENCHMARKS.md.
"""

from __future__ import annotations

import pytest
from zoo_cases import BY_NAME, CASES, PENDING
from zoo_harness import DIFFERENT, PASS, REFUSED, run_case


def _param(case):
    marks = []
    if case.name in PENDING:
        marks.append(pytest.mark.xfail(reason=f"needs the PEFT-exactness branch: {PENDING[case.name]}",
                                       strict=False))
    return pytest.param(case, id=case.name.replace(" ", "_"), marks=marks)


# the layer kinds this harness came with must pass outright (a refusal would hide a regression)
MUST_PASS = {"MHA 1 LoRA", "MHA 2 LoRA", "MHA batched LoRA", "MHA batched two adapters",
             "MHA LoRA gaussian init rsLoRA", "Conv2d Groups LoRA", "Conv2d Groups2 LoRA", "Conv1d Groups LoRA",
             "Conv2d Groups LoRA r16 rsLoRA", "Conv2d 1 AdaLoRA", "Conv2d 2 AdaLoRA", "Vanilla MLP 1 LoRA",
             "Conv2d 2 LoRA", "Embedding + transformers Conv1D 3 LoRA", "GRU modules_to_save"}
assert MUST_PASS <= set(BY_NAME)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_zoo_case_passes_or_is_refused(case, tmp_path):
    result = run_case(case, tmp_path)
    assert result.verdict != DIFFERENT, f"{case.name}: {result.detail}"
    assert result.verdict in ((PASS,) if case.name in MUST_PASS else (PASS, REFUSED)), result.detail
