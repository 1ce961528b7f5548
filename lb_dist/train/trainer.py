"""The training loop of ``lb-dist train``: one code path for every backend (see backends.py).

Order of one optimizer step (global step t, counted from 0; the step record says ``step = t + 1``):

1. fetch this rank's A micro-batches of the step (``sampling.BatchLayout``);
2. N = number of samples (images) or target tokens (translation) in the global batch (one scalar
   all-reduce for translation);
3. CLARS with ``--clars-moments per-sample``: S_k on the global subset J of the step's first
   micro-batches (``lb_dist.moments.per_sample_second_moments``, a collective);
4. per micro-batch j: ``loss_j = (K/N) sum_{b in j} w_b l_b`` (w_b = 1 or the sample-wise GradientMix
   weights), backward (the engine reduces and mixes on the last one and feeds the moments);
5. ``engine.finish_gradients()``; ``engine.optimizer_step()`` skips a step with a non-finite
   gradient (the layer-wise optimizers skip by themselves; torch's SGD/Adam are checked by the
   engine; DeepSpeed by its own global-norm check), the mix advances and the schedule too, either way;
6. logging, checkpoints.

The epoch ends with the evaluation, its record and a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from lb_dist.train.backends import Backend, Engine
from lb_dist.train.checkpoint import (FORMAT, CheckpointError, checkpoint_path, latest_checkpoint, list_checkpoints,
                                      load_checkpoint, prune_checkpoints, verify_checkpoint, write_manifest)
from lb_dist.train.config import RUN_DEFINING, check_layout, to_dict
from lb_dist.train.metrics import MetricsLogger
from lb_dist.train.optimizers import build_optimizer, build_scheduler, optimizer_groups, peak_lr, warmup_steps
from lb_dist.train.run_config import RunConfig
from lb_dist.train.sampling import BatchLayout, StepBatchSampler
from lb_dist.train.workloads import build_workload

__all__ = ["run_training", "Trainer", "StepRunner", "build_components", "MAX_CONSECUTIVE_SKIPS", "TrainingDiverged",
           "RankFailed"]

#: Abort (with an error, after a checkpoint of the last good state exists) after this many
#: consecutive optimizer steps with non-finite gradients.
MAX_CONSECUTIVE_SKIPS = 50


class TrainingDiverged(RuntimeError):
    pass


class RankFailed(RuntimeError):
    """Another rank failed in a step every rank agrees on (resume, checkpoint): this rank stops too.
    ``quiet``: the failing rank prints the error itself (``lb-dist train`` prints it once)."""

    def __init__(self, message: str, quiet: bool = True) -> None:
        super().__init__(message)
        self.quiet = quiet


def _agree(backend: Backend, fn):
    """``fn()`` on every rank, then one all-gather of each rank's outcome: an error on any rank ends
    every rank here (the failing rank re-raises its own error, the others raise :class:`RankFailed`
    naming it), so that no rank goes on to wait in a collective for a rank that already left.
    ``fn`` must not end in a collective that a failing rank would skip."""
    error = None
    result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - every error ends the job; its type is kept for the failing rank
        error = e
    if backend.world_size > 1:
        outcome = None if error is None else f"{type(error).__name__}: {str(error) or 'no detail'}"
        failed = [(r, m) for r, m in enumerate(backend.all_gather_object(outcome)) if m is not None]
        if failed and error is None:
            rank, message = failed[0]
            raise RankFailed(f"rank {rank} failed: {message}")
    if error is not None:
        raise error
    return result


class _RankParser:
    """``error(message)``: argparse-style error (exit status 2) printed once (rank 0); a plain
    ``ValueError`` when the namespace did not come from :func:`lb_dist.train.config.parse_args`."""

    def __init__(self, args, backend) -> None:
        self.parser = getattr(args, "parser", None)
        self.is_main = backend.is_main

    def error(self, message: str):
        if self.parser is None:
            raise ValueError(message)
        if self.is_main:
            self.parser.error(message)
        sys.stdout.flush()
        sys.exit(2)


def _fail(args, backend, flag_message: str):
    """A flag that does not fit the world size, the data or the checkpoint: see :class:`_RankParser`."""
    _RankParser(args, backend).error(flag_message)


def _micro_batches(workload, layout: BatchLayout, epoch: int, seed: int, start_step: int, workers: int, device):
    sampler = StepBatchSampler(layout, len(workload.train), epoch, seed, start_step)
    ds = workload.train
    if workers == 0 and hasattr(ds, "get_batch") and workload.collate is None:
        for idx in sampler:
            yield ds.get_batch(idx)
        return
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, collate_fn=workload.collate,
                        pin_memory=device.type == "cuda")
    yield from loader


def _eval_batches(workload, backend: Backend, batch_size: int, workers: int, ds=None):
    """This rank's share (indices rank::K) of the test split (or of ``ds``), all of it, in batches."""
    ds = workload.test if ds is None else ds
    n = len(ds)
    mine = list(range(backend.rank, n, backend.world_size))
    chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    if workers == 0 and hasattr(ds, "get_batch") and workload.collate is None:
        return (ds.get_batch(c) for c in chunks)
    return DataLoader(ds, batch_sampler=chunks, num_workers=workers, collate_fn=workload.collate)


