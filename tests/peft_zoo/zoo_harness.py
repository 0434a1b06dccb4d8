"""Run one zoo case against PEFT in both directions and give it exactly one verdict.

* ``pass``: PEFT's folder loads in lorakit with ``torch.equal`` outputs and re-saves to the same
  keys and tensors; lorakit's own adapter (randomised, same config) loads in PEFT with
  ``torch.equal`` outputs and PEFT re-saves the same tensors; merge / unmerge / merge_and_unload
  stay within fp32 rounding of the unmerged outputs, disabled outputs equal PEFT's disabled
  outputs exactly, deleting an adapter leaves exactly the other one, and a mixed batch equals each
  adapter alone row by row (within rounding).
* ``refused``: lorakit raised one of its own errors (LorakitError) naming the feature, at load
  time and (where lorakit has a config for it) at config time.
* ``different``: anything else (a difference, a bare exception, a refusal in one direction only
  or one that doesn't name the feature).

Tolerances come from fp32 rounding: Higham's γ_n = n·u/(1 − n·u) with u = 2⁻²⁴ and n an upper
bound on the summation lengths along the forward (zoo_models.reduction_length + a margin),
times the output's scale: no constant was fitted to what one machine printed.
"""

from __future__ import annotations

import dataclasses
import json
import traceback
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file
from zoo_cases import Case
from zoo_models import MODELS, ROW_INDEPENDENT, make_input, reduction_length

import lorakit
from lorakit.core.variants import AdaLoraConfig
from lorakit.errors import LorakitError, MergeError

U32 = 2.0**-24  # fp32 unit roundoff
PASS, REFUSED, DIFFERENT = "pass", "refused", "different"


@dataclass
class Result:
    verdict: str
    detail: str = ""
    notes: list[str] = field(default_factory=list)


class Different(AssertionError):
    """One check of the case failed: the verdict is 'different'."""


class Refused(Exception):
    """lorakit refused the case with a clear error (a LorakitError naming the feature)."""


# ---------------------------------------------------------------------------- helpers
def case_seed(case: Case) -> int:
    return zlib.crc32(case.name.encode()) % 10_000


def rounding_tol(model: torch.nn.Module, *outputs: torch.Tensor) -> float:  # noqa: D417
    """|a − b| bound for two fp32 evaluations of the same function in different association orders.

    Each side is within γ_n·scale of the exact value, so twice that bounds their gap; the margin
    of 64 in n covers adapter ranks, attention and (log-)softmax sums.
    """
    n = reduction_length(model) + 64
    u = U32 if outputs[0].dtype == torch.float32 else torch.finfo(outputs[0].dtype).eps / 2
    gamma = n * u / (1 - n * u) if n * u < 0.5 else 1.0
    scale = max(1.0, *(float(o.detach().abs().max()) for o in outputs))
    return 2 * gamma * scale


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, what: str) -> None:
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    if not diff <= tol:
        raise Different(f"{what}: max diff {diff:.3g} > rounding bound {tol:.3g}")


def _equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or not torch.equal(a, b):
        diff = float((a - b).abs().max()) if a.shape == b.shape else f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        raise Different(f"{what}: not bit-identical (max diff {diff})")


