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

from lb_dist.mixing import GradientMix
from lb_dist.train.backends import Backend, Engine
from lb_dist.train.checkpoint import (FORMAT, CheckpointError, checkpoint_path, latest_checkpoint, list_checkpoints,
                                      load_checkpoint, prune_checkpoints, verify_checkpoint, write_manifest)
from lb_dist.train.config import RUN_DEFINING, check_layout, to_dict
from lb_dist.train.metrics import MetricsLogger
from lb_dist.train.optimizers import build_optimizer, build_scheduler, peak_lr, warmup_steps
from lb_dist.train.sampling import BatchLayout, StepBatchSampler
from lb_dist.train.workloads import build_workload

__all__ = ["run_training", "MAX_CONSECUTIVE_SKIPS", "TrainingDiverged", "RankFailed"]

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
        self.parser = getattr(args, "_parser", None)
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
    the benchmark times exactly the training step of ``lb-dist train``."""

    def __init__(self, args: argparse.Namespace, backend: Backend, engine: Engine, layout: BatchLayout, task) -> None:
        self.args, self.backend, self.engine, self.layout, self.task = args, backend, engine, layout, task
        self.model, self.optimizer, self.moments, self.mix = engine.model, engine.optimizer, engine.moments, engine.mix
        self.layerwise = hasattr(self.optimizer, "last_step_skipped")
        self.per_sample = args.optimizer == "clars" and args.clars_moments == "per-sample"
        self.adapted = engine.adapted_params()

    def run(self, micro: list, step: int) -> dict:
        """Train on this rank's micro-batches (already on the device) as optimizer step ``step``
        (0-based, global). Returns ``{"sums": [loss sum, count] of this rank (float64, on the device),
        "skipped", "lr", "mix_step", "per_sample": per-sample statistics | None}``."""
        args, backend, engine, task = self.args, self.backend, self.engine, self.task
        optimizer, mix = self.optimizer, self.mix
        K, A = backend.world_size, len(micro)
        if task.counts_are_constant:
            total_count = float(args.batch_size)
        else:
            local = torch.stack([task.count_tensor(b).to(backend.device, torch.float64) for b in micro]).sum()
            total_count = float(backend.all_reduce_sum(local.reshape(1)).item())  # one host sync per step
        ps_stats = None
        if self.per_sample:
            gen = torch.Generator().manual_seed(_seed(args.seed * 7919 + step * 104729 + backend.rank))
            x, y = micro[0]
            ps_stats = engine.per_sample_second_moments(task.mean_loss_fn(), x, y, subset_size=args.per_sample_subset,
                                                        chunk_size=args.per_sample_chunk, params=self.adapted,
                                                        generator=gen)
        sums = torch.zeros(2, dtype=torch.float64, device=backend.device)  # no host sync per micro-batch
        for j, batch in enumerate(micro):
            with engine.accumulate(last=(j == A - 1)):
                losses, counts = task.losses(engine.forward_module, batch)
                if args.mix == "sample":
                    w = mix.sample_weights(self.layout.positions(j), args.batch_size).to(losses.device, losses.dtype)
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
                     warmup: int) -> dict:
    """Model (seeded, on the device), optimizer (+ CLARS' micro-batch estimator), GradientMix (attached
    to the optimizer), the backend's :class:`Engine`, the schedule over the engine's optimizer, and the
    :class:`StepRunner`. The returned ``optimizer``, ``moments`` and ``mix`` are the engine's (a backend
    may replace them by its own, e.g. DeepSpeed's ZeRO-aware optimizer)."""
    torch.manual_seed(args.seed)  # the same initial model on every rank (DDP also broadcasts rank 0's)
    model = workload.build_model().to(backend.device)
    torch.manual_seed(_seed(args.seed * 1000003 + 7919 * backend.rank + 1))  # per-rank streams: dropout, augmentation
    optimizer, moments = build_optimizer(args, model, peak_lr(args), local_batch_size=layout.local_batch_size)
    mix = None
    if args.mix != "none":
        from lb_dist.mixing import DEFAULT_STD
        mix = GradientMix(noise=args.mix_noise, std=DEFAULT_STD if args.mix_std is None else args.mix_std,
                          granularity=args.mix, seed=args.seed if args.mix_seed is None else args.mix_seed)
        mix.attach(optimizer)
    engine = backend.prepare(model, optimizer, mix=mix, moments=moments, local_batch_size=layout.local_batch_size,
                             accumulation_steps=layout.accumulation_steps, args=args)
    scheduler = build_scheduler(args, engine.optimizer, total_steps, warmup)
    runner = StepRunner(args, backend, engine, layout, workload.task)
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
    run_dir = Path(args.run_dir)
    check_layout(_RankParser(args, backend), args, backend.world_size)
    if backend.name != "deepspeed":
        for flag, dest in (("--zero-stage", "zero_stage"), ("--bf16", "bf16"), ("--deepspeed-config", "deepspeed_config")):
            if getattr(args, dest, None) is not None:
                _fail(args, backend, f"argument {flag}: only for --backend deepspeed, and this run's backend is "
                                     f"{backend.name}")
    elif getattr(args, "_deepspeed_file", None):
        from lb_dist.train.deepspeed_flags import check_micro_batch
        message = check_micro_batch(args, backend.world_size)
        if message:
            _fail(args, backend, message)
    if args.optimizer == "clars" and args.clars_moments == "training-pass" and \
            backend.name not in ("single", "torchrun", "horovod"):
        _fail(args, backend, f"argument --clars-moments: training-pass is implemented for --backend single, "
                             f"torchrun and horovod (module hooks), and this run's backend is {backend.name}; "
                             f"use micro-batch or per-sample")
    message = backend.check_args(args)
    if message:
        _fail(args, backend, message)
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
        return _run_training(args, backend)
    finally:
        if lock is not None:
            lock.release()


