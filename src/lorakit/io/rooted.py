"""Read files only from inside a root folder, race-free against symlink swaps.

The server's ``--adapter-root`` promise is "loads only from under the root". Checking a path once
and opening it later is not enough: a folder can be swapped for a symlink between the check and
the read (or after registration, before a reload). So every read here

1. resolves the root again and refuses if it moved;
2. resolves the wanted file (following symlinks) and refuses if it is outside the root;
3. opens that resolved path from the root's descriptor one component at a time with
   ``O_NOFOLLOW``: if any component was turned into a symlink since step 2 the open fails and the
   read is refused. What is opened is therefore inside the root at the moment it is opened.

Symlinks that stay inside the root keep working.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from lorakit.errors import AdapterLoadError


class OutsideRootError(AdapterLoadError):
    """A path resolves (or was swapped to point) outside the allowed root folder."""


_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)


def resolve_under(root: Path, path: Path) -> Path:
    """`path` with symlinks resolved; raises OutsideRootError unless it is inside `root` (resolved)."""
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if real != real_root and not real.is_relative_to(real_root):
        raise OutsideRootError(f"{path} resolves to {real}, outside the adapter root {real_root}")
    return real


def read_bytes_under(root: Path, path: Path, expected_root: Path | None = None) -> bytes:
    """The bytes of file `path`, read only if it lies inside `root` (see the module docstring)."""
    real_root = Path(os.path.realpath(root))
    if expected_root is not None and real_root != Path(expected_root):
        raise OutsideRootError(f"the adapter root {root} now resolves to {real_root}, not {expected_root}; "
                               "refusing to read through a moved root")
    real = resolve_under(real_root, path)
    parts = real.relative_to(real_root).parts
    fd = os.open(real_root, _DIR_FLAGS)
    try:
        for i, part in enumerate(parts):
            child = _open_at(fd, part, _FILE_FLAGS if i == len(parts) - 1 else _DIR_FLAGS, path)
            os.close(fd)
            fd = child
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read()
    finally:
        os.close(fd)


def _open_at(fd: int, name: str, flags: int, path: Path) -> int:
    try:
        return os.open(name, flags, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise OutsideRootError(f"{path} changed into a symlink while it was being read; refused") from None
        raise
