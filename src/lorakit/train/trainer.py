"""The training loop: TrainConfig in, evaluated adapter (plus checkpoints, metrics, plot) out.

One optimizer step = ``grad_accum`` global micro-batches of ``batch_size × processes`` rows.
Every micro-batch loss is a *sum* divided by the number of targets in the whole step (all
micro-batches, all processes), so the step's gradient is the mean over its targets however the
rows are split: ``g = Σ_micro Σ_rank ∇ loss_sum / N_targets``. That is what makes 1 process with
batch 2B equal 2 processes with batch B, and grad accumulation equal a bigger batch.

Under ``train.parallel: fsdp`` the model is sharded after rank 0's adapter is broadcast
(:func:`lorakit.train.distributed.shard_model`); every process then runs every forward (a process
with no rows of a micro-batch runs one row with weight 0), and checkpoints hold whole tensors, as
one process writes them, so a run can resume with another process count.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from lorakit.errors import ConfigError, LorakitError
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed
from lorakit.train.config import TrainConfig
from lorakit.train.data import collate, epoch_batches, pad_id
from lorakit.train.evaluate import autocast, evaluate, summed_loss
from lorakit.train.interrupt import StopSignals, TrainingInterrupted
from lorakit.train.model_setup import build_model, write_final
from lorakit.train.optim import Schedule, build_optimizer
from lorakit.train.plots import MetricsLog, plot_losses
from lorakit.train.prepare import Prepared, prepare_data, targets
from lorakit.train.presets import load_tokenizer

log = logging.getLogger(__name__)
PLOT_SECONDS = 30.0


class TrainingDivergedError(LorakitError, FloatingPointError):
    """The loss or the gradient became NaN/inf; the last good checkpoint is kept."""


class Reporter:
    """Where progress goes. The library default is silent; the CLI passes a tqdm one."""

    def start(self, total_steps: int, done_steps: int) -> None: ...
    def update(self, step: int, info: dict[str, float]) -> None: ...
    def message(self, text: str) -> None:
        log.info(text)
    def close(self) -> None: ...


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    metrics: dict[str, float]  # the final evaluation (empty without eval data)
    best: dict[str, Any] | None
    tokens_per_s: float
    train_seconds: float
    data_stats: dict[str, Any] = field(default_factory=dict)
    trainable_params: int = 0
    total_params: int = 0


class Trainer:
    """One training run. ``handle_signals``: SIGINT/SIGTERM stop it at a step boundary with a
    checkpoint and raise :class:`~lorakit.train.interrupt.TrainingInterrupted` (main thread only)."""

    def __init__(self, config: TrainConfig, resume: bool = False, reporter: Reporter | None = None,
                 handle_signals: bool = True):
        self.cfg = config
        self.resume = resume
        self.reporter = reporter or Reporter()
        self.handle_signals = handle_signals
        self.last_eval: tuple[int, dict[str, float]] | None = None
        self.plotted = -math.inf  # the first eval/save draws loss.png at once
        self.state: dict[str, Any] = {}
        self.saved_step = -1  # the step of the checkpoint on disk that matches the current state

    def run(self) -> RunResult:
        run_dir = Path(self.cfg.train.output_dir)
        created = ckpt.missing_dirs(run_dir)  # what this run creates, so a failed one can take it away
        is_main = True
        with StopSignals(self.handle_signals) as self.stop:
            try:
                info = distributed.setup(self.cfg.train.device)
                is_main = info.is_main
                try:
                    return self._run(info)
                finally:
                    distributed.teardown(info)
            except TrainingInterrupted as exc:
                if exc.step is None and self.state:
                    exc.step = self.state["step"]
                if exc.checkpoint is None and is_main:
                    exc.checkpoint = ckpt.latest_checkpoint(run_dir)
                exc.args = (exc.describe(),)
                if is_main:
                    ckpt.remove_unused_run_dir(run_dir, created)
                raise
            except BaseException:
                if is_main:
                    ckpt.remove_unused_run_dir(run_dir, created)
                raise

    # ------------------------------------------------------------------ set-up
    def _run(self, info: distributed.DistInfo) -> RunResult:
        cfg, tc = self.cfg, self.cfg.train
        run_dir = Path(tc.output_dir)
        if info.is_main:
            ckpt.check_run_dir(run_dir, 16 << 20)
            ckpt.remove_partial(run_dir)
        if ckpt.list_checkpoints(run_dir) and not self.resume:
            raise ckpt.RunDirError(f"{run_dir} holds checkpoints of an earlier run; pass --resume to continue it "
                                   "or choose another train.output_dir")
        if tc.threads:
            torch.set_num_threads(tc.threads)
        tokenizer = load_tokenizer(cfg.model.name_or_path)
        data = prepare_data(cfg, tokenizer)
        cfg.model.task = data.task  # "auto" resolved from the data, for the model and config.yaml
        self.data, self.tokenizer, self.info = data, tokenizer, info
        global_rows = tc.batch_size * info.world_size
        self.micro_per_epoch = math.ceil(len(data.train) / global_rows)
        steps_per_epoch = math.ceil(self.micro_per_epoch / tc.grad_accum)
        total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
        cfg.set_total_steps(total_steps)  # AdaLoRA's total_step when the lora section leaves it out
        self.num_labels = len(data.labels) if data.labels else None
        model = build_model(cfg, data.labels, run_dir if info.is_main else None, info.device)
        self.model = model
        self.params = [p for _, p in model.named_parameters() if p.requires_grad]
        trainable, total = model.get_nb_trainable_parameters()
        if info.is_main:
            ckpt.check_run_dir(run_dir, ckpt.checkpoint_bytes(trainable) * (tc.keep_last + 2))
            if self.resume and (run_dir / "config.yaml").is_file():
                changed = _changed_keys(yaml.safe_load((run_dir / "config.yaml").read_text()), cfg.resolved())
                if changed:
                    self.reporter.message(f"warning: resuming with changed config keys {changed}; an exact "
                                          "continuation needs the config the run started with")
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.resolved(), sort_keys=False))
        distributed.broadcast_params(self.params, info)
        if tc.parallel == "fsdp" and info.enabled:
            distributed.shard_model(model, info)
            self.params = [p for _, p in model.named_parameters() if p.requires_grad]  # now DTensors
            held, whole, kept = (n / 2**20 for n in distributed.held_bytes(model))
            self.reporter.message(f"fsdp: {info.world_size} processes, each holds {held:.4g} MiB of the model's "
                                  f"{whole:.4g} MiB ({kept:.4g} MiB of buffers and 4-bit quant states whole)")
        self.optimizer = build_optimizer(model, tc.lr, tc.weight_decay, tc.loraplus_lr_ratio, tc.adam_betas,
                                         tc.adam_eps)
        warmup = tc.warmup_steps or int(tc.warmup_ratio * total_steps)
        self.schedule = Schedule(total_steps, warmup, tc.schedule, tc.min_lr_ratio)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl") if info.is_main else None
        self.hooks = variant_hooks(model, tc.seed)
        self.state = self._start_state(run_dir)
        self.reporter.message(
            f"{model.trainable_parameters_report()}\n"
            f"data: {data.stats['train_examples']} training examples ({data.format}), "
            f"{len(data.eval) if data.eval else 0} eval; {data.stats['bad_records']} malformed records skipped, "
            f"{data.stats['truncated']} truncated, {data.stats['dropped']} with nothing left to learn; "
            f"{total_steps} steps of {global_rows * tc.grad_accum} rows"
            + (f"; resuming after step {self.state['step']}" if self.state["step"] else ""))
        for line in data.stats["bad_examples"]:
            self.reporter.message(f"skipped {line}")
        result = self._loop(run_dir, total_steps)
        result.trainable_params, result.total_params = trainable, total
        return result

    def _start_state(self, run_dir: Path) -> dict[str, Any]:
        fresh = {"step": 0, "epoch": 0, "batch": 0, "best": None, "tokens": 0,
                 "window": [0.0, 0, 0, 0.0]}  # loss sum, targets, tokens, grad-norm sum since the last log
        latest = ckpt.latest_checkpoint(run_dir) if self.resume else None
        if latest is None:
            if self.resume:
                self.reporter.message(f"no checkpoint in {run_dir}; starting from scratch")
            if self.metrics is not None:
                self.metrics.reset()
            torch.manual_seed(self.cfg.train.seed)
            random.seed(self.cfg.train.seed)
            return fresh
        tensors, saved = ckpt.load_checkpoint(latest)
        self.saved_step = saved["step"]
        named = dict(self.model.named_parameters())
        missing = [k for k in named if named[k].requires_grad and k not in tensors]
        if missing or set(tensors) - set(named):
            raise ConfigError(f"checkpoint {latest} does not fit this model (e.g. {missing[:2]}); was the lora or "
                              "model section changed? Resume with the config the run started with")
        self._check_layout(saved)
        with torch.no_grad():
            for key, value in tensors.items():
                named[key].copy_(distributed.like_param(value.to(named[key].dtype), named[key]))
        self.optimizer.load_state_dict(distributed.shard_optimizer_state(saved["optimizer"], self.optimizer))
        rng = saved["rng"][self.info.rank] if self.info.rank < len(saved["rng"]) else saved["rng"][0]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if torch.cuda.is_available() and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        if self.metrics is not None:
            self.metrics.truncate_after(saved["step"])
        for hook, hook_state in zip(self.hooks, saved.get("hooks") or [None] * len(self.hooks)):
            if hasattr(hook, "load_state_dict") and hook_state is not None:
                hook.load_state_dict(hook_state, self.model)
            elif saved["step"]:  # stateless hooks are a function of the step (DyLoRA's rank draw)
                hook.step(self.model, saved["step"] - 1)
        return {k: saved[k] for k in fresh}

    def _check_layout(self, saved: dict[str, Any]) -> None:
        """The data position is counted in global batches: the global batch must not change; the
        process count may (same data, same steps), with sums reduced in another order."""
        tc, info = self.cfg.train, self.info
        world = saved.get("world_size", info.world_size)
        rows = saved.get("global_rows", tc.batch_size * info.world_size)
        if rows != tc.batch_size * info.world_size:
            raise ConfigError(
                f"the checkpoint was written with a global batch of {rows} rows ({world} process(es)); now it "
                f"would be {tc.batch_size} × {info.world_size} = {tc.batch_size * info.world_size}. Keep the "
                f"global batch: set train.batch_size so that batch_size × processes = {rows}")
        if world != info.world_size:
            text = (f"warning: resuming a run saved by {world} process(es) with {info.world_size}: same data "
                    "and steps, but gradients and norms are summed in another order, so the result may "
                    "differ from an uninterrupted run in the last bits")
            if info.is_main:  # as the changed-config warning: once, through the reporter (the CLI prints it)
                self.reporter.message(text)

    # ------------------------------------------------------------------ the loop
    def _loop(self, run_dir: Path, total_steps: int) -> RunResult:
        tc, info, state, data = self.cfg.train, self.info, self.state, self.data
        lengths = [len(e.input_ids) for e in data.train]
        n_targets = [targets(e) for e in data.train]
        pad = pad_id(self.tokenizer)
        global_rows = tc.batch_size * info.world_size
        self.model.train()
        self.reporter.start(total_steps, state["step"])
        started, run_tokens = time.perf_counter(), 0
        order: tuple[int, list[list[int]]] | None = None
        self.stop.deferring = True  # from here a signal stops at the next step boundary, with a checkpoint
        while state["step"] < total_steps:
            if self.stop.signum is not None and not info.enabled:  # one process: don't start another step
                self._interrupted(run_dir, total_steps)
            if order is None or order[0] != state["epoch"]:
                order = (state["epoch"], epoch_batches(lengths, global_rows, tc.seed, state["epoch"],
                                                       self.cfg.data.group_by_length))
            micro = order[1][state["batch"]: state["batch"] + tc.grad_accum]
            state["batch"] += len(micro)
            if state["batch"] >= len(order[1]):
                state["epoch"], state["batch"] = state["epoch"] + 1, 0
            count = sum(n_targets[i] for rows in micro for i in rows)  # known to every process
            lr = tc.lr * self.schedule.factor(state["step"])
            self.schedule.apply(self.optimizer, state["step"])
            sums = torch.zeros(3, dtype=torch.float64)  # (loss sum, input tokens, stop requests) on this process
            for rows in micro:
                mine = rows[info.rank::info.world_size]
                weight = 1.0
                if not mine:
                    if not info.sharded:
                        continue
                    mine, weight = rows[:1], 0.0  # FSDP's gathers need every process in every forward
                batch = {k: v.to(info.device) for k, v in collate([data.train[i] for i in mine], pad).items()}
                with autocast(info.device, tc.dtype):
                    logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss_sum = summed_loss(logits, batch["labels"], self.num_labels) * weight
                (loss_sum / max(count, 1)).backward()
                sums[:2] += torch.tensor([loss_sum.item(), weight * float(batch["attention_mask"].sum())],
                                        dtype=torch.float64)
            # a signal seen by any process stops them all after this same step
            sums[2] = float(self.stop.signum is not None)
            sums = distributed.all_reduce_sum(sums.to(info.device), info).cpu()
            if not math.isfinite(float(sums[0])):
                self._diverged(run_dir, "loss", float(sums[0]), lr)
            extra = sum((h.extra_loss(self.model) for h in self.hooks), torch.zeros(()))
            if extra.requires_grad:  # a penalty on the weights (AdaLoRA): once per step, summed over ranks
                (extra / info.world_size).backward()
            distributed.all_reduce_grads(self.params, info)
            norm = clip_gradients(self.params, tc.max_grad_norm)
            if not math.isfinite(float(norm)):
                self._diverged(run_dir, "gradient norm", float(norm), lr)
            self.optimizer.step()
            for hook in self.hooks:  # after the update, before zero_grad: AdaLoRA reads the gradients
                hook.step(self.model, state["step"])
            self.optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"] += int(sums[1])
            run_tokens += int(sums[1])
            w = state["window"]
            state["window"] = [w[0] + float(sums[0]), w[1] + count, w[2] + int(sums[1]), w[3] + float(norm)]
            elapsed = time.perf_counter() - started
            tok_s = run_tokens / max(elapsed, 1e-9)
            self.reporter.update(state["step"], {"loss": float(sums[0]) / max(count, 1), "lr": lr, "tok/s": tok_s})
            self._after_step(run_dir, total_steps, lr, tok_s)
            if sums[2] > 0 and state["step"] < total_steps:
                self._interrupted(run_dir, total_steps)
        self.stop.deferring = False  # the run is complete: finish writing it
        elapsed = time.perf_counter() - started
        final = self._finish(run_dir, total_steps)
        self.reporter.close()
        return RunResult(run_dir, run_dir / "adapter", state["step"], final, state["best"],
                         run_tokens / max(elapsed, 1e-9), elapsed, data.stats)

    def _after_step(self, run_dir: Path, total_steps: int, lr: float, tok_s: float) -> None:
        tc, state, step = self.cfg.train, self.state, self.state["step"]
        last = step == total_steps
        if step % tc.log_every == 0 or last:
            w = state["window"]
            steps_in_window = step % tc.log_every or tc.log_every
            self._record({"step": step, "epoch": round(state["epoch"] + state["batch"] / self.micro_per_epoch, 4),
                          "loss": w[0] / max(w[1], 1), "lr": lr, "grad_norm": w[3] / steps_in_window,
                          "tokens": state["tokens"], "tokens_per_s": round(tok_s, 1)})
            state["window"] = [0.0, 0, 0, 0.0]
        evaluated = bool(self.data.eval) and ((tc.eval_every and step % tc.eval_every == 0) or last)
        if evaluated:
            self._evaluate(step)
        saved = (tc.save_every and step % tc.save_every == 0) or last
        if saved:
            self._save(run_dir)
        # redraw on news, at most every PLOT_SECONDS (matplotlib costs ~0.3 s); _finish draws the last one
        if (evaluated or saved) and not last and time.perf_counter() - self.plotted > PLOT_SECONDS:
            self._plot(run_dir)

    def _plot(self, run_dir: Path) -> None:
        if self.metrics is not None:
            plot_losses(self.metrics.records, run_dir / "loss.png", title=str(run_dir.name))
        self.plotted = time.perf_counter()

    def _evaluate(self, step: int, record: bool = True) -> dict[str, float]:
        tc = self.cfg.train
        metrics = evaluate(self.model, self.data.eval or [], tc.eval_batch_size or 2 * tc.batch_size,
                           pad_id(self.tokenizer), self.num_labels, self.info, tc.dtype)
        key, better = ("eval_accuracy", max) if self.num_labels else ("eval_loss", min)
        best = self.state["best"]
        if best is None or better(metrics[key], best["value"]) != best["value"]:
            self.state["best"] = {"step": step, "metric": key, "value": metrics[key]}
        self.last_eval = (step, metrics)
        if record:
            self._record({"step": step, **metrics})
        self.reporter.message(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def _record(self, record: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.append(record)

    def _save(self, run_dir: Path) -> None:
        info, state = self.info, self.state
        rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
               "cuda": torch.cuda.get_rng_state() if info.device.type == "cuda" else None}
        all_rng = distributed.gather_objects(rng, info)
        # sharded: every process takes part in gathering the whole tensors; rank 0 alone writes them
        optimizer = distributed.full_optimizer_state(self.optimizer) if info.sharded else self.optimizer.state_dict()
        with distributed.gathered_trainable(self.model, info) as trainable:
            if info.is_main:
                saved = {**{k: state[k] for k in ("step", "epoch", "batch", "best", "tokens", "window")},
                         "optimizer": optimizer, "schedule": self.schedule.state_dict(),
                         "rng": all_rng, "hooks": [h.state_dict() if hasattr(h, "state_dict") else None
                                                   for h in self.hooks],
                         "world_size": info.world_size, "global_rows": self.cfg.train.batch_size * info.world_size}
                ckpt.save_checkpoint(run_dir, state["step"], self.model, trainable, saved,
                                     {k: state[k] for k in ("step", "epoch", "batch", "best", "tokens")})
                best = state["best"]["step"] if state["best"] else -1
                ckpt.prune_checkpoints(run_dir, self.cfg.train.keep_last, {best})
        self.saved_step = state["step"]
        distributed.barrier(info)

    def _interrupted(self, run_dir: Path, total_steps: int) -> None:
        """Checkpoint the step boundary just reached (unless on disk already) and stop."""
        step = self.state["step"]
        saved = step > 0 and self.saved_step != step
        if saved:
            self._save(run_dir)
        self.reporter.close()
        signum = self.stop.signum if self.stop.signum is not None else int(signal.SIGTERM)  # another rank's
        raise TrainingInterrupted(signum, step, ckpt.latest_checkpoint(run_dir) if self.info.is_main else None,
                                  saved=saved, total_steps=total_steps)

    def _diverged(self, run_dir: Path, what: str, value: float, lr: float) -> None:
        step = self.state["step"] + 1
        latest = ckpt.latest_checkpoint(run_dir)
        self._record({"step": step, "event": "diverged", "what": what, "value": str(value)})
        raise TrainingDivergedError(
            f"the {what} became {value} at step {step} (lr {lr:.3g}); training stopped without applying it. "
            + (f"The last good checkpoint is {latest}; " if latest else "No checkpoint was written yet; ")
            + "lower train.lr, set train.max_grad_norm, or check the data, then run again"
            + (" with --resume." if latest else "."))

    def _finish(self, run_dir: Path, total_steps: int) -> dict[str, float]:
        final: dict[str, float] = {}
        if self.data.eval:
            done = self.last_eval is not None and self.last_eval[0] == total_steps
            # a resumed finished run evaluates again (same numbers) but must not log the line twice
            logged = self.metrics is not None and any(
                r.get("step") == total_steps and any(str(k).startswith("eval_") for k in r)
                for r in self.metrics.records)
            final = self.last_eval[1] if done else self._evaluate(total_steps, record=not logged)  # type: ignore[index]
        with distributed.gathered_trainable(self.model, self.info):
            if self.info.is_main:
                write_final(self.model, self.tokenizer, self.cfg, self.data, run_dir)
        if self.info.is_main:
            self._plot(run_dir)
            if self.metrics is not None:
                (run_dir / "summary.json").write_text(json.dumps(
                    {"steps": self.state["step"], "final": final, "best": self.state["best"],
                     "data": self.data.stats}, indent=2) + "\n")
        distributed.barrier(self.info)
        return final


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Clip the global gradient norm (a plain tensor, also when the gradients are FSDP shards)."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = distributed.full_tensor(torch.nn.utils.get_total_norm(grads, foreach=False))
    torch.nn.utils.clip_grads_with_norm_(params, max_norm or math.inf, norm, foreach=False)
    return norm


def variant_hooks(model: Any, seed: int) -> list[Any]:
    """Per-step hooks of variant adapters (AdaLoRA budget, DyLoRA rank draw); none for plain LoRA."""
    from lorakit.core.variants import training_hooks

    return list(training_hooks(model, seed=seed))


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def train(config: TrainConfig, resume: bool = False, reporter: Reporter | None = None,
          handle_signals: bool = True) -> RunResult:
    """Run a training job; see :class:`Trainer`."""
    return Trainer(config, resume, reporter, handle_signals).run()


__all__ = ["Prepared", "Reporter", "RunResult", "Trainer", "TrainingDivergedError", "TrainingInterrupted", "train"]
