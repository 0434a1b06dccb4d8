"""Malformed adapter folders through the Python API: each is refused with a LorakitError (or
loads), and a refused load leaves the model exactly as it was — for plain LoRA, DoRA and PiSSA
hosts (README promise: a failed load leaves the model unchanged)."""

from __future__ import annotations

import warnings

import pytest
import torch
from factories import randomize_lora, tiny_llama
from generators import adapter_folders

import lorakit
from lorakit.errors import LorakitError


def snapshot(model) -> tuple:
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()},
            [(n, type(m).__name__) for n, m in model.named_modules()], list(model.active_adapters),
            sorted(model.peft_config))


def same(a: tuple, b: tuple) -> bool:
    return a[1:] == b[1:] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "adapter"
    model = lorakit.get_lora_model(tiny_llama(1), lorakit.LoraConfig(r=4, lora_alpha=8,
                                                                      target_modules=["q_proj", "v_proj"]))
    randomize_lora(model)
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("variant", [dict(), dict(use_dora=True), dict(init_lora_weights="pissa")],
                         ids=["lora", "dora", "pissa"])
def test_promise_failed_load_leaves_model_unchanged_across_generated_folders(good, tmp_path, tally, variant):
    host = lorakit.get_lora_model(tiny_llama(0), lorakit.LoraConfig(r=2, target_modules=["q_proj", "k_proj"],
                                                                     **variant))
    randomize_lora(host, 5)
    before = snapshot(host)
    kind = "dora" if variant.get("use_dora") else "pissa" if variant else "lora"
    area = f"adapter folders, python, {kind} host"
    for i, (name, folder) in enumerate(adapter_folders(good, tmp_path / "cases", seed=len(variant))):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                host.load_adapter(folder, adapter_name=f"x{i}")
        except LorakitError as exc:
            tally.record(area, "refused" if str(exc) else "unclear", name)
            if not same(before, snapshot(host)):
                tally.record(area, "model_changed", name)
            continue
        except Exception as exc:  # anything else escaping is a raw error the user can't act on
            tally.record(area, "traceback", f"{name}: {type(exc).__name__}: {exc}")
            continue
        tally.record(area, "served", name)
        host.delete_adapter(f"x{i}")
        if not same(before, snapshot(host)):  # delete must restore the base bit for bit (PiSSA)
            tally.record(area, "model_changed", f"{name} (after delete)")
    assert tally.bad(area) == []


_OPENED: list[str] = []
_AUDITING = {"on": False}


def _audit(event: str, args: tuple) -> None:
    if _AUDITING["on"] and event == "open" and args and isinstance(args[0], (str, bytes)):
        _OPENED.append(args[0] if isinstance(args[0], str) else args[0].decode(errors="replace"))


def test_promise_loads_only_under_adapter_root_python_api_with_open_audit(good, tmp_path, tally):
    """Every escape attempt through `load_adapter(..., root=)` is refused, and the audit hook sees
    no open() of any path inside the outside folder (0 reads outside the root)."""
    import os
    import shutil
    import sys

    sys.addaudithook(_audit)  # process-wide and permanent; only records while _AUDITING is on
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    shutil.copytree(good, outside)
    shutil.copytree(good, root / "inside")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    (root / "filelinks").mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (root / "filelinks" / f).symlink_to(outside / f)
    (root / "weightlink").mkdir()
    shutil.copy(good / "adapter_config.json", root / "weightlink")
    (root / "weightlink" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    (root / "nested").mkdir()
    (root / "nested" / "up").symlink_to(tmp_path, target_is_directory=True)
    (root / "inlink").symlink_to(root / "inside", target_is_directory=True)  # stays inside: allowed
    attempts = {"dirlink": False, "filelinks": False, "weightlink": False, "nested/up/outside": False,
                "../outside": False, str(outside): False, "inside": True, "inlink": True}
    host = lorakit.get_lora_model(tiny_llama(0), lorakit.LoraConfig(r=2, target_modules=["k_proj"]))
    area = "adapter-root escapes, python API"
    real_outside = os.path.realpath(outside)
    for i, (path, allowed) in enumerate(attempts.items()):
        folder = root / path if not os.path.isabs(path) else path
        _OPENED.clear()
        _AUDITING["on"] = True
        try:
            host.load_adapter(folder, adapter_name=f"r{i}", root=root)
            loaded = True
        except LorakitError:
            loaded = False
        finally:
            _AUDITING["on"] = False
        outside_reads = [p for p in _OPENED if os.path.isabs(p) and os.path.realpath(p).startswith(real_outside)]
        if outside_reads or (loaded and not allowed):
            tally.record(area, "read_outside_root", f"{path}: {outside_reads}")
        else:
            tally.record(area, "served" if loaded else "refused", path)
        if loaded:
            host.delete_adapter(f"r{i}")
            real_root = os.path.realpath(root)
            if not any(os.path.isabs(p) and os.path.realpath(p).startswith(real_root) for p in _OPENED):
                tally.record(area, "unclear", f"{path}: the audit hook saw no open() (it would miss reads too)")
    assert tally.bad(area) == []
