"""lm-evaluation-harness through `lorakit serve` vs lm-eval's own `hf` + `peft=` model: same accuracy.

A client nobody here wrote scores a multiple-choice task through ``/v1/completions`` (lm-eval's
``local-completions`` model: ``echo`` + ``logprobs=1`` + ``max_tokens=1`` on token-id prompts, reading
``token_logprobs[ctxlen:-1]``). The same task runs through lm-eval's ``hf`` model with ``peft=`` on the
same adapter folder. The accuracies must be equal, and each (item, choice) log-likelihood must agree
within fp32 rounding.

Everything is local: the task is a YAML file reading a local JSONL file (no hub), the base is
either a random Llama saved with the SmolLM2 tokenizer (``--base tiny``, default, seconds) or the
real SmolLM2-135M-Instruct (``--base smollm2``, minutes), both through :func:`lorakit.models.resolve_base`'s
offline cache, and the adapter is a random (non-zero) LoRA saved in PEFT format.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/lm_eval_check.py [--base tiny|smollm2]

Needs ``pip install -e ".[lmeval]"`` (lm-eval[api] 0.4.13; a benchmark dependency, not a test one: it
pulls datasets, evaluate, scikit-learn, sacrebleu, ...). The base alone is scored too (``hf``
without ``peft``): the adapter must move the log-likelihoods by more than the rounding bound, or
the check would prove nothing about adapters. Exit status 1 when the two disagree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TASK = "lorakit_local_mc"
EPS32 = torch.finfo(torch.float32).eps
# 24 small multiple-choice items: a question and four continuations, one right
ITEMS = [
    ("The capital of France is", [" Paris", " Berlin", " Madrid", " Rome"], 0),
    ("Two plus two equals", [" three", " four", " five", " six"], 1),
    ("The sky on a clear day is", [" green", " red", " blue", " black"], 2),
    ("Water freezes at zero degrees", [" Fahrenheit", " Kelvin", " Rankine", " Celsius"], 3),
    ("The opposite of hot is", [" cold", " warm", " loud", " tall"], 0),
    ("A week has", [" five days", " seven days", " ten days", " three days"], 1),
    ("The largest planet in the solar system is", [" Mars", " Venus", " Jupiter", " Mercury"], 2),
    ("Cats are animals that say", [" moo", " quack", " woof", " meow"], 3),
    ("The sun rises in the", [" east", " west", " north", " south"], 0),
    ("Ice is frozen", [" fire", " water", " sand", " air"], 1),
    ("A triangle has", [" four sides", " five sides", " three sides", " six sides"], 2),
    ("The color of grass is", [" purple", " orange", " pink", " green"], 3),
    ("Bees make", [" honey", " milk", " silk", " wool"], 0),
    ("The first month of the year is", [" March", " January", " June", " October"], 1),
    ("Fish live in", [" trees", " deserts", " water", " clouds"], 2),
    ("One hundred minus one is", [" ten", " one", " eleven", " ninety-nine"], 3),
    ("The Earth goes around the", [" Sun", " Moon", " Mars", " comet"], 0),
    ("A baby dog is called a", [" kitten", " puppy", " calf", " foal"], 1),
    ("People read books with their", [" ears", " hands", " eyes", " feet"], 2),
    ("The freezing point of water in Celsius is", [" one hundred", " fifty", " ten", " zero"], 3),
    ("Snow is usually", [" white", " red", " blue", " black"], 0),
    ("The number after nine is", [" eight", " ten", " seven", " twelve"], 1),
    ("Birds fly with their", [" fins", " wheels", " wings", " roots"], 2),
    ("At night the sky is", [" bright", " yellow", " green", " dark"], 3),
]


def write_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def build_models(work: Path, base_kind: str, seed: int) -> tuple[Path, Path, int, int]:
    """(base dir, adapter dir, depth, reduction): depth/reduction size the fp32 rounding bound."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.models import resolve_base

    smollm2 = resolve_base("smollm2-135m-instruct")  # the offline cache: its tokenizer (and, for --base smollm2, weights)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    if base_kind == "smollm2":
        base_dir = smollm2
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    else:
        base_dir = work / "base"
        torch.manual_seed(seed)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                          initializer_range=0.2, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg).eval()
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    cfg = model.config
    torch.manual_seed(seed + 1)  # A's init: the same adapter on every run
    lora = lorakit.get_lora_model(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                            task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a non-zero adapter, so the check is about the adapter and not the base alone
        for name, p in lora.named_parameters():
            if "lora_b" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    adapter_dir = work / "adapter"
    lora.save_pretrained(adapter_dir)
    # GEMMs chained per layer (q/k/v, o, gate/up, down, attention's two) + lm_head; longest reduction
    depth = 6 * cfg.num_hidden_layers + 1
    return base_dir, adapter_dir, depth, max(cfg.hidden_size, cfg.intermediate_size)


def logit_scale(base_dir: Path, adapter_dir: Path) -> tuple[float, list[list[int]]]:
    """max |logit| of the adapted model over the task's prompts + choices (sizes the rounding bound),
    and each choice's continuation length in tokens (its log-likelihood sums that many terms)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      str(adapter_dir)).eval()
    scale, lengths = 0.0, []
    with torch.no_grad():
        for q, choices, _ in ITEMS:
            lengths.append([])
            for c in choices:
                ids = tok(q + c, return_tensors="pt").input_ids
                scale = max(scale, float(model(ids).logits.abs().max()))
                lengths[-1].append(ids.shape[1] - len(tok(q).input_ids))
    return scale, lengths


def start_server(base_dir: Path, adapter_dir: Path, threads: int) -> tuple[subprocess.Popen, str]:
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--base", str(base_dir), "--adapter",
                             f"tuned={adapter_dir}", "--port", str(port), "--threads", str(threads),
                             "--log-level", "warning", "--max-tokens-cap", "16"], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit("the server did not become ready within 300 s")


def evaluate(model: str, model_args: dict, task_dir: Path) -> tuple[dict, list[list[float]]]:
    """(metrics, per-item list of the choices' log-likelihoods) from lm-eval."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[TASK], log_samples=True,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                  bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    metrics = {k.split(",")[0]: v for k, v in out["results"][TASK].items() if k.startswith(("acc", "acc_norm"))
               and "stderr" not in k}
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return metrics, [[float(r[0][0]) for r in s["resps"]] for s in samples]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, help="keep the task, base and adapter here (default: a temp dir)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lorakit-lm-eval-"))
    task_dir = write_task(work / "task")
    base_dir, adapter_dir, depth, reduction = build_models(work, args.base, args.seed)
    started = time.perf_counter()
    proc, url = start_server(base_dir, adapter_dir, args.threads)
    try:
        served, served_ll = evaluate("local-completions", {
            "model": "tuned", "base_url": f"{url}/v1/completions", "tokenizer": str(base_dir),
            "tokenizer_backend": "huggingface", "tokenized_requests": True, "num_concurrent": 1, "max_retries": 1,
        }, task_dir)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    served_s = time.perf_counter() - started
    started = time.perf_counter()
    hf, hf_ll = evaluate("hf", {"pretrained": str(base_dir), "peft": str(adapter_dir), "dtype": "float32",
                                "device": "cpu", "batch_size": 1}, task_dir)
    hf_s = time.perf_counter() - started
    _, base_ll = evaluate("hf", {"pretrained": str(base_dir), "dtype": "float32", "device": "cpu", "batch_size": 1},
                          task_dir)  # the base alone: the adapter must matter, or the check proves little
    moved = max(abs(a - b) for sa, sb in zip(hf_ll, base_ll) for a, b in zip(sa, sb))
    # per choice: a sum of n token logprobs, each within 2·depth·√K·eps·max|logit| of the other's
    scale, lengths = logit_scale(base_dir, adapter_dir)
    per_token = 2 * depth * math.sqrt(reduction) * EPS32 * scale
    diffs = [abs(a - b) / (n * per_token) for sa, sb, ns in zip(served_ll, hf_ll, lengths)
             for a, b, n in zip(sa, sb, ns)]  # as a fraction of each choice's bound
    raw = max(abs(a - b) for sa, sb in zip(served_ll, hf_ll) for a, b in zip(sa, sb))
    tol = per_token * max(n for ns in lengths for n in ns)
    print(f"task {TASK}: {len(ITEMS)} items x 4 choices, base={args.base}, adapter r=8 all-linear")
    print(f"{'metric':<10}{'lorakit serve':>15}{'hf + peft':>12}")
    for key in sorted(hf):
        print(f"{key:<10}{served.get(key, float('nan')):>15.4f}{hf[key]:>12.4f}")
    print(f"log-likelihoods: {len(diffs)} compared, max |diff| {raw:.3g}; largest diff/bound {max(diffs):.3g} "
          f"(fp32 bound per choice: tokens x {per_token:.3g}, at most {tol:.3g})")
    print(f"the adapter moves them by up to {moved:.3g} from the base's (hf without peft)")
    print(f"wall: served {served_s:.1f} s (incl. server start), hf {hf_s:.1f} s")
    same = served == hf and len(served_ll) == len(hf_ll) == len(ITEMS) and max(diffs) <= 1 and tol < moved
    print("SAME" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