def _run_training(args: argparse.Namespace, backend: Backend) -> dict:
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    run_dir = Path(args.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    K = backend.world_size
    A = args.accumulation_steps
    layout = BatchLayout(args.batch_size, K, backend.rank, A)

    # ---- which checkpoint (rank 0 decides and verifies its checksums; every rank reads the same file)
    latest, problem = None, None
    if backend.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        latest = latest_checkpoint(ckpt_dir)
        latest = None if latest is None else str(latest)
        if latest is not None:
            try:
                verify_checkpoint(latest)
            except CheckpointError as e:
                problem = str(e)
    latest, problem = backend.broadcast_object((latest, problem))
    if problem is not None:
        raise CheckpointError(problem) if backend.is_main else RankFailed(f"rank 0 failed: {problem}")
    if latest is not None and args.resume == "never":
        _fail(args, backend, f"argument --resume: never, but {args.run_dir} already holds checkpoints ({latest}); "
                             f"use a new --run-dir or --resume auto")
    resume_state = None
    if latest is not None:
        resume_state = _agree(backend, lambda: load_checkpoint(latest, required=("trainer", "config")))
        _check_resume_config(args, backend, resume_state["config"], Path(latest))

    # ---- data, model, optimizer
    workload = build_workload(args, run_dir, backend, resume_state)
    steps_per_epoch = layout.steps_per_epoch(len(workload.train))
    if steps_per_epoch == 0:
        _fail(args, backend, f"argument --batch-size: {args.batch_size} is larger than the training set "
                             f"({len(workload.train)} samples)")
    total_steps = steps_per_epoch * args.epochs
    warmup = warmup_steps(args, steps_per_epoch)
    if args.schedule != "inverse-sqrt" and warmup >= total_steps:
        _fail(args, backend, f"argument --warmup-{'steps' if args.warmup_steps is not None else 'epochs'}: the warmup "
                             f"({warmup} steps) must be shorter than the run ({total_steps} steps = {args.epochs} "
                             f"epochs x {steps_per_epoch})")
    ds_total = getattr(args, "_ds_total_num_steps", None)
    if ds_total is not None and ds_total != total_steps and backend.is_main:
        print(f"[lb-dist train] --deepspeed-config {args.deepspeed_config}: scheduler.params.total_num_steps = {ds_total}; "
              f"the schedule spans this run's {total_steps} steps (--epochs {args.epochs} x {steps_per_epoch} steps "
              f"per epoch)", file=sys.stderr, flush=True)
    parts = build_components(args, backend, workload, layout, total_steps, warmup)
    model, optimizer, moments = parts["model"], parts["optimizer"], parts["moments"]
    scheduler, mix, runner, engine = parts["scheduler"], parts["mix"], parts["runner"], parts["engine"]
    names = {p: n for n, p in model.named_parameters()}
    task = workload.task

    # ---- resume
    step = 0
    elapsed = 0.0
    skipped_total = 0
    consecutive_skips = 0
    # (loss sum, count) of the current epoch, this rank; on the device, read at log steps and checkpoints
    epoch_sums = torch.zeros(2, dtype=torch.float64, device=backend.device)
    epoch_noise: list[float] = []          # global gradient noise scales logged this epoch (main rank)
    if resume_state is not None:
        def restore() -> None:
            engine.restore(resume_state, Path(latest))
            scheduler.load_state_dict(resume_state["scheduler"])
            if mix is not None:
                mix.load_state_dict(resume_state["mix"])
            if moments is not None and resume_state.get("moments") is not None:
                moments.load_state_dict(resume_state["moments"])

        _agree(backend, restore)       # a rank that cannot load its part ends every rank here
        tr = resume_state["trainer"]
        step, elapsed = int(tr["step"]), float(tr["time"])
        skipped_total, consecutive_skips = int(tr["skipped_steps"]), int(tr["consecutive_skips"])
        if backend.is_main:
            epoch_sums = torch.tensor(tr["epoch_sums"], dtype=torch.float64, device=backend.device)
        rngs = resume_state.get("rng") or []
        if backend.rank < len(rngs) and len(rngs) == K:
            _set_rng_state(rngs[backend.rank], backend.device)
        else:
            torch.manual_seed(_seed(args.seed * 1000003 + step * 1009 + backend.rank))
        if backend.is_main:
            print(f"[lb-dist train] resuming from {latest} (step {step})", file=sys.stderr, flush=True)
    elif backend.is_main:
        (run_dir / "config.json").write_text(json.dumps({**to_dict(args), "backend_used": backend.name,
                                                         "world_size": K, "steps_per_epoch": steps_per_epoch},
                                                        indent=2))
    logger = MetricsLogger(run_dir, enabled=backend.is_main, resume_step=step if resume_state is not None else None,
                           tensorboard=args.tensorboard)

    def save(at_step: int) -> None:
        nonlocal epoch_sums
        global_sums = backend.all_reduce_sum(epoch_sums.clone()).cpu()
        epoch_sums = (global_sums.to(backend.device) if backend.is_main
                      else torch.zeros(2, dtype=torch.float64, device=backend.device))
        rngs = backend.all_gather_object(_rng_state(backend.device))
        state = {"format": FORMAT,
                 "trainer": {"step": at_step, "time": elapsed, "skipped_steps": skipped_total,
                             "consecutive_skips": consecutive_skips, "epoch_sums": global_sums.tolist()},
                 "config": to_dict(args), "world_size": K, "backend": backend.name,
                 "scheduler": scheduler.state_dict(), "mix": None if mix is None else mix.state_dict(),
                 "moments": None if moments is None else moments.state_dict(), "rng": rngs,
                 "tokenizer_fingerprint": workload.info.get("tokenizer_fingerprint")}
        # every rank agrees on the save's success before training on (a rank that failed to write
        # its part ends every rank here, instead of the others waiting for it in the next collective)
        def write() -> None:
            path = checkpoint_path(ckpt_dir, at_step)
            engine.save_checkpoint(path, state)
            if backend.is_main:
                write_manifest(path, at_step)       # last: the commit (checksums of every file)

        _agree(backend, write)
        if backend.is_main:
            prune_checkpoints(ckpt_dir, args.keep_checkpoints)

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the workloads extra
        tqdm = None

    stopped = False
    last_epoch_record = None
    steps_this_invocation = 0
    model.train()
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        bar = None
        if tqdm is not None and backend.is_main and args.progress:
            bar = tqdm(total=steps_per_epoch, initial=in_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        epoch_start_time = elapsed
        epoch_start_step = step
        source = _micro_batches(workload, layout, epoch, args.seed, in_epoch, args.workers, backend.device)
        for s in range(in_epoch, steps_per_epoch):
            t0 = time.perf_counter()
            micro = [task.to(next(source), backend.device) for _ in range(A)]
            out = runner.run(micro, step)
            step_sums, skipped, lr_used, mix_step = out["sums"], out["skipped"], out["lr"], out["mix_step"]
            scheduler.step()
            step += 1
            steps_this_invocation += 1
            skipped_total += skipped
            consecutive_skips = consecutive_skips + 1 if skipped else 0
            epoch_sums += step_sums
            elapsed += time.perf_counter() - t0

            # ---- step record
            if step % args.log_every == 0 or s == steps_per_epoch - 1:
                reduced = backend.all_reduce_sum(step_sums.clone()).cpu()
                loss_value = reduced[0].item() / max(reduced[1].item(), 1.0)
                record = {"kind": "step", "step": step, "epoch": epoch, "time": round(elapsed, 4), "lr": lr_used,
                          "loss": loss_value, "skipped": skipped}
                if args.mix == "device":
                    record["mix_noise_amount"] = mix.noise_amount(step=mix_step)
                if args.layer_stats_every and step % args.layer_stats_every == 0 and backend.is_main:
                    record.update(_layer_stats(optimizer, engine.moment_estimators(), out["per_sample"],
                                               runner.adapted, names, runner.layerwise))
                    if record.get("noise_scale_global") is not None:
                        epoch_noise.append(record["noise_scale_global"])
                logger.write(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_used:.3g}", refresh=False)
            if bar is not None:
                bar.update(1)
            if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                raise TrainingDiverged(f"{consecutive_skips} consecutive optimizer steps had non-finite gradients "
                                       f"(step {step}); the weights are those of the last finite step. Lower --lr "
                                       f"or check the data; the last checkpoint in {ckpt_dir} predates the divergence")
            last_of_epoch = s == steps_per_epoch - 1
            stop_now = args.stop_after_steps is not None and steps_this_invocation >= args.stop_after_steps
            if not last_of_epoch and (stop_now or (args.checkpoint_every_steps
                                                  and step % args.checkpoint_every_steps == 0)):
                save(step)
            if stop_now and not last_of_epoch:
                stopped = True
                break
        if bar is not None:
            bar.close()
        if stopped:
            break

        # ---- end of epoch: evaluation, record, checkpoint
        t_eval = time.perf_counter()
        with engine.evaluation() as eval_model:
            result = task.evaluate(eval_model, _eval_batches(workload, backend, args.eval_batch_size, args.workers),
                                   backend)
            if workload.val is not None:
                val = task.evaluate(eval_model, _eval_batches(workload, backend, args.eval_batch_size, args.workers,
                                                              workload.val), backend, with_bleu=False)
                result.update({"val_loss": val["test_loss"], "val_token_accuracy": val["test_token_accuracy"]})
        eval_time = time.perf_counter() - t_eval
        sums = backend.all_reduce_sum(epoch_sums.clone()).cpu()
        epoch_sums = torch.zeros(2, dtype=torch.float64, device=backend.device)
        train_time = elapsed - epoch_start_time
        record = {"kind": "epoch", "step": step, "epoch": epoch, "time": round(elapsed, 4),
                  "train_loss": sums[0].item() / max(sums[1].item(), 1.0), **result, "eval_time": round(eval_time, 4),
                  "samples_per_s": (step - epoch_start_step) * args.batch_size / train_time if train_time > 0 else None,
                  "skipped_steps": skipped_total}
        logger.write(record)
        last_epoch_record = record
        if backend.is_main:
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in record.items()
                                if k.startswith(("train_", "test_")) and isinstance(v, float))
            print(f"[lb-dist train] epoch {epoch + 1}/{args.epochs}: {metrics}", file=sys.stderr, flush=True)
            if epoch_noise:
                b_noise = statistics.median(epoch_noise)
                side = "above" if args.batch_size > b_noise else "below"
                print(f"[lb-dist train] epoch {epoch + 1}/{args.epochs}: gradient noise scale B_simple "
                      f"{b_noise:.4g} (median of {len(epoch_noise)} logged steps; McCandlish et al. 2018): the "
                      f"batch {args.batch_size} is {side} it", file=sys.stderr, flush=True)
        epoch_noise = []
        save(step)
        if args.stop_after_steps is not None and steps_this_invocation >= args.stop_after_steps and step < total_steps:
            stopped = True
            break
    logger.close()
    engine.close()
    return {"step": step, "epochs_done": step // steps_per_epoch, "stopped": stopped,
            "last_epoch": last_epoch_record, "run_dir": str(run_dir), "steps_per_epoch": steps_per_epoch,
            "checkpoints": [str(p) for _, p in list_checkpoints(ckpt_dir)] if backend.is_main else []}


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