def _check_resume_config(args, backend, saved: dict, path: Path) -> None:
    current = to_dict(args)
    for key in RUN_DEFINING:
        if key in saved and saved[key] != current.get(key):
            flag = "--" + key.replace("_", "-")
            _fail(args, backend, f"argument {flag}: {current.get(key)!r} differs from {saved[key]!r} in the checkpoint "
                                 f"{path} of this run directory; resume with the same flags, or use a new --run-dir")


def _seed(value: int) -> int:
    """A derived seed as torch takes it (64 bits): ``value`` itself for the usual small seeds."""
    return value % (1 << 63)


def _rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class StepRunner:
    """One optimizer step of the loop (docstring of this module, items 2-5), on the pieces built by
    :func:`build_components`. Shared by :func:`run_training` and benchmarks/bench_workloads.py, so that
    the benchmark times exactly the training step of ``lb-dist train``. Reads the typed ``config``
    (:class:`lb_dist.train.run_config.RunConfig`; built from ``args`` when not given)."""

    def __init__(self, args: argparse.Namespace, backend: Backend, engine: Engine, layout: BatchLayout, task, *,
                 config: RunConfig | None = None) -> None:
        self.config = RunConfig.from_args(args) if config is None else config
        self.args, self.backend, self.engine, self.layout, self.task = args, backend, engine, layout, task
        self.model, self.optimizer, self.moments, self.mix = engine.model, engine.optimizer, engine.moments, engine.mix
        self.layerwise = hasattr(self.optimizer, "last_step_skipped")
        self.per_sample = self.config.per_sample_moments      # CLARS' spec with source per_sample, or None
        self.sample_mix = self.config.mix is not None and self.config.mix.granularity == "sample"
        self.adapted = engine.adapted_params()

    def run(self, micro: list, step: int) -> dict:
        """Train on this rank's micro-batches (already on the device) as optimizer step ``step``
        (0-based, global). Returns ``{"sums": [loss sum, count] of this rank (float64, on the device),
        "skipped", "lr", "mix_step", "per_sample": per-sample statistics | None}``."""
        data, backend, engine, task = self.config.data, self.backend, self.engine, self.task
        optimizer, mix = self.optimizer, self.mix
        K, A = backend.world_size, len(micro)
        if task.counts_are_constant:
            total_count = float(data.batch_size)
        else:
            local = torch.stack([task.count_tensor(b).to(backend.device, torch.float64) for b in micro]).sum()
            total_count = float(backend.all_reduce_sum(local.reshape(1)).item())  # one host sync per step
        ps_stats = None
        if self.per_sample is not None:
            gen = torch.Generator().manual_seed(_seed(data.seed * 7919 + step * 104729 + backend.rank))
            x, y = micro[0]
            ps_stats = engine.per_sample_second_moments(task.mean_loss_fn(), x, y,
                                                        subset_size=self.per_sample.subset_size,
                                                        chunk_size=self.per_sample.chunk_size, params=self.adapted,
                                                        generator=gen)
        sums = torch.zeros(2, dtype=torch.float64, device=backend.device)  # no host sync per micro-batch
        for j, batch in enumerate(micro):
            with engine.accumulate(last=(j == A - 1)):
                losses, counts = task.losses(engine.forward_module, batch)
                if self.sample_mix:
                    w = mix.sample_weights(self.layout.positions(j), data.batch_size).to(losses.device, losses.dtype)
                    weighted = (losses * w).sum()
                else:
                    weighted = losses.sum()
                engine.backward(weighted * (K / total_count))
            sums += torch.stack([losses.detach().sum().double(), counts.sum().double()]).to(sums.device)
        engine.finish_gradients()
        lr_used = optimizer.param_groups[0]["lr"]
        mix_step = mix.step if mix is not None else None
        skipped = engine.optimizer_step()
        engine.zero_grad()
        return {"sums": sums, "skipped": skipped, "lr": lr_used, "mix_step": mix_step, "per_sample": ps_stats}


