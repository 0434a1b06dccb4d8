"""The four commands end to end: output, JSON, files written, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
from analysis_helpers import adapters_fixture, one_thread  # noqa: F401  (fixtures)

from lorakit.analysis import cli
from lorakit.analysis.combine import METHODS


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_table_json_plot_compare(adapters, tmp_path, capsys):
    a, b = adapters["a"].path, adapters["b"].path
    code, out, _ = run(capsys, "inspect", a)
    assert code == 0 and "model.layers.1.self_attn.q_proj" in out and "summary:" in out
    code, out, _ = run(capsys, "inspect", a, "--json", "--compare", b, "--plot", tmp_path / "a.png")
    data = json.loads(out)
    assert code == 0 and len(data["layers"]) == 14 and len(data["comparison"]["layers"]) == 14
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_compress_and_combine_write_adapters(adapters, tmp_path, capsys):
    code, out, _ = run(capsys, "compress", adapters["a"].path, "--rank", "2", "--out", tmp_path / "c", "--json")
    assert code == 0 and json.loads(out)["new_params"] < json.loads(out)["old_params"]
    assert (tmp_path / "c" / "adapter_model.safetensors").is_file()
    code, out, _ = run(capsys, "combine", adapters["a"].path, adapters["b"].path, "--weights", "1", "0.5",
                       "--method", "ties", "--density", "0.5", "--rank", "4", "--out", tmp_path / "t")
    assert code == 0 and "written to" in out
    assert json.loads((tmp_path / "t" / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("argv,message", [
    (["inspect", "{tmp}"], "is not an adapter folder"),
    (["compress", "{a}", "--rank", "99", "--out", "{tmp}/o"], "--rank 99 is larger than layer"),
    (["combine", "{a}", "{qv}", "--out", "{tmp}/o"], "is adapted by"),
    (["combine", "{a}", "{a}", "--method", "dare", "--out", "{tmp}/o"], "needs --density"),
    (["plan", "--model", "no-such-model"], "neither a preset"),
    (["plan", "--model", "tiny-llama", "--batch", "0"], "batch must be a positive integer"),
])
def test_bad_input_exits_2_without_traceback(adapters, tmp_path, capsys, argv, message):
    subs = {"tmp": tmp_path, "a": adapters["a"].path, "qv": adapters["qv"].path}
    code, out, err = run(capsys, *[arg.format(**subs) for arg in argv])
    assert code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_plan_prints_counts_and_parts(capsys):
    code, out, _ = run(capsys, "plan", "--model", "tiny-llama", "--r", "8", "--target", "q_proj,v_proj",
                       "--batch", "1", "--seq", "16", "--json")
    data = json.loads(out)
    # tiny-llama (the training preset): q: 64->64, v: 64->32 (2 kv heads of 16), 2 layers: r·(d + k) each
    assert code == 0 and data["trainable_params"] == 2 * 8 * ((64 + 64) + (64 + 32))
    assert data["total_bytes"] == sum(data[k] for k in ("weights_bytes", "lora_bytes", "grads_bytes",
                                                         "optimizer_bytes", "activation_bytes"))
    code, out, _ = run(capsys, "plan", "--model", "tiny-llama", "--batch", "1", "--seq", "16", "--budget-gb", "100")
    assert code == 0 and "trainable params: 32,768" in out and "fits:" in out


def test_methods_listed_once():
    assert cli.METHODS == METHODS


def test_registered_in_the_lorakit_cli():
    from lorakit import cli as top

    assert {top.COMMANDS[c][0] for c in ("inspect", "compress", "combine", "plan")} == {"lorakit.analysis.cli"}
