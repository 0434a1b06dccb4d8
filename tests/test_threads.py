"""The default thread count: the user's choice first, then min(cores, affinity, idle CPUs)."""

from __future__ import annotations

import os

import pytest
import torch

from lorakit import threads
from lorakit.cli import main


@pytest.fixture
def machine(monkeypatch):
    """A pretend 8-CPU / 4-core machine with no thread settings in the environment."""
    for env in ("LORAKIT_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(env, raising=False)
    state = {"load": 0.0, "affinity": set(range(8))}
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: state["affinity"], raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (state["load"], 0.0, 0.0))
    monkeypatch.setattr(threads, "physical_cores", lambda: 4)
    return state


def test_quiet_machine_uses_the_physical_cores(machine):
    choice = threads.choose_threads()
    assert choice.threads == 4 and choice.automatic
    assert "4 physical cores, 8 usable CPUs, load average 0.0" == choice.reason


def test_busy_machine_backs_off_to_the_idle_cpus(machine):
    machine["load"] = 6.5  # 1.5 CPUs idle
    assert threads.choose_threads().threads == 1
    machine["load"] = 5.7  # 2.3 idle
    assert threads.choose_threads().threads == 2
    machine["load"] = 20.0  # overloaded: never below one
    assert threads.choose_threads().threads == 1


def test_affinity_caps_the_count(machine):
    machine["affinity"] = {0, 1}  # e.g. taskset / a container's cpuset
    assert threads.choose_threads().threads == 2


def test_the_user_choice_wins(machine, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads() == threads.ThreadChoice(3, "$OMP_NUM_THREADS")
    monkeypatch.setenv("LORAKIT_THREADS", "2")
    assert threads.choose_threads() == threads.ThreadChoice(2, "$LORAKIT_THREADS")
    assert threads.choose_threads(5) == threads.ThreadChoice(5, "--threads")
    monkeypatch.setenv("LORAKIT_THREADS", "two")
    with pytest.raises(ValueError, match=r"\$LORAKIT_THREADS='two' is not a positive integer"):
        threads.choose_threads()
    with pytest.raises(ValueError, match="--threads must be at least 1"):
        threads.choose_threads(0)


def test_physical_cores_is_at_most_the_logical_count():
    assert 1 <= threads.physical_cores() <= (os.cpu_count() or 1)


def test_every_command_applies_and_reports_the_choice(machine, capsys, tmp_path):
    before = torch.get_num_threads()
    try:
        machine["load"] = 6.5
        # plan is the cheapest command; the choice is made and printed the same way for all of them
        assert main(["plan", "--model", "tiny-llama", "--json"]) == 0
        err = capsys.readouterr().err
        assert torch.get_num_threads() == 1
        assert "lorakit: 1 torch thread (4 physical cores, 8 usable CPUs, load average 6.5; change with " \
               "--threads N or $LORAKIT_THREADS)" in err
        assert main(["plan", "--model", "tiny-llama", "--json", "--threads", "2"]) == 0
        assert torch.get_num_threads() == 2 and "torch thread" not in capsys.readouterr().err
        assert main(["plan", "--model", "tiny-llama", "--threads", "0"]) == 2
        assert "--threads must be at least 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_every_command_has_a_threads_option():
    from lorakit.cli import COMMANDS, build_parser

    parser = build_parser("*")
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in COMMANDS:
        assert "--threads" in sub.choices[name]._option_string_actions, name