def build_components(args: argparse.Namespace, backend: Backend, workload, layout: BatchLayout, total_steps: int,
                     warmup: int, *, config: RunConfig | None = None) -> dict:
    """Model (seeded, on the device), optimizer (+ CLARS' micro-batch estimator), GradientMix (attached
    to the optimizer), the backend's :class:`Engine`, the schedule over the engine's optimizer, and the
    :class:`StepRunner`. The returned ``optimizer``, ``moments`` and ``mix`` are the engine's (a backend
    may replace them by its own, e.g. DeepSpeed's ZeRO-aware optimizer). ``config``: the run's
    :class:`RunConfig` (built from ``args`` when not given)."""
    config = RunConfig.from_args(args) if config is None else config
    seed = config.data.seed
    torch.manual_seed(seed)  # the same initial model on every rank (DDP also broadcasts rank 0's)
    model = workload.build_model().to(backend.device)
    torch.manual_seed(_seed(seed * 1000003 + 7919 * backend.rank + 1))  # per-rank streams: dropout, augmentation
    extra = {}
    if backend.builds_layerwise_optimizer and config.optimizer is not None:
        # the backend builds lb_dist's optimizer from the typed spec (DeepSpeed): none is built here
        optimizer, moments = None, None
        extra["param_groups"] = optimizer_groups(args, model)
    else:
        optimizer, moments = build_optimizer(args, model, peak_lr(args), local_batch_size=layout.local_batch_size)
    spec = config.mix
    mix = None
    if spec is not None:
        mix = spec.build()
        if optimizer is not None:
            mix.attach(optimizer)
    engine = backend.prepare(model, optimizer, mix=mix, moments=moments, local_batch_size=layout.local_batch_size,
                             accumulation_steps=layout.accumulation_steps, args=args, config=config, **extra)
    scheduler = build_scheduler(args, engine.optimizer, total_steps, warmup)
    runner = StepRunner(args, backend, engine, layout, workload.task, config=config)
    return {"model": engine.model, "optimizer": engine.optimizer, "moments": engine.moments, "scheduler": scheduler,
            "mix": engine.mix, "engine": engine, "runner": runner}


