"""Crash-safe writes: a file or a whole folder appears complete (old or new), never half-written.

One helper for every folder lorakit writes (adapter folders, training checkpoints, merged
checkpoints, 4-bit checkpoints, the converted SmolLM2 cache) and one for single files
(:func:`atomic_write_file` / :func:`atomic_write_bytes`: adapter files, GGUF exports); both fsync
the same way.

:func:`write_folder_atomically` builds the new folder in a temporary sibling
``.NAME.tmp-<pid>-<rand>``, fsyncs every file and folder in it, and only then puts it in place:

* no folder at the target yet: one ``os.replace(tmp, target)``;
* an existing target, where the kernel offers ``renameat2(RENAME_EXCHANGE)`` (Linux): the two
  folders swap names in one step, and the temporary name (now holding the old folder) is deleted;
* otherwise: the old folder is renamed aside into ``.NAME.old-<pid>-<rand>/previous``, the new one
  renamed in, and only then the old one deleted. The old folder is never deleted before the new
  one is in place.

What a ``kill -9`` (or a power cut, thanks to the fsyncs) leaves, by the moment it strikes:

1. while the new folder is being written or fsynced: the target is the old folder; a stale
   ``.NAME.tmp-*`` sibling lies beside it;
2. (two-rename fallback only) after the old folder moved aside, before the new one moved in: no
   target; the old folder whole in ``.NAME.old-*/previous``; the complete new one in ``.NAME.tmp-*``;
3. after the swap, while the old folder is deleted: the target is the new folder; the (partly
   deleted) old one lies in ``.NAME.tmp-*`` (exchange) or ``.NAME.old-*`` (fallback).

:func:`clean_stale` runs before every write to the same target: it deletes the leftovers of 1 and
3, and in case 2 puts the old folder back. So after a crash and the next write attempt the target
is byte for byte the old folder or the new one. Leftovers whose pid is still alive (another
writer at work) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2  # linux/fs.h
_libc = None
# set False to force the two-rename fallback (tests exercise both paths)
USE_RENAME_EXCHANGE = True


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or folder (a folder's fsync makes a rename or a new entry in it durable); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and every folder under `folder` (itself last), so a rename after it is safe.

    Unlike :func:`fsync_path` this raises: a folder that can't be made durable must not be renamed in.
    """
    folder = Path(folder)
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        for name in dirs:
            _fsync_dir(os.path.join(root, name))
    _fsync_dir(folder)


def _fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` creates a temporary sibling file; it is fsynced and renamed to `path`, then the
    folder fsynced: readers see the old file or the new one, never a part. The file gets the usual
    umask permissions (the writer creates it)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def write_folder_atomically(target: str | os.PathLike, fill: Callable[[Path], None], *,
                            keep_existing: bool = False) -> Path:
    """Create or replace the folder `target` with what ``fill(tmp)`` writes into an empty temporary folder.

    keep_existing: entries of an existing `target` that `fill` did not write are carried over into
    the new folder (hard links, copies where links fail), so e.g. re-saving one adapter keeps the
    other adapters' subfolders. Without it the new folder replaces the old one entirely.

    If `fill` (or anything before the swap) raises, the temporary folder is removed and `target` is
    untouched. See the module docstring for what a kill at any moment leaves behind.
    """
    target = Path(target)
    if target.is_symlink():  # write where the link points, as writing into it file by file would
        target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-"))
    try:
        # mkdtemp's folder is private (0700): give it the old folder's mode, or what mkdir would have given
        tmp.chmod(stat.S_IMODE(target.stat().st_mode) if target.is_dir() else 0o777 & ~_umask())
        fill(tmp)
        if keep_existing and target.is_dir():
            _carry_over(target, tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, target)
    return target


def _umask() -> int:
    try:
        with open("/proc/self/status") as fh:  # Linux: read without changing it (no race with other threads)
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _swap_in(tmp: Path, target: Path) -> None:
    if not target.exists() and not target.is_symlink():
        try:
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_path(target.parent)
        return
    try:
        swapped = USE_RENAME_EXCHANGE and target.is_dir() and _exchange(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if swapped:
        fsync_path(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder, under the temporary name
        return
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-{os.getpid()}-"))
    try:
        os.replace(target, old / "previous")
        fsync_path(target.parent)
        os.replace(tmp, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if (old / "previous").exists() and not target.exists():
            os.replace(old / "previous", target)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the kernel or fs can't."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = _libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _carry_over(old: Path, new: Path) -> None:
    """Link every entry of `old` that `new` lacks into `new` (folders merged recursively)."""
    for entry in os.scandir(old):
        dest = new / entry.name
        if entry.is_dir(follow_symlinks=False):
            if not dest.exists():
                dest.mkdir()
            if dest.is_dir() and not dest.is_symlink():
                _carry_over(Path(entry.path), dest)
            continue
        if dest.exists() or dest.is_symlink():
            continue  # `fill` wrote a new version of it
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dest)
            continue
        try:
            os.link(entry.path, dest)
        except OSError:
            shutil.copy2(entry.path, dest)


def clean_stale(target: str | os.PathLike) -> None:
    """Remove what killed writes into `target` left beside it (``.NAME.tmp-*`` / ``.NAME.old-*``).

    A kill between moving the old folder aside and renaming the new one in leaves the old folder in
    ``.NAME.old-*/previous`` and no `target`: that one is put back, not deleted. Leftovers of a
    writer still running (its pid in the name is alive) are left alone.
    """
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    name = re.escape(target.name)
    pattern = re.compile(rf"\.{name}\.(tmp|old)-.*")
    stale = sorted((p for p in parent.iterdir() if pattern.fullmatch(p.name)),
                   key=lambda p: (".old-" not in p.name, p.name))  # restore before deleting
    for path in stale:
        if not path.is_dir() or owner_alive(path.name):
            continue
        previous = path / "previous"
        if ".old-" in path.name and previous.is_dir() and not target.exists():
            os.replace(previous, target)
            fsync_path(parent)
            logger.warning("restored %s from an interrupted replace", target)
        shutil.rmtree(path, ignore_errors=True)


def owner_alive(name: str) -> bool:
    """Whether the pid in a ``.NAME.tmp-<pid>-*`` / ``.old-<pid>-*`` name is another live process."""
    match = re.search(r"\.(?:tmp|old)-(\d+)-", name)
    if match is None or int(match.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True