def _out(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def randomize(model: torch.nn.Module, seed: int, lorakit_side: bool) -> None:
    """Non-zero values in every adapter tensor (and whatever the config makes trainable)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if lorakit_side:
                chosen = p.requires_grad or ".adapters." in name or ".copies." in name
            else:
                chosen = (p.requires_grad or "lora_" in name or "modules_to_save" in name
                          or "trainable_tokens" in name) and "ranknum" not in name
            if chosen and p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _plain(value):
    """PEFT sub-config objects (KasaConfig, ...) as the dicts lorakit's config takes."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    return value


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def _same_files(a: Path, b: Path, what: str) -> None:
    ta, tb = _folder_tensors(a), _folder_tensors(b)
    if sorted(ta) != sorted(tb):
        only_a, only_b = sorted(set(ta) - set(tb)), sorted(set(tb) - set(ta))
        raise Different(f"{what}: keys differ (only in first: {only_a[:3]}, only in second: {only_b[:3]})")
    for k in ta:
        _equal(ta[k], tb[k], f"{what}: tensor {k}")


def _names_feature(exc: BaseException, case: Case) -> bool:
    text = str(exc).lower().replace("-", "").replace(" ", "")
    return not case.names or any(n.lower().replace("_", "") in text.replace("_", "") for n in case.names)


def _lorakit_call(case: Case, fn, *args, **kwargs):
    """Run a lorakit entry point; its clear refusals become Refused, anything else propagates."""
    try:
        return fn(*args, **kwargs)
    except LorakitError as exc:
        if _names_feature(exc, case):
            raise Refused(f"{type(exc).__name__}: {exc}") from exc
        raise Different(f"refused without naming the feature {case.names}: {type(exc).__name__}: {exc}") from exc


def _base(case: Case) -> torch.nn.Module:
    return MODELS[case.model]().to(case.dtype)


def _input(case: Case, seed: int) -> torch.Tensor:
    x = make_input(case.model, seed)
    return x.to(case.dtype) if x.is_floating_point() else x


# ---------------------------------------------------------------------------- PEFT side
def _peft_config(case: Case, kwargs: dict):
    return case.peft_config_class(**kwargs)


def _peft_load(case: Case, folder: Path, second: bool) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(_base(case), folder)
        if second:
            pm.load_adapter(folder / "other", adapter_name="other")
            pm.base_model.set_adapter(["default", "other"])
    return pm.eval()


def _peft_write(case: Case, folder: Path, seed: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_base(case), _peft_config(case, _defaults(case, case.kwargs)))
        if case.second is not None:
            pm.add_adapter("other", _peft_config(case, _defaults(case, case.second)))
        randomize(pm, seed, lorakit_side=False)
        pm.save_pretrained(folder)


def _defaults(case: Case, kwargs: dict) -> dict:
    if case.peft_type == "LORA" and "init_lora_weights" not in kwargs:
        return {**kwargs, "init_lora_weights": False}  # random B: the adapter does something
    fields = {f.name for f in dataclasses.fields(case.peft_config_class)}
    if case.peft_type not in ("LORA", "ADALORA") and "init_weights" in fields:
        return {**kwargs, "init_weights": False}  # non-identity init where the method has one
    return kwargs


# ---------------------------------------------------------------------------- lorakit side
def _lorakit_config(case: Case, kwargs: dict):
    cls = AdaLoraConfig if case.peft_type == "ADALORA" else lorakit.LoraConfig
    return cls(**{k: _plain(v) for k, v in _defaults(case, kwargs).items()})


def _lorakit_load(case: Case, folder: Path, second: bool, name: str = "default", into=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if into is None:
            model = lorakit.LoraModel.from_pretrained(_base(case), folder, adapter_name=name)
        else:
            into.load_adapter(folder, adapter_name=name)
            model = into
        if second:
            model.load_adapter(folder / "other", adapter_name="other")
            model.set_adapter([name, "other"])
    return model.eval()


def _lorakit_write(case: Case, folder: Path, seed: int):
    config = _lorakit_config(case, case.kwargs)
    second = _lorakit_config(case, case.second) if case.second is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lorakit.get_lora_model(_base(case), config)
        if second is not None:
            model.add_adapter("other", second)
            model.set_adapter(["default", "other"])
        randomize(model, seed, lorakit_side=True)
    model.eval().save_pretrained(folder)
    return model


# ---------------------------------------------------------------------------- the case
def run_case(case: Case, workdir: Path) -> Result:
    notes: list[str] = []
    try:
        with warnings.catch_warnings():  # PEFT and lorakit warnings are not verdicts; outputs are
            warnings.simplefilter("ignore")
            _run(case, Path(workdir), notes)
    except Refused as exc:
        return Result(REFUSED, str(exc), notes)
    except Different as exc:
        return Result(DIFFERENT, str(exc), notes)
    except Exception as exc:  # noqa: BLE001 - any other exception is a failure of the case
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return Result(DIFFERENT, f"unexpected {tb}", notes)
    return Result(PASS, "", notes)


def _run(case: Case, work: Path, notes: list[str]) -> None:
    seed = case_seed(case)
    x = _input(case, seed)
    two = case.second is not None

    # ---- direction A: PEFT writes, lorakit reads (and re-saves), PEFT re-reads lorakit's copy
    peft_dir, resaved = work / "peft", work / "resaved"
    _peft_write(case, peft_dir, seed)
    ref = _out(_peft_load(case, peft_dir, two), x)
    refused_a = None
    try:
        ours = _lorakit_call(case, _lorakit_load, case, peft_dir, two)
    except Refused as exc:
        refused_a = exc
    if refused_a is None:
        _equal(_out(ours, x), ref, "PEFT folder -> lorakit outputs")
        _lorakit_call(case, ours.save_pretrained, resaved)
        _same_files(peft_dir, resaved, "PEFT folder vs lorakit re-save")
        if two:
            _same_files(peft_dir / "other", resaved / "other", "PEFT folder vs lorakit re-save (second adapter)")
        _equal(_out(_peft_load(case, resaved, two), x), ref, "lorakit re-save -> PEFT outputs")

    # ---- direction B: lorakit writes (its own config), PEFT reads
    if not case.lorakit_side:
        if refused_a is None:
            raise Different("lorakit loaded a folder of a PEFT method it has no implementation of")
        raise refused_a
    ours_dir = work / "ours"
    try:
        written = _lorakit_call(case, _lorakit_write, case, ours_dir, seed + 1)
    except Refused as exc:
        if refused_a is None:
            raise Different(f"loads PEFT's folder but refuses the same config at config time: {exc}") from exc
        raise
    if refused_a is not None:
        raise Different(f"builds the config but refuses PEFT's folder of it: {refused_a}")
    mine = _out(written, x)
    peft_model = _peft_load(case, ours_dir, two)
    _equal(_out(peft_model, x), mine, "lorakit folder -> PEFT outputs")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(work / "peft_resaved")
    _same_files(ours_dir, work / "peft_resaved", "lorakit folder vs PEFT re-save")

    # ---- behaviour of the loaded adapter in lorakit, against PEFT where PEFT defines it
    _check_disable(case, peft_dir, two, x, notes)
    _check_merge(case, peft_dir, two, x, notes)
    _check_delete(case, peft_dir, ours_dir, two, x, notes)
    _check_mixed(case, peft_dir, ours_dir, x, notes)


def _check_disable(case, folder, two, x, notes) -> None:
    ours = _lorakit_load(case, folder, two)
    pm = _peft_load(case, folder, two)
    with ours.disable_adapters():
        got = _out(ours, x)
    with pm.disable_adapter():
        want = _out(pm, x)
    _equal(got, want, "disabled outputs vs PEFT's disabled outputs")
    _equal(_out(ours, x), _out(pm, x), "outputs after re-enabling")


def _check_merge(case, folder, two, x, notes) -> None:
    ours = _lorakit_load(case, folder, two)
    before = _out(ours, x)
    weights = {k: v.clone() for k, v in ours.model.state_dict().items()}
    tol = rounding_tol(ours.model, before)
    try:
        ours.merge_adapter()
    except MergeError as exc:
        # refused (grouped convs; PEFT refuses too): nothing may have changed
        for k, v in ours.model.state_dict().items():
            _equal(v, weights[k], f"weight {k} after a refused merge")
        _equal(_out(ours, x), before, "outputs after a refused merge")
        notes.append(f"merge refused: {str(exc)[:60]}")
        return
    merged = _out(ours, x)
    _close(merged, before, tol, "merged vs unmerged outputs")
    ours.merge_adapter()  # idempotent
    _equal(_out(ours, x), merged, "second merge_adapter() changed the outputs")
    ours.unmerge_adapter()
    _close(_out(ours, x), before, tol, "outputs after unmerge")
    plain = _lorakit_load(case, folder, two).merge_and_unload()
    if any(isinstance(m, lorakit.LoraModel) or type(m).__module__.startswith("lorakit.") for m in plain.modules()):
        raise Different("merge_and_unload left lorakit modules in the model")
    _close(_out(plain, x), before, tol, "merge_and_unload outputs vs unmerged")


def _rewrites_base(case: Case) -> bool:
    """Inits that rewrite the base weight (PiSSA, OLoRA, ...): later adapters see the residual."""
    return case.kwargs.get("init_lora_weights", False) not in (True, False, "gaussian")


def _check_delete(case, peft_dir, ours_dir, two, x, notes) -> None:
    """Deleting one of two loaded adapters leaves exactly the other; deleting all leaves the base."""
    if _rewrites_base(case):
        notes.append("delete: n/a (the init rewrote the base weight, which stays)")
        return
    if two:  # the pair from PEFT's folder: delete the second, the first alone remains
        alone = _out(_lorakit_load(case, peft_dir, False), x)
        model = _lorakit_load(case, peft_dir, True)
        model.delete_adapter("other")
        model.set_adapter("default")
        left = ["default"]
    else:  # PEFT's adapter as 'a' and ours as 'b': delete 'a', 'b' alone remains
        alone = _out(_lorakit_load(case, ours_dir, False, name="b"), x)
        model = _lorakit_load(case, peft_dir, False, name="a")
        _lorakit_load(case, ours_dir, False, name="b", into=model)
        model.delete_adapter("a")
        model.set_adapter("b")
        left = ["b"]
    _equal(_out(model, x), alone, "after deleting the other adapter")
    for name in left:
        model.delete_adapter(name)
    if any(isinstance(m, lorakit.core.layers.LoraLayer) for m in model.model.modules()):
        raise Different("LoRA layers left after deleting every adapter")
    if case.kwargs.get("bias", "none") != "none" or _rewrites_base(case):
        notes.append("delete: base not compared (trained biases or an init that rewrites W stay, as in PEFT)")
        return
    _equal(_out(model, x), _out(_base(case), x), "after deleting every adapter")


def _check_mixed(case, peft_dir, ours_dir, x, notes) -> None:
    if case.model not in ROW_INDEPENDENT or case.second is not None or _rewrites_base(case):
        notes.append("mixed batch: n/a (rows interact, or two active adapters)")
        return
    model = _lorakit_load(case, peft_dir, False, name="a")
    _lorakit_load(case, ours_dir, False, name="b", into=model)
    names = ["a", "b", None, "a"][: x.shape[0]]
    try:
        mixed = _out_mixed(model, x, names)
    except (LorakitError, NotImplementedError) as exc:
        notes.append(f"mixed batch refused: {str(exc)[:60]}")
        return
    for adapter in ("a", "b", None):
        rows = [i for i, n in enumerate(names) if n == adapter]
        if adapter is None:
            with model.disable_adapters():
                alone = _out(model, x)
        else:
            model.set_adapter(adapter)
            alone = _out(model, x)
        _close(mixed[rows], alone[rows], rounding_tol(model.model, alone), f"mixed batch rows of {adapter}")


def _out_mixed(model, x, names):
    with torch.no_grad():
        return model(x, adapter_names=names)


def summarize(results: dict[str, Result]) -> dict[str, int]:
    counts = {PASS: 0, REFUSED: 0, DIFFERENT: 0}
    for r in results.values():
        counts[r.verdict] += 1
    return counts


def dump(results: dict[str, Result]) -> str:
    return json.dumps({k: dataclasses.asdict(v) for k, v in results.items()}, indent=1)