def run_training(args: argparse.Namespace, backend: Backend) -> dict:
    """Train with ``args`` (from :func:`lb_dist.train.config.parse_args`) on a started ``backend``.
    Returns a summary ``{"step", "epochs_done", "stopped", "last_epoch": record | None, "run_dir"}``.

    Rank 0 holds the run directory's lock for the whole run (a second live job on it is refused,
    naming the holder); under a launcher every rank stops when the launcher is gone
    (``lb_dist.train._process``)."""
    from lb_dist.train._process import RunDirLock, RunDirLocked, stop_with_launcher

    if backend.world_size > 1:
        stop_with_launcher()
    check_layout(_RankParser(args, backend), args, backend.world_size)
    message = backend.check_args(args)     # what the backend's capabilities do not cover
    if message:
        _fail(args, backend, message)
    config = RunConfig.from_args(args)     # the typed sections the loop reads (args: the run's record)
    run_dir = config.checkpoint.run_dir
    for d in (run_dir, run_dir / "checkpoints"):
        if d.exists() and not d.is_dir():
            _fail(args, backend, f"argument --run-dir: {d} is a file, not a directory; give another --run-dir or "
                                 f"move the file away")
    lock, problem = None, None
    if backend.is_main:
        try:
            lock = RunDirLock(run_dir).acquire()
        except RunDirLocked as e:
            problem = str(e)
    problem = backend.broadcast_object(problem)
    if problem is not None:
        raise RunDirLocked(problem) if backend.is_main else RankFailed(f"rank 0 failed: {problem}")
    try:
        return Trainer(args, backend, config=config).run()
    finally:
        if lock is not None:
            lock.release()


