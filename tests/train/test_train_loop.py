"""The loop on the tiny random Llama (in-process, 1 thread): files, equivalences, resume, failures."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import checkpoint as ckpt
from lorakit.train.config import load_config
from lorakit.train.optim import Schedule, param_groups
from lorakit.train.trainer import Trainer, TrainingDivergedError, train

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"


def config(tmp_path: Path, name: str = "run", **train_overrides):
    raw = {
        "model": {"name_or_path": "tiny-llama", "overrides": {"hidden_size": 32, "intermediate_size": 64}},
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "data": {"train_file": str(EXAMPLES / "instructions.jsonl"), "eval_file": str(EXAMPLES / "instructions.jsonl"),
                 "max_length": 96},
        "train": {"output_dir": str(tmp_path / name), "max_steps": 6, "batch_size": 4, "lr": 5e-3,
                  "threads": 1, "log_every": 2, "save_every": 2, "eval_every": 3, "keep_last": 2,
                  **train_overrides},
    }
    return raw


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_run_writes_everything(tmp_path):
    result = train(load_config(raw=config(tmp_path)))
    run = tmp_path / "run"
    assert result.steps == 6 and result.adapter_dir == run / "adapter"
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "base", "checkpoints", "config.yaml", "loss.png",
                                                     "metrics.jsonl", "summary.json"]
    # keep_last=2 plus the best (lowest eval loss: the last eval here, at step 6)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [4, 6]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in lines if "eval_loss" in r] == [3, 6]
    assert set(lines[0]) == {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}
    assert math.isclose(lines[-1]["eval_ppl"], math.exp(lines[-1]["eval_loss"]), rel_tol=1e-9)
    assert result.metrics == {k: v for k, v in lines[-1].items() if k != "step"}
    meta = json.loads((run / "adapter" / "training_meta.json").read_text())
    assert meta["format"] == "instruction" and meta["base"] == str((run / "base").resolve())
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "lora_A" in next(iter(adapter_tensors(run)))


def test_grad_accumulation_equals_bigger_batch(tmp_path):
    a = train(load_config(raw=_no_grouping(config(tmp_path, "a", batch_size=4, max_steps=3))))
    b = train(load_config(raw=_no_grouping(config(tmp_path, "b", batch_size=2, grad_accum=2, max_steps=3))))
    ta, tb = adapter_tensors(a.run_dir), adapter_tensors(b.run_dir)
    assert ta.keys() == tb.keys()
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-4, atol=1e-6)


def _no_grouping(raw):
    raw["data"]["group_by_length"] = False
    return raw


VARIANTS = {
    "lora": {},
    "adalora": {"peft_type": "ADALORA", "init_r": 6, "target_r": 2, "total_step": 6, "tinit": 1, "tfinal": 1},
    "dylora": {"use_dylora": True},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_resume_after_losing_the_tail_is_bit_identical(tmp_path, variant):
    def variant_config(name):
        raw = config(tmp_path, name)
        raw["lora"].update(VARIANTS[variant])
        return raw

    full = train(load_config(raw=variant_config("full")))
    raw = variant_config("cut")
    train(load_config(raw=raw))
    run = tmp_path / "cut"
    # as if the process died right after writing step 4: drop what came later
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / "step-6")
    (run / "checkpoints" / ".tmp-step-6-999").mkdir()  # a half-written checkpoint
    with pytest.raises(ckpt.RunDirError, match="pass --resume"):
        train(load_config(raw=raw))
    resumed = train(load_config(raw=raw), resume=True)
    assert resumed.steps == 6
    assert not (run / "checkpoints" / ".tmp-step-6-999").exists()
    ta, tb = adapter_tensors(full.run_dir), adapter_tensors(run)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # lines after step 4 were dropped, not duplicated
    if variant == "adalora":  # the budget hook ran: 2 of 6 ranks kept per layer on average
        pattern = json.loads((run / "adapter" / "adapter_config.json").read_text())["rank_pattern"]
        assert sum(sum(kept) for kept in pattern.values()) == 2 * len(pattern)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import lorakit.train.trainer as trainer_module

    calls = {"n": 0}
    real = trainer_module.summed_loss

    def poisoned(logits, labels, num_labels):
        calls["n"] += 1
        loss = real(logits, labels, num_labels)
        return loss * float("nan") if calls["n"] > 2 else loss  # one micro-batch per step: step 3 fails

    monkeypatch.setattr(trainer_module, "summed_loss", poisoned)
    with pytest.raises(TrainingDivergedError) as info:
        train(load_config(raw=config(tmp_path, batch_size=4)))
    run = tmp_path / "run"
    assert "the loss became nan at step 3" in str(info.value)
    assert f"The last good checkpoint is {run / 'checkpoints' / 'step-2'}" in str(info.value)
    assert [s for s, _ in ckpt.list_checkpoints(run)] == [2]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "diverged"


def test_unwritable_output_dir_and_full_disk_fail_before_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    raw = config(tmp_path)
    raw["train"]["output_dir"] = str(tmp_path / "file" / "run")
    with pytest.raises(ckpt.RunDirError, match="is not writable"):
        train(load_config(raw=raw))

    class Usage:
        free = 5 << 20

    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda path: Usage())
    with pytest.raises(ckpt.RunDirError, match=r"only 5 MiB free at .* need about 16 MiB"):
        train(load_config(raw=config(tmp_path)))


def test_loraplus_groups_and_schedule(tmp_path):
    trainer = Trainer(load_config(raw=config(tmp_path)))
    from lorakit.train.model_setup import build_model

    model = build_model(trainer.cfg, None, None, torch.device("cpu"))
    groups = param_groups(model, lr=1e-3, weight_decay=0.1, loraplus_ratio=16)
    b_names = [n for g in groups if g["lr"] == 1e-3 * 16 for n in g["names"]]
    a_names = [n for g in groups if g["lr"] == 1e-3 for n in g["names"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(a_names + b_names) == sorted(trainable)
    assert b_names and all(n.endswith(".lora_b") for n in b_names)
    assert not any(n.endswith(".lora_b") for n in a_names)
    s = Schedule(total_steps=10, warmup_steps=2, kind="cosine", min_ratio=0.1)
    assert [round(s.factor(t), 4) for t in (0, 1, 2, 10)] == [0.3333, 0.6667, 1.0, 0.1]
    assert Schedule(10, 0, "linear").factor(5) == 0.5 and Schedule(10, 0, "constant").factor(9) == 1.0


def test_gradient_checkpointing_and_bf16_run(tmp_path):
    plain = train(load_config(raw=_no_grouping(config(tmp_path, "plain", max_steps=2, save_every=0, eval_every=0))))
    ckpted = train(load_config(raw=_no_grouping(config(tmp_path, "ckpt", max_steps=2, save_every=0, eval_every=0,
                                                       gradient_checkpointing=True))))
    ta, tb = adapter_tensors(plain.run_dir), adapter_tensors(ckpted.run_dir)
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=1e-5, atol=1e-7)
    bf16 = train(load_config(raw=config(tmp_path, "bf16", max_steps=2, dtype="bfloat16")))
    assert math.isfinite(bf16.metrics["eval_loss"])


def test_packing_run(tmp_path):
    raw = config(tmp_path, max_steps=2, save_every=0)
    raw["data"].update(packing=True, max_length=64)
    result = train(load_config(raw=raw))
    assert result.data_stats["train_examples"] < result.data_stats["train_records"]


def test_chat_example_config_runs(tmp_path):
    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "tiny_llama_chat.yaml",
                      [f"train.output_dir={tmp_path / 'chat'}", "train.max_steps=2", "train.threads=1",
                       f"data.train_file={EXAMPLES / 'chat.jsonl'}"])
    result = train(cfg)
    assert result.steps == 2 and result.data_stats["train_records"] == 3


def test_qlora_nf4_base(tmp_path):
    from lorakit.train.model_setup import load_trained

    raw = config(tmp_path, "q", max_steps=3, save_every=0, eval_every=0)
    raw["quant"] = {"method": "nf4", "double_quant": True}
    trainer = Trainer(load_config(raw=raw))
    result = trainer.run()
    kinds = {type(m.base).__name__ for m in trainer.model.lora_layers()}
    assert kinds == {"Linear4bit"}
    assert result.trainable_params == sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    model, _, meta = load_trained(result.adapter_dir)
    assert meta["quant"]["method"] == "nf4"
    assert {type(m.base).__name__ for m in model.lora_layers()} == {"Linear4bit"}
    ids = torch.tensor([[1, 70, 71, 72]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits)


def test_adalora_takes_total_step_from_the_run_length(tmp_path):
    raw = config(tmp_path, max_steps=None, epochs=2, save_every=0, eval_every=0)
    raw["lora"].update({"peft_type": "ADALORA", "init_r": 4, "target_r": 2})  # no total_step
    result = train(load_config(raw=raw))
    assert result.steps == 4  # 8 records, batch 4, 2 epochs
    import yaml

    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["lora"]["total_step"] == 4
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["total_step"] == 4
    assert sum(sum(kept) for kept in saved["rank_pattern"].values()) == 2 * len(saved["rank_pattern"])  # pruned
