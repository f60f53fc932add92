"""The training loop: one code path for every engine.

    result = train(load_config("configs/tiny-cpu.yaml"), resume="auto")

Order of a run: join the job (engine ``setup``) -> tokenizer -> prepared model (identical on every
rank, checked) -> engine (shards, optimizer, schedule) -> data -> resume -> steps. A step is
``train.grad_accum`` micro-batches of ``forward_backward`` then one ``engine.step()``; logging,
validation, checkpoints and the preemption check happen between steps only, so a checkpoint never
holds a half-accumulated step. A step whose loss or global grad norm is not finite is skipped on every
rank (:mod:`lrqat_dist.train.nonfinite`); SIGTERM/SIGINT save and stop (:mod:`lrqat_dist.train.preemption`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..checkpoint import (CHECKPOINTS, CONFIG_FILE, TOKENIZER_DIR, Checkpointer, capture_rng, list_checkpoints,
                          require_meta, resolve_resume, restore_rng)
from ..checkpoint.checkpointer import load_rank_state
from ..checkpoint.elastic import restore_data
from ..checkpoint.shared_fs import check_shared_output_dir
from ..checkpoint.warm_start import load_weights_only, weights_only_checkpoint
from ..data import build_train_loader, build_val_loader
from ..engines import DistEnv, Engine, EngineConfig, get_engine, resolve_dtype
from ..engines.optim import SCHEDULE_KEYS, schedule_change
from ..methods.hooks import group_windows, training_hooks
from ..model.frozen_state import check_frozen_fingerprint, frozen_fingerprint
from ..objective import build_objective
from .build import buffer_fingerprint, build_tokenizer, build_train_model, enable_activation_checkpointing
from .config import JobConfig, dump_config, parse_yaml
from .metrics import MetricsLogger, peak_memory_gb
from .nonfinite import NanInjection, NonfiniteGuard
from .preemption import PreemptionGuard

logger = logging.getLogger(__name__)


def default_train_loader(cfg: JobConfig, tokenizer: Any, env: DistEnv) -> Any:
    return build_train_loader(cfg.data, tokenizer, micro_batch_size=cfg.train.micro_batch_size,
                              rank=env.rank, world_size=env.world_size, seed=cfg.train.seed)


def default_val_loader(cfg: JobConfig, tokenizer: Any, env: DistEnv) -> Any | None:
    if cfg.train.val_every == 0:
        return None
    return build_val_loader(cfg.data, tokenizer, micro_batch_size=cfg.train.micro_batch_size,
                            rank=env.rank, world_size=env.world_size)


@dataclass
class Builders:
    """How a run gets its parts from the config. Swap one to plug in something else (the tests use a
    synthetic train loader); each must give the same result on every rank where the docs say so."""

    tokenizer: Callable[[JobConfig, Path | None], Any] = build_tokenizer
    model: Callable[[JobConfig, torch.device], nn.Module] = build_train_model
    train_loader: Callable[[JobConfig, Any, DistEnv], Any] = default_train_loader
    val_loader: Callable[[JobConfig, Any, DistEnv], Any | None] = default_val_loader


@dataclass
class TrainResult:
    """How a run ended."""

    step: int  # optimizer steps completed
    preempted: bool  # stopped by SIGTERM/SIGINT (after saving)
    checkpoint: Path | None  # last checkpoint written or resumed from
    output_dir: Path


StepHook = Callable[[int], None]


def train(cfg: JobConfig, resume: str | None = "auto", builders: Builders | None = None,
          on_step: StepHook | None = None) -> TrainResult:
    """Run (or continue) the training job ``cfg``; every rank of the job calls this.

    resume:       ``auto`` (newest complete checkpoint in ``train.output_dir``, else start fresh),
                  ``none``, a checkpoint directory (written on any number of ranks: see
                  :mod:`lrqat_dist.checkpoint.elastic`), or ``weights:CKPT`` (a checkpoint or run
                  directory: its trained tensors only, fresh optimizer, schedule and data, step 0).
    on_step:      called on every rank with the step number right after each optimizer step, before
                  that step's preemption check, logging, validation and checkpoint.
    """
    return Trainer(cfg, builders or Builders()).run(resume, on_step)


@dataclass
class _Window:
    """What accumulates between two log lines."""

    steps: int = 0
    loss_sum: float = 0.0  # over the steps that were applied (a skipped step's loss is not finite)
    loss_steps: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # seconds spent validating / checkpointing: not billed to throughput

    def reset(self) -> None:
        self.steps, self.loss_sum, self.loss_steps, self.tokens = 0, 0.0, 0, 0
        self.start, self.paused = time.perf_counter(), 0.0


class Trainer:
    """Builds every part of a run (collectively) and runs its steps."""

    def __init__(self, cfg: JobConfig, builders: Builders):
        self.cfg = cfg
        engine_cls = get_engine(cfg.dist.engine)
        engine_cfg = EngineConfig(cfg.train, cfg.dist, lr_windows=group_windows(cfg.quant))
        self.env = env = engine_cls.setup(engine_cfg)
        self.output_dir = Path(cfg.train.output_dir)
        check_shared_output_dir(self.output_dir, env)
        self.config_text = dump_config(cfg)
        self._write_config()
        self.tokenizer = self._collective_first(lambda: builders.tokenizer(cfg, self.output_dir / TOKENIZER_DIR))
        self.dtype = resolve_dtype(cfg.train, env.device)
        model = builders.model(cfg, env.device)
        self._check_same_model(model)
        # Before any sharding: stored in every checkpoint's meta.json, compared on resume and export.
        self.frozen_fingerprint = frozen_fingerprint(model, self.dtype, env.rank, env.world_size, env.all_gather)
        self.nan_injection = NanInjection.from_env(env.rank)  # a test hook; None unless its variable is set
        if self.nan_injection is not None:
            self.nan_injection.install(model)
        if cfg.train.activation_checkpointing:
            enable_activation_checkpointing(model)
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before any sharding
        # CE, or CE + distillation (train.distill): checks the phi0 teacher exists / loads the external one.
        objective = build_objective(cfg.train.distill, model, cfg.quant.method, self.dtype, env.device,
                                    cfg.model.attn_implementation)
        self.engine: Engine = engine_cls(model, engine_cfg, env)
        self.engine.objective = objective
        # The method's between-step work (DL-QAT phase switch, LoQT merges), on every rank.
        self.hooks = training_hooks(model, cfg.quant, cfg.train.max_steps)
        self.train_loader = builders.train_loader(cfg, self.tokenizer, env)
        self.val_loader = builders.val_loader(cfg, self.tokenizer, env)
        self.checkpointer = Checkpointer(self.output_dir, env, cfg.train.keep_last, self.config_text)
        # Nothing in an LLaMA step draws random numbers today; seeded per rank (and checkpointed) for what might.
        torch.manual_seed(cfg.train.seed + env.rank)
        logger.info("engine=%s world_size=%d device=%s dtype=%s trainable=%d tensors (%.2fM values)",
                    engine_cls.name, env.world_size, env.device, self.dtype, len(self.engine.trainable_names),
                    n_trainable / 1e6)

    # --- setup helpers --------------------------------------------------------------------------
    def _collective_first(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the main rank first (it may fill a cache), then on the others."""
        out = fn() if self.env.is_main else None
        self.env.barrier()
        return out if self.env.is_main else fn()

    def _write_config(self) -> None:
        """Refuse to continue a run dir whose model/quant differ; then write the resolved config."""
        error = None
        if self.env.is_main:
            path = self.output_dir / CONFIG_FILE
            if path.is_file():
                old = parse_yaml(path.read_text()) or {}
                new = self.cfg.to_dict()
                changed = [s for s in ("model", "quant") if old.get(s) != new[s]]
                if changed and (self.output_dir / CHECKPOINTS).is_dir():
                    error = (f"{path}: this output_dir holds a run with a different '{changed[0]}' section; "
                             "use a new train.output_dir")
            if error is None:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                path.write_text(self.config_text)
        error = self.env.broadcast_object(error)
        if error:
            raise ValueError(error)

    def _check_same_model(self, model: nn.Module) -> None:
        # Frozen buffers are built, not broadcast: a rank that built different ones would train silently wrong.
        prints = self.env.all_gather(buffer_fingerprint(model))
        bad = [r for r, fp in enumerate(prints) if not torch.equal(fp, prints[0])]
        if bad:
            raise RuntimeError(f"ranks {bad} built different frozen buffers than rank 0 (same config and "
                               "base model on every rank? deterministic range init on this hardware?)")

    # --- the run --------------------------------------------------------------------------------
    def run(self, resume: str | None, on_step: StepHook | None = None) -> TrainResult:
        # Signals are caught from here on: one that arrives while resuming or validating stops the run at
        # the end of its first step, with a checkpoint.
        with PreemptionGuard() as guard:
            return self._run(guard, resume, on_step)

    def _run(self, guard: PreemptionGuard, resume: str | None, on_step: StepHook | None) -> TrainResult:
        cfg, env = self.cfg, self.env
        found = None
        if env.is_main:
            try:
                weights = weights_only_checkpoint(resume)  # weights:CKPT, a fresh run from its A, B, s
                if weights and list_checkpoints(self.output_dir, warn=False):
                    # a preempted weights-only run requeued with the same command: continue it
                    logger.warning("%s already holds checkpoints of this run: resuming the newest instead of "
                                   "starting again from %s (the weights: source only starts a fresh output_dir)",
                                   self.output_dir, weights)
                    weights, resume = None, "auto"
                found = ("ok", None if weights else resolve_resume(resume, self.output_dir))
                if found[1] is None and list_checkpoints(self.output_dir, warn=False):
                    found = ("error", f"{self.output_dir} already holds checkpoints; resume them (--resume auto) "
                                      "or train into a new train.output_dir")
                elif weights:
                    found = ("weights", weights)
            except FileNotFoundError as e:
                found = ("error", str(e))
        status, ckpt = env.broadcast_object(found)
        if status == "error":
            raise FileNotFoundError(ckpt)
        step, self.tokens_seen = 0, 0
        self.nonfinite = NonfiniteGuard(cfg.train.max_nonfinite)
        if status == "weights":  # A, B, s trained on top of the frozen state: it must be the same one
            check_frozen_fingerprint(require_meta(ckpt).get("frozen_fingerprint"), self.frozen_fingerprint,
                                     f"--resume weights:{ckpt}", cfg.train.accept_changed_base_model)
            load_weights_only(ckpt, self.engine, env)
            ckpt = None
        if ckpt is not None:
            check_frozen_fingerprint(require_meta(ckpt).get("frozen_fingerprint"), self.frozen_fingerprint,
                                     f"resume from {ckpt}", cfg.train.accept_changed_base_model)
            meta, rank_state = self.checkpointer.load(ckpt, self.engine)
            # re-dealt on another world size or data.num_workers
            restore_data(self.train_loader, ckpt, meta, env, rank_state, load_rank_state)
            restore_rng(rank_state["rng"], env.device)
            step, self.tokens_seen = int(meta["step"]), int(meta.get("tokens_seen", 0))
            if env.is_main:
                self._warn_schedule_change(Path(ckpt), step)
            self.nonfinite.total = int(meta.get("nonfinite_skipped", 0))
        metrics = MetricsLogger(self.output_dir, env.is_main, cfg.log.tensorboard, cfg.log.progress_bar,
                                step, cfg.train.max_steps)
        last_ckpt, preempted = ckpt, False
        self._last_save = time.monotonic()
        try:
            if step == 0 and self.val_loader is not None:
                metrics.log(0, self.validate())
            self.engine.train()
            batches = iter(self.train_loader)
            window = _Window()
            while step < cfg.train.max_steps:
                step += 1
                if self.hooks is not None:
                    self.hooks.before_step(step, self.engine)
                if self.nan_injection is not None:
                    self.nan_injection.before_step(step)
                grad_norm, lrs, loss = self._train_step(batches, window)
                self.nonfinite.record(step, self.engine.last_step_skipped, loss, grad_norm)
                if self.hooks is not None:
                    self.hooks.after_step(step, self.engine)
                if on_step is not None:
                    on_step(step)
                # One all-reduce: any rank signalled, any rank's save clock ran out -> every rank acts.
                preempted, timed_save = (v > 0 for v in env.all_reduce(
                    [float(guard.requested is not None), float(self._save_time_due())], "max"))
                save = self._should_save(step) or timed_save or preempted
                record: dict[str, Any] = {}
                if save or step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                    record.update(self._log_record(window, lrs, grad_norm))  # also closes the window
                if cfg.train.val_every and step % cfg.train.val_every == 0:
                    record.update(self._timed(window, self.validate))
                metrics.log(step, record)
                metrics.advance()
                if save:
                    last_ckpt = self._timed(window, lambda: self.save(step))
                    # A signal that came during the save: the checkpoint of this step is it, stop now.
                    preempted = preempted or env.any(guard.requested is not None)
                if preempted:
                    metrics.write(f"preempted: saved {last_ckpt}, exiting at step {step}")
                    break
        finally:
            metrics.close()
            self.engine.close()
        return TrainResult(step=step, preempted=preempted, checkpoint=last_ckpt, output_dir=self.output_dir)

    def _warn_schedule_change(self, ckpt: Path, step: int) -> None:
        """A resume with another train.max_steps (or warmup/schedule/min_lr_ratio) silently reshapes the
        LR schedule from the resumed step on: say so, with the lr factor before and after."""
        path = ckpt / CONFIG_FILE
        saved = (parse_yaml(path.read_text()) or {}).get("train") or {} if path.is_file() else {}
        old = {k: saved[k] for k in SCHEDULE_KEYS if k in saved}
        message = schedule_change(dataclasses.replace(self.cfg.train, **old), self.cfg.train, step)
        if message:
            logger.warning("%s: %s", ckpt, message)

    def _save_time_due(self) -> bool:
        minutes = self.cfg.train.save_every_minutes
        return minutes is not None and time.monotonic() - self._last_save >= minutes * 60

    def _train_step(self, batches, window: _Window) -> tuple[float | None, dict[str, float], float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns (grad norm, lrs it used, this
        rank's mean loss). ``engine.last_step_skipped`` tells whether it was skipped as non-finite."""
        cfg, env = self.cfg, self.env
        lrs = self.engine.lrs()
        losses, tokens = [], 0
        for micro in range(cfg.train.grad_accum):
            input_ids = next(batches)["input_ids"].to(env.device, non_blocking=True)
            losses.append(self.engine.forward_backward(input_ids, last_micro=micro == cfg.train.grad_accum - 1))
            tokens += input_ids.numel() * env.world_size  # every rank takes equally shaped blocks
        grad_norm = self.engine.step()
        self.tokens_seen += tokens
        window.tokens += tokens
        window.steps += 1
        loss = float(torch.stack(losses).mean())
        if not self.engine.last_step_skipped:
            window.loss_sum += loss
            window.loss_steps += 1
        return grad_norm, lrs, loss

    @staticmethod
    def _timed(window: _Window, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (validation, checkpoint) without billing its time to the throughput window."""
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            window.paused += time.perf_counter() - t0

    def _log_record(self, window: _Window, lrs: dict[str, float], grad_norm: float | None) -> dict[str, Any]:
        env = self.env
        skips = self.train_loader.skip_counts()
        kinds = sorted(skips)
        sums = env.all_reduce([window.loss_sum] + [float(skips[k]) for k in kinds])
        # (the same steps are skipped on every rank, so loss_steps is too)
        (peak,) = env.all_reduce([peak_memory_gb(env.device)], "max")
        elapsed = time.perf_counter() - window.start - window.paused
        record = {
            "loss": sums[0] / env.world_size / window.loss_steps if window.loss_steps else None,
            "lr": lrs.get("adapters"),  # None for PEQA (scales only)
            "scale_lr": lrs.get("scales"),
            "grad_norm": grad_norm,
            "tokens_per_s": window.tokens / elapsed if elapsed > 0 else None,
            "step_time_s": elapsed / window.steps,
            "tokens_seen": self.tokens_seen,
            "peak_mem_gb": peak,
            "data_skips": {k: int(v) for k, v in zip(kinds, sums[1:])},
            "nonfinite_skipped": self.nonfinite.total,  # steps skipped as non-finite, whole run
        }
        window.reset()
        return record

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Next-token loss and perplexity over the holdout blocks, summed over all ranks."""
        if self.val_loader is None:
            return {}
        limit = self.cfg.train.val_batches
        self.engine.train(False)
        total, count = 0.0, 0
        for i, batch in enumerate(self.val_loader):  # the same number of batches on every rank
            if limit is not None and i >= limit:
                break
            s, n = self.engine.eval_loss_sum(batch["input_ids"].to(self.env.device))
            total, count = total + s, count + n
        self.engine.train(True)
        total, count = self.env.all_reduce([total, float(count)])
        val_loss = total / count
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0)), "val_tokens": int(count)}

    def _should_save(self, step: int) -> bool:
        t = self.cfg.train
        return bool(t.save_every and step % t.save_every == 0) or (step == t.max_steps and t.save_final)

    def save(self, step: int) -> Path:
        """Checkpoint after ``step`` (collective)."""
        rank_state = {"data": self.train_loader.state_dict(), "rng": capture_rng(self.env.device)}
        meta = {"tokens_seen": self.tokens_seen, "dtype": str(self.dtype).replace("torch.", ""),
                "frozen_fingerprint": self.frozen_fingerprint, "nonfinite_skipped": self.nonfinite.total}
        path = self.checkpointer.save(step, self.engine, rank_state, meta)
        self._last_save = time.monotonic()
        return path
