"""Killed merges leave `.NAME.tmp-*` / `.NAME.old-*` beside --out: the next merge cleans them, and a
previous --out caught mid-swap (moved into `.old-*/previous`) is put back, never deleted."""

from __future__ import annotations

import subprocess
import sys

from serve_helpers_path import save_adapter, save_base

from lorakit.export.merge import clean_stale, merge_to_checkpoint


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_merge_folders_are_cleaned_and_a_mid_swap_out_is_restored(tmp_path):
    out = tmp_path / "merged"
    dead = _dead_pid()
    (tmp_path / ".merged.tmp-abc123").mkdir()  # an old-style name (no pid)
    (tmp_path / f".merged.tmp-{dead}-x1").mkdir()
    (tmp_path / f".merged.tmp-{dead}-x1" / "model.safetensors").write_bytes(b"0" * 1000)
    previous = tmp_path / f".merged.old-{dead}-y2" / "previous"
    previous.mkdir(parents=True)
    (previous / "config.json").write_text("{}")
    clean_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert (out / "config.json").read_text() == "{}"


def test_a_running_merges_folders_are_left_alone(tmp_path):
    live = tmp_path / f".merged.tmp-{sys.modules['os'].getppid()}-z"
    live.mkdir()
    clean_stale(tmp_path / "merged")
    assert live.exists()


def test_merge_cleans_stale_folders_before_writing(tmp_path):
    base = save_base(tmp_path / "base")
    adapter = save_adapter(base, tmp_path / "a", seed=1)
    (tmp_path / f".out.tmp-{_dead_pid()}-q").mkdir()
    merge_to_checkpoint(base, [adapter], tmp_path / "out")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
