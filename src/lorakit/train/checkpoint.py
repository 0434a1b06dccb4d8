"""Crash-safe checkpoints: ``checkpoints/step-N/`` appears complete or not at all.

A checkpoint is written into ``checkpoints/.step-N.tmp-<pid>-*/`` (every file and folder fsynced),
then renamed to ``step-N`` (:func:`lorakit.io.write_folder_atomically`, which also documents what
a kill at each moment leaves). A ``kill -9`` at any moment leaves at most hidden ``.step-N.tmp-*`` /
``.step-N.old-*`` folders, which the next run deletes (an old ``step-N`` caught mid-swap is put
back); every ``step-N`` folder is whole. Deleting goes the same way
in reverse: an old checkpoint is first renamed to ``.del-step-N-<pid>`` (one atomic rename, fsynced)
and only then removed, so a kill while pruning leaves a hidden folder the next run deletes, never
a half-deleted ``step-N``. Contents:

* ``adapter/``: the PEFT-format adapter (usable on its own);
* ``trainable.safetensors``: every trainable tensor by parameter name, for an exact resume;
* ``state.pt``: optimizer, schedule, RNG states (per process), data position, best metric.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import LorakitError
from lorakit.io import clean_stale, fsync_path, write_folder_atomically

_STEP = re.compile(r"step-(\d+)")
_STALE = re.compile(r"\.step-(\d+)\.(?:tmp|old)-.*")  # write_folder_atomically's leftovers
FILES = ("trainable.safetensors", "state.pt")


class RunDirError(LorakitError, OSError):
    """The run folder can't be written, or has too little free space."""


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP.fullmatch(child.name)
        if match and all((child / f).is_file() for f in FILES):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_partial(run_dir: Path) -> int:
    """Delete checkpoint folders a killed run left half-written; returns how many."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return 0
    stale = [(c, m.group(1)) for c in root.iterdir() if (m := _STALE.fullmatch(c.name))]
    for step in sorted({s for _, s in stale}):  # an old step-N caught mid-swap is put back, the rest deleted
        clean_stale(root / f"step-{step}")
    partial = [c for c in root.iterdir() if c.name.startswith((".tmp-", ".old-", ".del-"))]
    for child in partial:
        shutil.rmtree(child, ignore_errors=True)
    return len(partial) + sum(not c.exists() for c, _ in stale)


def save_checkpoint(run_dir: Path, step: int, model: Any, trainable: dict[str, torch.Tensor],
                    state: dict[str, Any], summary: dict[str, Any]) -> Path:
    """Write ``checkpoints/step-N/`` whole or not at all (:func:`lorakit.io.write_folder_atomically`)."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp / "adapter")
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / FILES[0]))
        torch.save(state, tmp / FILES[1])
        (tmp / "trainer_state.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")

    # re-saving a step (a resumed run) swaps the old folder out only once the new one is complete
    return write_folder_atomically(root / f"step-{step}", fill)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = load_file(str(folder / FILES[0]))
    state = torch.load(folder / FILES[1], map_location="cpu", weights_only=True)
    return tensors, state


def prune_checkpoints(run_dir: Path, keep_last: int, protect: set[int]) -> list[int]:
    """Delete all but the newest `keep_last` checkpoints, never those in `protect` (the best)."""
    found = list_checkpoints(run_dir)
    doomed = [(s, p) for s, p in found[: max(len(found) - keep_last, 0)] if s not in protect]
    for step, path in doomed:
        remove_checkpoint(path, step)
    return [s for s, _ in doomed]


def remove_checkpoint(path: Path, step: int) -> None:
    """Rename away first (atomic: the checkpoint is gone whole), then delete the hidden folder."""
    trash = path.parent / f".del-step-{step}-{os.getpid()}"
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    fsync_path(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def check_run_dir(run_dir: Path, need_bytes: int) -> None:
    """Fail now, not hours in: the folder must be creatable, writable, with `need_bytes` free."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(
            f"train.output_dir {str(run_dir)!r} is not writable ({exc.strerror or exc}); "
            "choose a folder you can write to"
        ) from None
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise RunDirError(
            f"only {free / 2**20:.0f} MiB free at {run_dir}, but checkpoints and the final adapter need about "
            f"{need_bytes / 2**20:.0f} MiB; free some space, lower train.keep_last, or pick another output_dir"
        )


def checkpoint_bytes(trainable_numel: int, bytes_per_param: int = 4) -> int:
    """Rough size of one checkpoint: weights twice (adapter + exact copy) and AdamW's two moments."""
    return trainable_numel * bytes_per_param * 4 + (1 << 20)


# what a run writes at its top level before its first checkpoint (nothing else is ever removed)
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.jsonl.tmp", "loss.png", "summary.json")
RUN_FOLDERS = ("base",)  # tiny-llama's random base, saved for generate


def missing_dirs(run_dir: Path) -> list[Path]:
    """The folders from `run_dir` upwards that don't exist yet (deepest first): what a run will create."""
    out = []
    for folder in [Path(run_dir).absolute(), *Path(run_dir).absolute().parents]:
        if folder.exists():
            break
        out.append(folder)
    return out


def remove_unused_run_dir(run_dir: Path, created: list[Path]) -> bool:
    """After a failed run: take away the folders it created if it left nothing worth keeping.

    Only when this run created `run_dir` and it holds no checkpoint and no adapter; then the files the
    run itself writes are deleted and the folders are removed only if that leaves them empty, so
    anything else found there (put by someone else meanwhile) stays. Returns whether it was removed.
    """
    run_dir = Path(run_dir).absolute()
    if not created or created[0] != run_dir or not run_dir.is_dir():
        return False
    if list_checkpoints(run_dir) or (run_dir / "adapter").exists():
        return False
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for probe in run_dir.glob(".write-probe-*"):
        probe.unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name, ignore_errors=True)
    root = checkpoint_root(run_dir)
    if root.is_dir():
        remove_partial(run_dir)  # only .tmp-/.old- folders can be there: no complete checkpoint exists
        _rmdir(root)
    removed = False
    for folder in created:  # deepest first; stop at the first one that isn't empty
        if not _rmdir(folder):
            break
        removed = True
    return removed


def _rmdir(folder: Path) -> bool:
    try:
        folder.rmdir()
        return True
    except OSError:
        return False
