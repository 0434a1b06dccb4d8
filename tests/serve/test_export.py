"""`lorakit merge`: the saved checkpoint loads with transformers and equals base + adapter(s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from serve_helpers import shared_model_dirs_one_thread
from tolerance import assert_close_fp32
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit.cli import run_command
from lorakit.export import merge as export

# merged (W + ΔW)·x vs W·x + B·A·x differ by fp32 rounding only: up to 9 chained GEMMs in the tiny
# Llama (q/k/v, o, gate/up, down in each of 2 layers, then lm_head), reductions of length <= 128
ROUNDING = dict(reduction=128, depth=9)
IDS = torch.tensor([[5, 9, 12, 40, 41, 7, 3, 60], [2, 8, 8, 70, 71, 72, 1, 0]])


@pytest.fixture(scope="module")
def dirs() -> dict[str, Path]:
    yield from shared_model_dirs_one_thread()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _lora_logits(base_dir: Path, adapters: dict[str, Path], weights: dict[str, float] | None = None):
    """Reference: the unmerged LoraModel; weights scale each adapter's own scaling (sum of deltas)."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    names = list(adapters)
    model = lorakit.LoraModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    for layer in model.lora_layers():
        for name, adapter in layer.adapters.items():
            adapter.scaling *= (weights or {}).get(name, 1.0)
    model.set_adapter(names)
    return _logits(model)


def test_merge_one_adapter_loads_with_automodel_and_matches(dirs, tmp_path):
    out = tmp_path / "merged"
    report = export.merge_to_checkpoint(dirs["base"], [dirs["a"]], out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not any("lora" in k for k in merged.state_dict())
    assert_close_fp32(_logits(merged), _lora_logits(dirs["base"], {"a": dirs["a"]}), **ROUNDING)
    base = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32)
    assert not torch.allclose(_logits(merged), _logits(base))  # the adapter did change something
    assert AutoTokenizer.from_pretrained(out)("hello world")["input_ids"] == [69, 70]
    assert report.dtype == "float32" and report.dequantized_4bit is None
    assert json.loads((out / export.MERGE_INFO).read_text())["adapters"] == [str(dirs["a"])]


def test_merge_several_adapters_with_weights(dirs, tmp_path):
    out = tmp_path / "mix"
    export.merge_to_checkpoint(dirs["base"], [dirs["a"], dirs["b"]], out, weights=[0.7, -0.3])
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    want = _lora_logits(dirs["base"], {"a": dirs["a"], "b": dirs["b"]}, {"a": 0.7, "b": -0.3})
    assert_close_fp32(_logits(merged), want, **ROUNDING)
    # no weights: plain sum of both deltas
    export.merge_to_checkpoint(dirs["base"], [dirs["a"], dirs["b"]], tmp_path / "sum")
    summed = AutoModelForCausalLM.from_pretrained(tmp_path / "sum", dtype=torch.float32)
    want = _lora_logits(dirs["base"], {"a": dirs["a"], "b": dirs["b"]})
    assert_close_fp32(_logits(summed), want, **ROUNDING)


@pytest.mark.slow
def test_merge_matches_peft_weighted_cat(dirs, tmp_path):
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(dirs["base"], dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(base, str(dirs["a"]), adapter_name="a")
    ref.load_adapter(str(dirs["b"]), adapter_name="b")
    ref.add_weighted_adapter(["a", "b"], [0.5, 0.25], "m", combination_type="cat")
    ref.set_adapter("m")
    want = _logits(ref)
    export.merge_to_checkpoint(dirs["base"], [dirs["a"], dirs["b"]], tmp_path / "m", weights=[0.5, 0.25])
    got = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32))
    assert_close_fp32(got, want, **ROUNDING)


def test_dtype_and_sharding(dirs, tmp_path):
    report = export.merge_to_checkpoint(dirs["base"], [dirs["a"]], tmp_path / "bf16", dtype="bfloat16",
                                        max_shard_size="60KB")
    shards = sorted(p.name for p in (tmp_path / "bf16").glob("*.safetensors"))
    assert len(shards) > 1 and "model.safetensors.index.json" in report.files
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert merged.dtype == torch.bfloat16
    export.merge_to_checkpoint(dirs["base"], [dirs["a"]], tmp_path / "fp32")
    full = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32).state_dict()
    for key, value in merged.state_dict().items():  # the fp32 merge, rounded once to bf16
        assert torch.equal(value, full[key].to(torch.bfloat16)), key