class Trainer:
    """One run of ``lb-dist train`` on a started backend, in named steps (each a method):

    * :meth:`find_checkpoint`: rank 0 picks the run directory's latest checkpoint and verifies it;
    * :meth:`build`: data, model, optimizer, GradientMix, the backend's engine, the schedule;
    * :meth:`resume` (or :meth:`write_config` on a fresh run directory);
    * per epoch :meth:`train_epoch` (optimizer steps: :class:`StepRunner`, :meth:`log_step`,
      mid-epoch checkpoints), then :meth:`evaluate`, :meth:`log_epoch` and :meth:`checkpoint`;
    * :meth:`finish`: the summary.

    :meth:`run` does them in this order (``run_training`` holds the run directory's lock around it).

    The loop reads the typed :class:`lb_dist.train.run_config.RunConfig` (``self.config``: ``config``,
    or built here from ``args``); ``args`` stays the run's record (config.json, the checkpoints' ``config``, the
    resume comparison) and what the workload, optimizer, schedule and backend are built from."""

    def __init__(self, args: argparse.Namespace, backend: Backend, *, config: RunConfig | None = None) -> None:
        self.args, self.backend = args, backend
        self.config = config = RunConfig.from_args(args) if config is None else config
        self.run_dir = config.checkpoint.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        data = config.data
        self.layout = BatchLayout(data.batch_size, backend.world_size, backend.rank, data.accumulation_steps)
        # progress (restored by resume, saved by checkpoint)
        self.step = 0
        self.elapsed = 0.0
        self.skipped_total = 0
        self.consecutive_skips = 0
        # (loss sum, count) of the current epoch, this rank; on the device, read at log steps and checkpoints
        self.epoch_sums = torch.zeros(2, dtype=torch.float64, device=backend.device)
        self.epoch_noise: list[float] = []     # global gradient noise scales logged this epoch (main rank)
        self.steps_this_invocation = 0
        self.stopped = False
        self.last_epoch_record = None
        self.latest: str | None = None
        self.resume_state: dict | None = None

    # ------------------------------------------------------------------------------- the run
    def run(self) -> dict:
        if self.config.backend.num_threads is not None:
            torch.set_num_threads(self.config.backend.num_threads)
        self.find_checkpoint()
        self.build()
        if self.resume_state is not None:
            self.resume()
        else:
            self.write_config()
        self.logger = MetricsLogger(self.run_dir, enabled=self.backend.is_main,
                                    resume_step=self.step if self.resume_state is not None else None,
                                    tensorboard=self.config.logging.tensorboard)
        self.model.train()
        while self.step < self.total_steps:
            epoch = self.step // self.steps_per_epoch
            epoch_start = (self.elapsed, self.step)
            if self.train_epoch(epoch):
                self.stopped = True
                break
            result, eval_time = self.evaluate()
            self.log_epoch(epoch, result, eval_time, *epoch_start)
            self.checkpoint(self.step)
            if self.stop_requested() and self.step < self.total_steps:
                self.stopped = True
                break
        return self.finish()

    def stop_requested(self) -> bool:
        """``--stop-after-steps N`` reached in this invocation."""
        n = self.config.checkpoint.stop_after_steps
        return n is not None and self.steps_this_invocation >= n

    # ------------------------------------------------------------------------------- setup
    def find_checkpoint(self) -> None:
        """Which checkpoint: rank 0 decides and verifies its checksums; every rank reads the same file."""
        args, backend = self.args, self.backend
        latest, problem = None, None
        if backend.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            latest = latest_checkpoint(self.ckpt_dir)
            latest = None if latest is None else str(latest)
            if latest is not None:
                try:
                    verify_checkpoint(latest)
                except CheckpointError as e:
                    problem = str(e)
        latest, problem = backend.broadcast_object((latest, problem))
        if problem is not None:
            raise CheckpointError(problem) if backend.is_main else RankFailed(f"rank 0 failed: {problem}")
        if latest is not None and self.config.checkpoint.resume == "never":
            _fail(args, backend, f"argument --resume: never, but {args.run_dir} already holds checkpoints ({latest}); "
                                 f"use a new --run-dir or --resume auto")
        self.latest = latest
        if latest is not None:
            self.resume_state = _agree(backend, lambda: load_checkpoint(latest, required=("trainer", "config")))
            _check_resume_config(args, backend, self.resume_state["config"], Path(latest))

    def build(self) -> None:
        """Data, then the schedule's length, then model, optimizer, mix and engine (:func:`build_components`)."""
        args, backend, data = self.args, self.backend, self.config.data
        self.workload = workload = build_workload(args, self.run_dir, backend, self.resume_state)
        self.steps_per_epoch = steps_per_epoch = self.layout.steps_per_epoch(len(workload.train))
        if steps_per_epoch == 0:
            _fail(args, backend, f"argument --batch-size: {data.batch_size} is larger than the training set "
                                 f"({len(workload.train)} samples)")
        self.total_steps = total_steps = steps_per_epoch * data.epochs
        warmup = warmup_steps(args, steps_per_epoch)
        if args.schedule != "inverse-sqrt" and warmup >= total_steps:
            _fail(args, backend, f"argument --warmup-{'steps' if args.warmup_steps is not None else 'epochs'}: the "
                                 f"warmup ({warmup} steps) must be shorter than the run ({total_steps} steps = "
                                 f"{data.epochs} epochs x {steps_per_epoch})")
        ds_file = getattr(args, "deepspeed_file", None)
        ds_total = ds_file.total_num_steps if ds_file is not None else None
        if ds_total is not None and ds_total != total_steps and backend.is_main:
            print(f"[lb-dist train] --deepspeed-config {self.config.backend.deepspeed_config}: "
                  f"scheduler.params.total_num_steps = {ds_total}; the schedule spans this run's {total_steps} steps "
                  f"(--epochs {data.epochs} x "
                  f"{steps_per_epoch} steps per epoch)", file=sys.stderr, flush=True)
        parts = build_components(args, backend, workload, self.layout, total_steps, warmup, config=self.config)
        self.model, self.optimizer, self.moments = parts["model"], parts["optimizer"], parts["moments"]
        self.scheduler, self.mix, self.runner, self.engine = (parts["scheduler"], parts["mix"], parts["runner"],
                                                              parts["engine"])
        self.names = {p: n for n, p in self.model.named_parameters()}

    def resume(self) -> None:
        """Engine, schedule, mix and moments from the checkpoint (every rank agrees on the outcome),
        then the loop's counters and random state."""
        backend, state = self.backend, self.resume_state

        def restore() -> None:
            self.engine.restore(state, Path(self.latest))
            self.scheduler.load_state_dict(state["scheduler"])
            if self.mix is not None:
                self.mix.load_state_dict(state["mix"])
            if self.moments is not None and state.get("moments") is not None:
                self.moments.load_state_dict(state["moments"])

        _agree(backend, restore)       # a rank that cannot load its part ends every rank here
        tr = state["trainer"]
        self.step, self.elapsed = int(tr["step"]), float(tr["time"])
        self.skipped_total, self.consecutive_skips = int(tr["skipped_steps"]), int(tr["consecutive_skips"])
        if backend.is_main:
            self.epoch_sums = torch.tensor(tr["epoch_sums"], dtype=torch.float64, device=backend.device)
        rngs = state.get("rng") or []
        if backend.rank < len(rngs) and len(rngs) == backend.world_size:
            _set_rng_state(rngs[backend.rank], backend.device)
        else:
            torch.manual_seed(_seed(self.config.data.seed * 1000003 + self.step * 1009 + backend.rank))
        if backend.is_main:
            print(f"[lb-dist train] resuming from {self.latest} (step {self.step})", file=sys.stderr, flush=True)

    def write_config(self) -> None:
        """A fresh run: ``RUN_DIR/config.json`` (rank 0)."""
        if self.backend.is_main:
            (self.run_dir / "config.json").write_text(json.dumps(
                {**to_dict(self.args), "backend_used": self.backend.name, "world_size": self.backend.world_size,
                 "steps_per_epoch": self.steps_per_epoch}, indent=2))

    # ------------------------------------------------------------------------------- training
    def train_epoch(self, epoch: int) -> bool:
        """The optimizer steps of ``epoch`` from the current step on; True when the run stops inside it
        (``--stop-after-steps``, after a checkpoint)."""
        backend, data, config = self.backend, self.config.data, self.config
        in_epoch = self.step - epoch * self.steps_per_epoch
        bar = self._progress_bar(epoch, in_epoch)
        source = _micro_batches(self.workload, self.layout, epoch, data.seed, in_epoch, data.workers, backend.device)
        task = self.workload.task
        try:
            for s in range(in_epoch, self.steps_per_epoch):
                t0 = time.perf_counter()
                micro = [task.to(next(source), backend.device) for _ in range(data.accumulation_steps)]
                out = self.runner.run(micro, self.step)
                self.scheduler.step()
                self.step += 1
                self.steps_this_invocation += 1
                skipped = out["skipped"]
                self.skipped_total += skipped
                self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
                self.epoch_sums += out["sums"]
                self.elapsed += time.perf_counter() - t0
                last_of_epoch = s == self.steps_per_epoch - 1
                if self.step % config.logging.log_every == 0 or last_of_epoch:
                    self.log_step(epoch, out, bar)
                if bar is not None:
                    bar.update(1)
                if self.consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                    raise TrainingDiverged(
                        f"{self.consecutive_skips} consecutive optimizer steps had non-finite gradients (step "
                        f"{self.step}); the weights are those of the last finite step. Lower --lr or check the "
                        f"data; the last checkpoint in {self.ckpt_dir} predates the divergence")
                stop_now = self.stop_requested()
                every = config.checkpoint.every_steps
                if not last_of_epoch and (stop_now or (every and self.step % every == 0)):
                    self.checkpoint(self.step)
                if stop_now and not last_of_epoch:
                    return True
        finally:
            if bar is not None:
                bar.close()
        return False

    def _progress_bar(self, epoch: int, in_epoch: int):
        if not (self.backend.is_main and self.config.logging.progress):
            return None
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm is in the workloads extra
            return None
        return tqdm(total=self.steps_per_epoch, initial=in_epoch, desc=f"epoch {epoch + 1}/{self.config.data.epochs}",
                    dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def log_step(self, epoch: int, out: dict, bar=None) -> None:
        """The step record (global loss; mixing noise; per-layer statistics every ``--layer-stats-every``)."""
        backend, every = self.backend, self.config.logging.layer_stats_every
        reduced = backend.all_reduce_sum(out["sums"].clone()).cpu()
        loss_value = reduced[0].item() / max(reduced[1].item(), 1.0)
        lr_used = out["lr"]
        record = {"kind": "step", "step": self.step, "epoch": epoch, "time": round(self.elapsed, 4), "lr": lr_used,
                  "loss": loss_value, "skipped": out["skipped"]}
        if self.config.mix is not None and self.config.mix.granularity == "device":
            record["mix_noise_amount"] = self.mix.noise_amount(step=out["mix_step"])
        if every and self.step % every == 0 and backend.is_main:
            record.update(_layer_stats(self.optimizer, self.engine.moment_estimators(), out["per_sample"],
                                       self.runner.adapted, self.names, self.runner.layerwise))
            if record.get("noise_scale_global") is not None:
                self.epoch_noise.append(record["noise_scale_global"])
        self.logger.write(record)
        if bar is not None:
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_used:.3g}", refresh=False)

    # ------------------------------------------------------------------------------- end of epoch
    def evaluate(self) -> tuple[dict, float]:
        """The test split (and multi30k's validation split with ``--val``) on every rank's share;
        returns the metrics and the seconds it took."""
        backend, workload, data = self.backend, self.workload, self.config.data
        t_eval = time.perf_counter()
        with self.engine.evaluation() as eval_model:
            result = workload.task.evaluate(
                eval_model, _eval_batches(workload, backend, data.eval_batch_size, data.workers), backend)
            if workload.val is not None:
                val = workload.task.evaluate(
                    eval_model, _eval_batches(workload, backend, data.eval_batch_size, data.workers, workload.val),
                    backend, with_bleu=False)
                result.update({"val_loss": val["test_loss"], "val_token_accuracy": val["test_token_accuracy"]})
        return result, time.perf_counter() - t_eval

    def log_epoch(self, epoch: int, result: dict, eval_time: float, start_time: float, start_step: int) -> None:
        """The epoch record (training loss over the epoch, the evaluation, throughput) and rank 0's summary line."""
        backend, data = self.backend, self.config.data
        sums = backend.all_reduce_sum(self.epoch_sums.clone()).cpu()
        self.epoch_sums = torch.zeros(2, dtype=torch.float64, device=backend.device)
        train_time = self.elapsed - start_time
        record = {"kind": "epoch", "step": self.step, "epoch": epoch, "time": round(self.elapsed, 4),
                  "train_loss": sums[0].item() / max(sums[1].item(), 1.0), **result, "eval_time": round(eval_time, 4),
                  "samples_per_s": (self.step - start_step) * data.batch_size / train_time if train_time > 0 else None,
                  "skipped_steps": self.skipped_total}
        self.logger.write(record)
        self.last_epoch_record = record
        if backend.is_main:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in record.items()
                                if k.startswith(("train_", "test_")) and isinstance(v, float))
            print(f"[lb-dist train] epoch {epoch + 1}/{data.epochs}: {metrics}", file=sys.stderr, flush=True)
            if self.epoch_noise:
                b_noise = statistics.median(self.epoch_noise)
                side = "above" if data.batch_size > b_noise else "below"
                print(f"[lb-dist train] epoch {epoch + 1}/{data.epochs}: gradient noise scale B_simple "
                      f"{b_noise:.4g} (median of {len(self.epoch_noise)} logged steps; McCandlish et al. 2018): the "
                      f"batch {data.batch_size} is {side} it", file=sys.stderr, flush=True)
        self.epoch_noise = []

    def checkpoint(self, at_step: int) -> None:
        """Checkpoint ``at_step`` (collective): the loop's state, then the engine's files, then rank 0's
        manifest (the commit); every rank agrees on the outcome; old checkpoints pruned."""
        args, backend = self.args, self.backend
        global_sums = backend.all_reduce_sum(self.epoch_sums.clone()).cpu()
        self.epoch_sums = (global_sums.to(backend.device) if backend.is_main
                           else torch.zeros(2, dtype=torch.float64, device=backend.device))
        rngs = backend.all_gather_object(_rng_state(backend.device))
        mix, moments = self.mix, self.moments
        state = {"format": FORMAT,
                 "trainer": {"step": at_step, "time": self.elapsed, "skipped_steps": self.skipped_total,
                             "consecutive_skips": self.consecutive_skips, "epoch_sums": global_sums.tolist()},
                 "config": to_dict(args), "world_size": backend.world_size, "backend": backend.name,
                 "scheduler": self.scheduler.state_dict(), "mix": None if mix is None else mix.state_dict(),
                 "moments": None if moments is None else moments.state_dict(), "rng": rngs,
                 "tokenizer_fingerprint": self.workload.info.get("tokenizer_fingerprint")}

        # every rank agrees on the save's success before training on (a rank that failed to write
        # its part ends every rank here, instead of the others waiting for it in the next collective)
        def write() -> None:
            path = checkpoint_path(self.ckpt_dir, at_step)
            self.engine.save_checkpoint(path, state)
            if backend.is_main:
                write_manifest(path, at_step)       # last: the commit (checksums of every file)

        _agree(backend, write)
        if backend.is_main:
            prune_checkpoints(self.ckpt_dir, self.config.checkpoint.keep)

    def finish(self) -> dict:
        """Close the logger and the engine; the run's summary."""
        self.logger.close()
        self.engine.close()
        return {"step": self.step, "epochs_done": self.step // self.steps_per_epoch, "stopped": self.stopped,
                "last_epoch": self.last_epoch_record, "run_dir": str(self.run_dir),
                "steps_per_epoch": self.steps_per_epoch,
                "checkpoints": [str(p) for _, p in list_checkpoints(self.ckpt_dir)] if self.backend.is_main else []}


