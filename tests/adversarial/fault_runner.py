"""Run `lorakit ARGS...` and SIGKILL this very process at an exact point: the Nth call of
``shutil.rmtree`` (after it deleted part of the folder) or of ``os.replace`` (just before it), as
seen by lorakit's checkpoint, merge and atomic-write code. A real kill -9 at the worst moments.

    python fault_runner.py rmtree 2 train cfg.yaml
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path


def main() -> None:
    point, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    calls = {"rmtree": 0, "replace": 0}
    real_rmtree, real_replace = shutil.rmtree, os.replace

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def rmtree(path, *args, **kwargs):
        calls["rmtree"] += Path(path).is_dir()  # only calls that delete something count
        if point == "rmtree" and calls["rmtree"] == nth and Path(path).is_dir():
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            for f in files[: max(1, len(files) // 2)]:  # half deleted, then the kill
                f.unlink()
            die()
        return real_rmtree(path, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        calls["replace"] += 1
        if point == "replace" and calls["replace"] == nth:
            die()
        return real_replace(src, dst, *args, **kwargs)

    import lorakit.export.merge as export
    import lorakit.io.atomic as atomic
    import lorakit.train.checkpoint as checkpoint

    # the two-rename swap (old folder aside, new one in): its window between the renames is the one to hit
    atomic.USE_RENAME_EXCHANGE = False
    for module in (export, checkpoint, atomic):
        module.shutil = type(sys)("shutil_faulty")
        module.shutil.__dict__.update(shutil.__dict__)
        module.shutil.rmtree = rmtree
        module.os = type(sys)("os_faulty")
        module.os.__dict__.update(os.__dict__)
        module.os.replace = replace
    from lorakit.cli import main as cli_main

    sys.exit(cli_main(argv))


if __name__ == "__main__":
    main()