def test_failed_merge_leaves_no_output(dirs, tmp_path, monkeypatch):
    def boom(folder):
        raise OSError("disk full (injected)")

    monkeypatch.setattr("lorakit.io.atomic.fsync_tree", boom)
    out = tmp_path / "never"
    with pytest.raises(OSError, match="injected"):
        export.merge_to_checkpoint(dirs["base"], [dirs["a"]], out)
    assert list(tmp_path.iterdir()) == []  # neither --out nor a temporary folder


def test_existing_output_needs_overwrite_and_survives_a_failed_overwrite(dirs, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(export.MergeError, match="--overwrite"):
        export.merge_to_checkpoint(dirs["base"], [dirs["a"]], out)
    monkeypatch.setattr("lorakit.io.atomic.fsync_tree", lambda folder: (_ for _ in ()).throw(OSError("injected")))
    with pytest.raises(OSError):
        export.merge_to_checkpoint(dirs["base"], [dirs["a"]], out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep.txt").read_text() == "old"
    monkeypatch.undo()
    export.merge_to_checkpoint(dirs["base"], [dirs["a"]], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _save_4bit_base(base_dir: Path, out: Path) -> torch.nn.Module:
    """A bitsandbytes-format NF4 checkpoint of the base; returns the dequantised fp32 reference model."""
    from safetensors.torch import save_file

    from lorakit.quant import dequantize_4bit, quantize_4bit

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            packed, state = quantize_4bit(module.weight.data, blocksize=64, double_quant=True)
            tensors[f"{name}.weight"] = packed
            tensors.update({f"{name}.weight.{k}": v.clone() for k, v in state.as_dict(packed=True).items()})
            module.weight.data = dequantize_4bit(packed, state, torch.float32)
    for key, value in model.state_dict().items():
        if key not in tensors and not any(k.startswith(key + ".") for k in tensors):
            tensors[key] = value.contiguous()
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                                     "bnb_4bit_compute_dtype": "float32"}
    (out / "config.json").write_text(json.dumps(config))
    return model


def _save_with_lorakit_quant(base_dir: Path, out: Path) -> torch.nn.Module:
    """The 4-bit folder lorakit.quant.save_quantized writes; returns the dequantised fp32 reference."""
    quant = pytest.importorskip("lorakit.quant")
    if not hasattr(quant, "save_quantized"):
        pytest.skip("lorakit.quant has no save_quantized")
    qmodel = quant.quantize_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), "nf4",
                                  double_quant=True)
    reference = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    for name, module in qmodel.named_modules():
        if isinstance(module, quant.Linear4bit):
            reference.get_submodule(name).weight.data = module.dequantize(torch.float32)
    quant.save_quantized(qmodel, out)
    return reference


@pytest.mark.parametrize("writer", ["bnb_layout", "lorakit_quant"])
def test_merge_from_4bit_base_dequantises(dirs, tmp_path, capsys, writer):
    save = _save_4bit_base if writer == "bnb_layout" else _save_with_lorakit_quant
    reference = save(dirs["base"], tmp_path / "base4")
    code = run_command("merge", ["--base", str(tmp_path / "base4"), "--adapter", str(dirs["a"]), "--out", str(tmp_path / "o")])
    assert code == 0
    assert "base is 4-bit (nf4, double quant): dequantised" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "o", dtype=torch.float32)
    assert "quantization_config" not in json.loads((tmp_path / "o" / "config.json").read_text())
    lora = lorakit.LoraModel.from_pretrained(reference, dirs["a"], adapter_name="a")
    assert_close_fp32(_logits(merged), _logits(lora), **ROUNDING)


def test_cli_bad_input_is_one_line_and_exit_2(dirs, tmp_path, capsys):
    assert run_command("merge", ["--base", str(tmp_path), "--adapter", str(dirs["a"]), "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    code = run_command("merge", ["--base", str(dirs["base"]), "--adapter", str(dirs["a"]), "--weights", "1", "2",
                        "--out", str(tmp_path / "x")])
    assert code == 2 and "one each" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