def _floats(values) -> list[float]:
    """Python floats of 0-d tensors (or numbers) with one host sync for all of them (float64 holds
    every float32/bf16/fp16 value exactly, so the floats are those ``float(v)`` gives)."""
    values = list(values)
    if not all(torch.is_tensor(v) for v in values):
        return [float(v) for v in values]
    if not values:
        return []
    device = values[0].device
    return torch.stack([v.detach().reshape(()).to(device, torch.float64) for v in values]).tolist()


def _named(names, params, values) -> dict:
    params = list(params)
    return dict(zip((names[p] for p in params), _floats(values)))


def _layer_stats(optimizer, estimators, ps_stats, adapted, names, layerwise) -> dict:
    out = {}
    if layerwise:
        trust = optimizer.trust_ratios()
        params = [p for p in adapted if p in trust]
        out["trust_ratio"] = _named(names, params, (trust[p] for p in params))
    estimators = [e for e in estimators if e.num_updates > 0]
    traces, grads, noise_params = [], [], []   # for the gradient noise scale: tr(Sigma_k), ||G_k||^2
    if estimators:
        out["variance_factor"], out["second_moment"] = {}, {}
        for est in estimators:
            vf = est.variance_factors()
            out["variance_factor"].update(_named(names, est.params, (vf[p] for p in est.params)))
            out["second_moment"].update(zip((names[p] for p in est.params), est.second_moments_tensor().tolist()))
            if hasattr(est, "trace_sigma_tensor"):
                traces.append(est.trace_sigma_tensor().cpu())
                grads.append(est.grad_sq_norms_tensor().cpu())
                noise_params += list(est.params)
    elif ps_stats is not None:
        vf = getattr(ps_stats, "variance_factors", {})
        out["variance_factor"] = _named(names, vf.keys(), vf.values())
        out["second_moment"] = _named(names, ps_stats.second_moments.keys(), ps_stats.second_moments.values())
        g_sq = getattr(ps_stats, "grad_sq_norms", None)
        if g_sq:
            noise_params = list(g_sq)
            grads.append(torch.stack([g_sq[p].detach().double().cpu() for p in noise_params]))
            s_k = torch.stack([ps_stats.second_moments[p].detach().double().cpu() for p in noise_params])
            traces.append((s_k - grads[-1]).clamp_min(0.0))
    if noise_params:
        from lb_dist.moments import noise_scales
        per, overall = noise_scales(torch.cat(traces), torch.cat(grads), noise_params)
        out["noise_scale"] = _named(names, per.keys(), per.values())
        out["noise_scale_global"] = overall if math.isfinite(overall) else None
    for key in ("variance_factor", "second_moment", "trust_ratio", "noise_scale"):
        if key in out:
            out[key] = {k: (v if math.isfinite(v) else None) for k, v in out[key].items()}
    return out
