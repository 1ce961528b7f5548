"""The typed run configuration of ``lb-dist train`` (issue 13): what the loop reads, in sections.

:meth:`RunConfig.from_args` builds it once from the namespace that
:func:`lb_dist.train.config.parse_args` returned (flags parsed and checked there, ``--deepspeed-config``
already applied): it copies values and checks nothing again. The sections are frozen. The namespace
stays the run's record (``RUN_DIR/config.json``, the checkpoints' ``config``, the resume comparison
over :data:`lb_dist.train.config.RUN_DEFINING`), unchanged in content and format.

The optimizer and GradientMix sections are the typed specs every front door ends in
(:class:`lb_dist.deepspeed.config.OptimizerSpec` / ``MixSpec``, from
:func:`lb_dist.train.optimizers.optimizer_spec` / ``mix_spec``); the schedule's spec needs the run's
length, known once the data is loaded (:func:`lb_dist.train.optimizers.schedule_spec`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from lb_dist.train.optimizers import mix_spec, optimizer_spec

__all__ = ["RunConfig", "DataConfig", "CheckpointConfig", "BackendConfig", "LoggingConfig"]


@dataclass(frozen=True)
class DataConfig:
    """Data and batch layout: ``--dataset``, ``--batch-size`` (global, per optimizer step),
    ``--accumulation-steps`` (micro-batches per rank and step), ``--eval-batch-size`` (per rank),
    ``--workers``, ``--epochs``, ``--seed`` (model init, data order, per-rank streams)."""
    dataset: str
    data_dir: str | None
    train_size: int | None
    test_size: int | None
    batch_size: int
    accumulation_steps: int
    eval_batch_size: int
    workers: int
    epochs: int
    seed: int


@dataclass(frozen=True)
class CheckpointConfig:
    """The run directory and checkpoints: ``--run-dir``, ``--resume`` (auto | never),
    ``--checkpoint-every-steps`` (0: at epoch ends only), ``--keep-checkpoints``,
    ``--stop-after-steps`` (None: run to the end)."""
    run_dir: Path
    resume: str
    every_steps: int
    keep: int
    stop_after_steps: int | None


@dataclass(frozen=True)
class BackendConfig:
    """``--backend`` as given (``auto`` is resolved by ``lb_dist.train.backends``), ``--device``,
    ``--dist-backend``, ``--num-threads``, and DeepSpeed's ``--zero-stage`` / ``--bf16`` /
    ``--deepspeed-config``."""
    name: str
    device: str
    dist_backend: str
    num_threads: int | None
    zero_stage: int | None
    bf16: bool | None          # None: not given (DeepSpeed config's or off)
    deepspeed_config: str | None


@dataclass(frozen=True)
class LoggingConfig:
    """``--log-every`` (steps), ``--layer-stats-every`` (0: never), ``--progress``,
    ``--tensorboard`` (auto | on | off)."""
    log_every: int
    layer_stats_every: int
    progress: bool
    tensorboard: str           # auto | on | off


@dataclass(frozen=True)
class RunConfig:
    """One run of ``lb-dist train``, typed. ``optimizer``: the lb_dist optimizer's spec (CLARS, LARS,
    LAMB; None for torch's SGD/Adam/AdamW, built from the namespace by
    :func:`lb_dist.train.optimizers.build_optimizer`); ``mix``: None for ``--mix none``."""
    data: DataConfig
    checkpoint: CheckpointConfig
    backend: BackendConfig
    logging: LoggingConfig
    optimizer_name: str        # --optimizer
    clars_moments: str         # --clars-moments (read with --optimizer clars only)
    optimizer: object          # lb_dist.deepspeed.config.OptimizerSpec | None
    mix: object                # lb_dist.deepspeed.config.MixSpec | None

    @property
    def per_sample_moments(self):
        """CLARS' ``second_moments`` spec (subset and chunk size) when S_k comes from per-sample
        gradients (``--clars-moments per-sample``: the loop computes them at each step), else None."""
        if self.optimizer_name == "clars" and self.clars_moments == "per-sample":
            return self.optimizer.second_moments
        return None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "RunConfig":
        """The sections of ``args`` (from :func:`lb_dist.train.config.parse_args`: already checked)."""
        return cls(
            data=DataConfig(dataset=args.dataset, data_dir=args.data_dir, train_size=args.train_size,
                            test_size=args.test_size, batch_size=args.batch_size,
                            accumulation_steps=args.accumulation_steps, eval_batch_size=args.eval_batch_size,
                            workers=args.workers, epochs=args.epochs, seed=args.seed),
            checkpoint=CheckpointConfig(run_dir=Path(args.run_dir), resume=args.resume,
                                        every_steps=args.checkpoint_every_steps, keep=args.keep_checkpoints,
                                        stop_after_steps=args.stop_after_steps),
            backend=BackendConfig(name=args.backend, device=args.device, dist_backend=args.dist_backend,
                                  num_threads=args.num_threads, zero_stage=args.zero_stage, bf16=args.bf16,
                                  deepspeed_config=args.deepspeed_config),
            logging=LoggingConfig(log_every=args.log_every, layer_stats_every=args.layer_stats_every,
                                  progress=bool(args.progress), tensorboard=args.tensorboard),
            optimizer_name=args.optimizer, clars_moments=args.clars_moments, optimizer=optimizer_spec(args),
            mix=mix_spec(args))
