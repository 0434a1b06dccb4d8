"""The default torch CPU thread count: fast on a quiet machine, not pathological on a busy one.

torch's own default (one thread per logical CPU) falls apart when other jobs share the CPU: its
OpenMP workers spin-wait for each other, and on a loaded 2-core machine a tiny training run took
14x longer with 2 threads than with 1. So the default here is

    threads = max(1, min(physical cores, CPUs this process may use, CPUs the load average leaves idle))

rounded down. The choice order: an explicit ``--threads N``, then ``$LORAKIT_THREADS``, then
``$OMP_NUM_THREADS`` (the usual knob for OpenMP programs), then that formula.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

THREADS_ENV = "LORAKIT_THREADS"
# every command's --threads help (here, not in cli.py: the commands' own modules add it too)
THREADS_HELP = ("torch CPU threads (default: $LORAKIT_THREADS, else $OMP_NUM_THREADS, else min(physical cores, "
                "CPUs the load average leaves idle), at least 1)")


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and why it was chosen (the CLI prints `reason`)."""

    threads: int
    reason: str
    automatic: bool = False  # chosen by the formula, not by the user (--threads or the environment)


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, so containers and taskset count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def physical_cores() -> int:
    """Physical cores (hyper-threads share one core's arithmetic units, so they rarely help matmuls)."""
    try:
        import psutil

        count = psutil.cpu_count(logical=False)
        if count:
            return count
    except ImportError:
        pass
    try:  # Linux without psutil: distinct (physical id, core id) pairs
        cores, physical = set(), "0"
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "physical id":
                    physical = value
                elif key == "core id":
                    cores.add((physical, value))
        if cores:
            return len(cores)
    except OSError:
        pass
    return max(1, os.cpu_count() or 1)


def idle_cpus() -> float | None:
    """Logical CPUs minus the 1-minute load average (None where there is no load average)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    return (os.cpu_count() or 1) - load


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """The thread count to use: `requested`, else the environment, else a load-aware default."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        return ThreadChoice(requested, "--threads")
    for env in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(env, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"${env}={value!r} is not a positive integer; set it to e.g. 1 or unset it")
            return ThreadChoice(int(value), f"${env}")
    cores, usable, idle = physical_cores(), usable_cpus(), idle_cpus()
    threads = min(cores, usable)
    reason = f"{cores} physical cores, {usable} usable CPUs"
    if idle is not None:
        threads = min(threads, max(1, math.floor(idle + 0.25)))  # 0.25: a little background noise is no contention
        reason += f", load average {os.cpu_count() - idle:.1f}"
    return ThreadChoice(max(1, threads), reason, automatic=True)


def apply_threads(requested: int | None = None) -> ThreadChoice:
    """Choose a thread count (see :func:`choose_threads`) and give it to torch."""
    import torch

    choice = choose_threads(requested)
    torch.set_num_threads(choice.threads)
    return choice
