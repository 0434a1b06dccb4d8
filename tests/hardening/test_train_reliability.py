"""Training-side reliability: a checkpoint exists whole or not at all also while it is deleted;
stale temporary folders go away on start; a finished run resumed doesn't log its eval twice;
max_length beyond the model's positions is reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lorakit.train import checkpoint as ckpt
from lorakit.train.config import load_config
from lorakit.train.trainer import train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def config(tmp_path: Path, **train):
    return {
        "model": {"name_or_path": "tiny-llama", "overrides": {"hidden_size": 32, "intermediate_size": 64,
                                                               "num_hidden_layers": 1}},
        "lora": {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]},
        "data": {"train_file": str(EXAMPLES / "instructions.jsonl"),
                 "eval_file": str(EXAMPLES / "instructions.jsonl"), "max_length": 64, "limit": 8},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 4, "threads": 1,
                  "save_every": 1, "keep_last": 1, "log_every": 1, **train},
    }


def _whole(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ckpt.FILES) and (folder / "adapter" / "adapter_config.json").is_file()


def test_a_kill_while_pruning_never_leaves_a_half_deleted_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for step in (1, 2, 3):  # three complete fake checkpoints
        folder = ckpt.checkpoint_root(run) / f"step-{step}"
        (folder / "adapter").mkdir(parents=True)
        (folder / "adapter" / "adapter_config.json").write_text("{}")
        for name in ckpt.FILES:
            (folder / name).write_bytes(b"x" * 1000)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes the weights, then the process "dies"
        for name in ckpt.FILES:
            Path(path, name).unlink(missing_ok=True)
        raise KeyboardInterrupt("kill -9")

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(run, keep_last=1, protect=set())
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    visible = [p for p in ckpt.checkpoint_root(run).iterdir() if not p.name.startswith(".")]
    assert visible and all(_whole(p) for p in visible)  # step-1 is gone whole; the rest are complete
    assert not (ckpt.checkpoint_root(run) / "step-1").exists()
    assert ckpt.remove_partial(run) == 1  # the next run cleans the hidden half-deleted one
    assert sorted(p.name for p in ckpt.checkpoint_root(run).iterdir()) == ["step-2", "step-3"]


def test_resume_of_a_finished_run_does_not_duplicate_the_eval_line(tmp_path):
    train(load_config(raw=config(tmp_path)))
    metrics = tmp_path / "run" / "metrics.jsonl"
    first = metrics.read_text()
    train(load_config(raw=config(tmp_path)), resume=True)
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in lines if "eval_loss" in r] == [4]
    assert metrics.read_text() == first


def test_stale_temporary_checkpoint_folders_are_removed_on_start(tmp_path):
    root = ckpt.checkpoint_root(tmp_path / "run")
    for name in (".tmp-step-9-123", ".old-step-2-5", ".del-step-1-7"):
        (root / name).mkdir(parents=True)
    train(load_config(raw=config(tmp_path, max_steps=1)))
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_max_length_beyond_the_models_positions_is_reported(tmp_path):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    from lorakit.errors import ConfigError
    from lorakit.train.model_setup import check_max_length

    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                max_position_embeddings=64, vocab_size=32))
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        check_max_length(65, bert)  # learned positions: the lookup would fail mid-run
    check_max_length(64, bert)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=32, max_position_embeddings=64))
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        check_max_length(128, llama)  # rotary: runs, but on positions it never saw
