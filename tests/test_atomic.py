"""lorakit.io.atomic: a writer killed (SIGKILL) at any moment leaves the old folder or the new one, byte for byte.

A subprocess writes versions v, v+1, v+2 of a folder with :func:`write_folder_atomically`; the test
kills it either at a seeded-random call of one of the operations that matter (each file write,
fsync, rename, exchange, delete: a kill before or after each one) or after a seeded-random delay.
Then it does what the next writer does first (:func:`clean_stale`) and reads the folder back: it
must be exactly the last version the writer reported done, or the one after it (in flight when
killed), and nothing else may be left beside it.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorakit.io import atomic

ATOMIC = Path(atomic.__file__)

WRITER = r"""
import importlib.util, os, shutil, signal, sys
spec = importlib.util.spec_from_file_location("atomic_under_test", sys.argv[1])
atomic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(atomic)  # stdlib only: starts in milliseconds, unlike `import lorakit` (torch)
target, first, exchange, keep, kill_at = sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1", int(sys.argv[6])
atomic.USE_RENAME_EXCHANGE = exchange
calls = [0]

def tick():
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

def hooked(fn):
    def call(*args, **kwargs):
        tick()
        out = fn(*args, **kwargs)
        tick()
        return out
    return call

os.replace = hooked(os.replace)
os.fsync = hooked(os.fsync)
atomic._exchange = hooked(atomic._exchange)
atomic.shutil.rmtree = hooked(shutil.rmtree)
exec(sys.argv[7])  # defines content(v) -> {relative path: bytes}

def fill(version):
    def write(tmp):
        for rel, data in content(version, initial=False).items():
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as fh:
                half = len(data) // 2
                fh.write(data[:half]); tick(); fh.write(data[half:])
            tick()
    return write

for version in range(first, first + 3):
    atomic.write_folder_atomically(target, fill(version), keep_existing=keep)
    print(version, flush=True)
"""

CONTENT = r"""
import random as _random

def content(v, initial=False):
    rng = _random.Random(v)
    files = {
        "model.safetensors": rng.randbytes(rng.randint(1, 300_000)),
        "config.json": ('{"version": %d}' % v).encode(),
        "sub/deep/tokenizer.json": rng.randbytes(rng.randint(0, 5_000)),
    }
    if v % 3 == 1:
        files["only-some-versions.txt"] = b"x" * v
    if initial:  # written by version 0 only: kept by keep_existing writers, dropped by the others
        files["other/adapter_config.json"] = b"another adapter"
    return files
"""
namespace: dict = {}
exec(CONTENT, namespace)
content = namespace["content"]


def _expected(version: int, keep: bool) -> dict[str, bytes]:
    files = content(version, initial=version == 0)
    if keep and version > 0:
        files.update({k: v for k, v in _expected(version - 1, keep).items() if k not in files})
    return files


def _read_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _load_atomic():
    spec = importlib.util.spec_from_file_location("atomic_fresh", ATOMIC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("keep", [False, True], ids=["replace", "keep_existing"])
@pytest.mark.parametrize("exchange", [True, False], ids=["rename_exchange", "rename_aside"])
def test_a_killed_writer_leaves_the_old_or_the_new_folder_byte_for_byte(tmp_path, exchange, keep):
    rng = random.Random(1700 + 2 * exchange + keep)
    target = tmp_path / "folder"
    helper = _load_atomic()

    def fill0(tmp: Path) -> None:
        for rel, data in content(0, initial=True).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)

    helper.write_folder_atomically(target, fill0)
    current, seen_states, iterations = 0, set(), 48
    for i in range(iterations):
        # even iterations: a kill at a random hooked call (~90 calls per version); odd: after a random delay
        kill_at = rng.randint(1, 120) if i % 2 == 0 else 0
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(ATOMIC), str(target), str(current + 1),
                                 "1" if exchange else "0", "1" if keep else "0", str(kill_at), CONTENT],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if kill_at == 0:
            time.sleep(rng.uniform(0.0, 0.12))
            proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode in (0, -signal.SIGKILL), err
        done = [int(line) for line in out.split()]
        last_done = done[-1] if done else current
        helper.clean_stale(target)  # what the next writer does first
        leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "folder")
        assert leftovers == [], leftovers
        found = _read_tree(target)
        candidates = [last_done] if proc.returncode == 0 else [last_done, last_done + 1]
        matches = [v for v in candidates if found == _expected(v, keep)]
        assert matches, f"iteration {i}: the folder is neither version {candidates} (kill_at={kill_at})"
        seen_states.add("new" if matches[0] > last_done else "old")
        current = matches[0]
    assert current > 0  # the writers did get work done between the kills
    assert seen_states == {"old", "new"}  # kills landed both before and after a swap


def test_clean_stale_puts_back_an_old_folder_caught_mid_swap_and_spares_live_writers(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    previous = tmp_path / f".out.old-{dead.pid}-x" / "previous"
    previous.mkdir(parents=True)
    (previous / "config.json").write_text("old")
    (tmp_path / f".out.tmp-{dead.pid}-y").mkdir()  # the complete new folder that never got renamed in
    live = tmp_path / f".out.tmp-{os.getppid()}-z"
    live.mkdir()
    atomic.clean_stale(target)
    assert (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name])


def test_a_failing_fill_leaves_the_old_folder_and_no_temporary(tmp_path):
    target = tmp_path / "out"
    atomic.write_folder_atomically(target, lambda tmp: (tmp / "a").write_text("old"))

    def broken(tmp: Path) -> None:
        (tmp / "a").write_text("new")
        raise OSError("disk full (injected)")

    with pytest.raises(OSError, match="injected"):
        atomic.write_folder_atomically(target, broken)
    assert _read_tree(target) == {"a": b"old"} and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_keep_existing_writes_new_files_without_touching_the_old_inodes(tmp_path):
    target = tmp_path / "adapter"
    atomic.write_folder_atomically(target, lambda tmp: ((tmp / "w").write_text("1"), (tmp / "readme").write_text("r")))
    old_w = os.stat(target / "w").st_ino
    atomic.write_folder_atomically(target, lambda tmp: (tmp / "w").write_text("2"), keep_existing=True)
    assert _read_tree(target) == {"w": b"2", "readme": b"r"}
    assert os.stat(target / "w").st_ino != old_w  # a new file, not the old one rewritten in place


def test_the_new_folder_gets_mkdirs_mode_or_the_old_folders_not_mkdtemps_0700(tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    target = tmp_path / "fresh"
    atomic.write_folder_atomically(target, lambda tmp: (tmp / "a").write_text("1"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask
    target.chmod(0o750)
    atomic.write_folder_atomically(target, lambda tmp: (tmp / "a").write_text("2"))
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


def test_atomic_write_file_replaces_a_file_whole(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"old")
    with pytest.raises(OSError, match="injected"):
        atomic.atomic_write_file(path, lambda tmp: (tmp.write_bytes(b"half"), (_ for _ in ()).throw(OSError("injected"))))
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
    atomic.atomic_write_file(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
