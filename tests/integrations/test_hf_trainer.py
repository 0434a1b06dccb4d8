"""transformers.Trainer with a lorakit model (lorakit.integrations.transformers), the real Trainer on
a tiny random Llama on CPU: PEFT-format checkpoints, read by PEFT and lorakit; resume equal to an
uninterrupted run; load_best_model_at_end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from factories import tiny_llama
from safetensors.torch import load_file
from tolerance import assert_close_fp32
from transformers import Trainer, TrainingArguments

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterLoadError, ConfigError
from lorakit.integrations.transformers import LoraTrainer, load_checkpoint_adapters, with_lora_checkpoints

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])


class TokenRows(torch.utils.data.Dataset):
    """Fixed-length random token rows, labels = inputs (causal LM)."""

    def __init__(self, n: int = 32, length: int = 16, seed: int = 0):
        self.rows = torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def lora_model(init_seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(init_seed)  # the adapter's A init
    return lorakit.get_lora_model(tiny_llama(seed=0), LoraConfig(lora_dropout=dropout, **LORA))


def args(out: Path, **overrides) -> TrainingArguments:
    kw = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
              save_strategy="steps", save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
              disable_tqdm=True, dataloader_num_workers=0)
    kw.update(overrides)
    return TrainingArguments(**kw)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lorakit.core.state_dict.get_adapter_state_dict(model.model, "default").items()}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_checkpoints_and_final_save_are_peft_folders(tmp_path):
    model = lora_model()
    trainer = LoraTrainer(model=model, args=args(tmp_path / "run", activation_checkpointing=True),
                          train_dataset=TokenRows())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    trained = adapter_tensors(model)
    assert any(float(v.abs().max()) > 0 for k, v in trained.items() if "lora_B" in k)  # it trained (B starts at 0)

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    model.eval()
    expected = logits(model, ids)
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4", tmp_path / "final"):
        names = {p.name for p in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names, names
        assert "model.safetensors" not in names  # no full state dict with lorakit-internal keys
        saved = load_file(folder / "adapter_model.safetensors")
        assert all(k.startswith("base_model.model.model.layers.") and ".lora_" in k for k in saved), sorted(saved)
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
        pm = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(folder)).eval()
        ours = lorakit.LoraModel.from_pretrained(tiny_llama(seed=0), folder).eval()
        assert_close_fp32(logits(pm, ids), logits(ours, ids), reduction=128, depth=8)
        if folder.name != "checkpoint-2":  # the last checkpoint and the final save hold the trained adapter
            assert all(torch.equal(saved[k], trained[k]) for k in trained)
            assert_close_fp32(logits(ours, ids), expected, reduction=128, depth=8)
    first = load_file(tmp_path / "run" / "checkpoint-2" / "adapter_model.safetensors")
    assert not all(torch.equal(first[k], trained[k]) for k in trained)  # step 2 is not step 4
    # Trainer's own files sit beside the adapter, as for a PeftModel
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= {
        p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()}


def _losses(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    # dropout > 0 so the RNG state matters; the resumed model starts from another adapter init
    full = LoraTrainer(model=lora_model(dropout=0.1), args=args(tmp_path / "full", max_steps=6, save_steps=3),
                       train_dataset=TokenRows())
    full.train()
    model = lora_model(init_seed=7, dropout=0.1)
    resumed = LoraTrainer(model=model, args=args(tmp_path / "resumed", max_steps=6, save_steps=3),
                          train_dataset=TokenRows())
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    want, got = adapter_tensors(full.model), adapter_tensors(model)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    full_losses, resumed_losses = _losses(full), _losses(resumed)
    assert sorted(resumed_losses) == [1, 2, 3, 4, 5, 6]  # 1-3 come from the checkpoint's trainer_state.json
    assert all(resumed_losses[s] == full_losses[s] for s in (4, 5, 6)), (resumed_losses, full_losses)
    assert torch.equal(load_file(tmp_path / "resumed" / "checkpoint-6" / "adapter_model.safetensors")[key],
                       want[key])


def test_load_best_model_at_end_reads_the_best_adapter_folder(tmp_path):
    # greater_is_better on the eval loss picks the *worst* checkpoint: loss falls while training on
    # the eval rows, so the best is an early one and differs from what the run ends with
    model = lora_model()
    trainer = LoraTrainer(model=model, args=args(tmp_path / "run", max_steps=6, eval_strategy="steps", eval_steps=2,
                                                 load_best_model_at_end=True, metric_for_best_model="loss",
                                                 greater_is_better=True),
                          train_dataset=TokenRows(), eval_dataset=TokenRows(8))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != "checkpoint-6", trainer.state.log_history
    saved_best = load_file(best / "adapter_model.safetensors")
    saved_last = load_file(tmp_path / "run" / "checkpoint-6" / "adapter_model.safetensors")
    live = adapter_tensors(model)
    assert all(torch.equal(live[k], saved_best[k]) for k in saved_best)
    assert not all(torch.equal(live[k], saved_last[k]) for k in saved_last)


def test_plain_models_keep_transformers_own_checkpoints(tmp_path):
    base = tiny_llama(seed=0)
    trainer = LoraTrainer(model=base, args=args(tmp_path / "run", max_steps=2), train_dataset=TokenRows())
    trainer.train()
    names = {p.name for p in (tmp_path / "run" / "checkpoint-2").iterdir()}
    assert "model.safetensors" in names and "adapter_config.json" not in names


def test_several_adapters_round_trip_through_a_checkpoint_in_place(tmp_path):
    model = lora_model()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    lorakit_params = {n: p for n, p in model.named_parameters() if ".adapters." in n}
    with torch.no_grad():
        for p in lorakit_params.values():
            p.normal_()
    saved = {n: p.detach().clone() for n, p in lorakit_params.items()}
    LoraTrainer(model=model, args=args(tmp_path / "x"))._save(str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "other" / "adapter_model.safetensors").is_file()
    with torch.no_grad():
        for p in lorakit_params.values():
            p.zero_()
    load_checkpoint_adapters(model, tmp_path / "ckpt")
    for n, p in model.named_parameters():
        if ".adapters." in n:
            assert p is lorakit_params[n] and torch.equal(p, saved[n]), n  # same objects: optimizers keep them


def test_refusals_name_the_problem_and_change_nothing(tmp_path):
    model = lora_model()
    model.save_pretrained(tmp_path / "a")
    other = lorakit.get_lora_model(tiny_llama(seed=0), LoraConfig(**{**LORA, "lora_alpha": 16}))
    with torch.no_grad():
        for n, p in other.named_parameters():
            if ".adapters." in n:
                p.fill_(0.5)
    before = adapter_tensors(other)
    with pytest.raises(AdapterLoadError, match="lora_alpha"):
        other.load_adapter_weights(tmp_path / "a")
    assert all(torch.equal(v, adapter_tensors(other)[k]) for k, v in before.items())
    with pytest.raises(AdapterLoadError, match="no adapter folder"):
        load_checkpoint_adapters(model, tmp_path / "empty")
    # two adapters, the second one's folder refused: the first one is put back as it was
    two = lora_model()
    two.add_adapter("other", LoraConfig(r=2, target_modules=["k_proj"]))
    two.save_pretrained(tmp_path / "two")
    bad = LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"])
    lorakit.get_lora_model(tiny_llama(seed=0), bad, "other").save_pretrained(tmp_path / "bad")
    (tmp_path / "two" / "other" / "adapter_config.json").write_text(
        (tmp_path / "bad" / "other" / "adapter_config.json").read_text())
    with torch.no_grad():
        for n, p in two.named_parameters():
            if ".adapters." in n:
                p.fill_(0.25)
    kept = {n: p.detach().clone() for n, p in two.named_parameters() if ".adapters." in n}
    with pytest.raises(AdapterLoadError, match="lora_alpha"):
        load_checkpoint_adapters(two, tmp_path / "two")
    assert all(torch.equal(p, kept[n]) for n, p in two.named_parameters() if ".adapters." in n)
    with pytest.raises(ConfigError, match="Trainer subclass"):
        with_lora_checkpoints(dict)
    assert with_lora_checkpoints(Trainer) is with_lora_checkpoints(Trainer)
    assert issubclass(with_lora_checkpoints(Trainer), Trainer)


def test_unused_dataset_columns_are_judged_against_the_wrapped_model(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = TokenRows(8).rows
    ds = datasets.Dataset.from_dict({"input_ids": rows.tolist(), "labels": rows.tolist(),
                                     "note": [f"row {i}" for i in range(len(rows))]})
    trainer = LoraTrainer(model=lora_model(), args=args(tmp_path / "run", max_steps=1), train_dataset=ds)
    trainer.train()  # LoraModel.forward's own signature (*args, adapter_names, **kwargs) would drop input_ids
    assert "input_ids" in trainer._signature_columns and "note" not in trainer._signature_columns
    assert (tmp_path / "run" / "checkpoint-1" / "adapter_model.safetensors").is_file()


def _sft_run(out: Path, model, resume: str | None = None, max_steps: int = 4):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from lorakit.train.presets import byte_tokenizer

    ds = datasets.Dataset.from_dict({"text": [f"note {i}: the quick brown fox jumps" for i in range(16)]})
    config = trl.SFTConfig(output_dir=str(out), max_steps=max_steps, save_steps=2, per_device_train_batch_size=4,
                           max_length=24, learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                           disable_tqdm=True, dataloader_num_workers=0)
    trainer = with_lora_checkpoints(trl.SFTTrainer)(model=model, args=config, train_dataset=ds,
                                                    processing_class=byte_tokenizer())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def sft_model(init_seed: int = 0):
    torch.manual_seed(init_seed)
    return lorakit.get_lora_model(tiny_llama(seed=0, vocab_size=259),
                                  LoraConfig(lora_dropout=0.1, **LORA))


def test_trl_sft_trainer_saves_peft_folders_and_resumes(tmp_path):
    full = _sft_run(tmp_path / "full", sft_model())
    assert full.model.model.is_activation_checkpointing  # SFTConfig's default: the resume below runs with it
    ckpt = tmp_path / "full" / "checkpoint-2"
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(5))
    pm = peft.PeftModel.from_pretrained(tiny_llama(seed=0, vocab_size=259), str(ckpt)).eval()
    ours = lorakit.LoraModel.from_pretrained(tiny_llama(seed=0, vocab_size=259), ckpt).eval()
    assert_close_fp32(logits(pm, ids), logits(ours, ids), reduction=128, depth=8)

    model = sft_model(init_seed=7)
    resumed = _sft_run(tmp_path / "resumed", model, resume=str(ckpt))
    want, got = adapter_tensors(full.model), adapter_tensors(model)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(_losses(resumed)[s] == _losses(full)[s] for s in (3, 4))


def test_qlora_base_checkpoints_hold_only_the_adapter(tmp_path):
    base = lorakit.quantize_model(tiny_llama(seed=0), "nf4", double_quant=True)
    model = lorakit.get_lora_model(base, LoraConfig(**LORA))
    LoraTrainer(model=model, args=args(tmp_path / "run", max_steps=2), train_dataset=TokenRows()).train()
    folder = tmp_path / "run" / "checkpoint-2"
    saved = load_file(folder / "adapter_model.safetensors")
    assert saved.keys() == adapter_tensors(model).keys()  # no packed 4-bit base tensors in the checkpoint
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    fresh = lorakit.LoraModel.from_pretrained(lorakit.quantize_model(tiny_llama(seed=0), "nf4", double_quant=True),
                                              folder).eval()
    assert_close_fp32(logits(fresh, ids), logits(model.eval(), ids), reduction=128, depth=8)


@pytest.mark.slow
def test_ddp_under_torchrun_saves_once_and_resumes_exactly(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p and "site-packages" not in p])
    worker = Path(__file__).with_name("hf_ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    full, resumed = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "resumed.safetensors")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= {
        p.name for p in ckpt.iterdir()}
    last = load_file(tmp_path / "full" / "checkpoint-4" / "adapter_model.safetensors")
    assert all(torch.equal(last[k], full[k]) for k in full)
