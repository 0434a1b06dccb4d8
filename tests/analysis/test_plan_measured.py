"""The planner against the measured peak memory of real short training runs (slow: ~30 s each)."""

from __future__ import annotations

import os

import pytest
from plan_models import llama_256_folder

from lorakit.analysis.measure import measure_training_peak
from lorakit.analysis.plan import PlanRequest, plan_memory

CONFIGS = {  # model "llama-256": the config folder of plan_models.LLAMA_256
    "llama-256-all-linear": dict(model="llama-256", r=16, batch=4, seq=128),
    "minilm-qv": dict(model="minilm", r=8, target=["query", "value"], batch=16, seq=128),
    "llama-256-checkpointing": dict(model="llama-256", r=16, batch=4, seq=128, grad_checkpointing=True),
}


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures RSS through Linux /proc")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plan_within_15_percent_of_measured_peak(name, tmp_path):
    fields = dict(CONFIGS[name])
    if fields["model"] == "llama-256":
        fields["model"] = llama_256_folder(tmp_path)
    request = PlanRequest(**fields)
    planned = plan_memory(request).total_bytes
    # one thread (and one malloc arena, see measure.py): the peak must not depend on the load
    measured = measure_training_peak(request, steps=2, threads=1).peak_bytes
    assert abs(planned - measured) / measured < 0.15, f"{name}: planned {planned / 2**20:.0f} MiB, " \
                                                      f"measured {measured / 2**20:.0f} MiB"
