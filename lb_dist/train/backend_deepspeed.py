"""``--backend deepspeed``: the training loop on a DeepSpeed engine built by ``lb_dist.deepspeed``.

Thin by design: everything lb_dist does under DeepSpeed (ZeRO-exact LARS/CLARS/LAMB, device-wise
GradientMix in ``engine.backward``, CLARS' second moments, their checkpoint state) is the adapter's
(``lb_dist/deepspeed``, docs/backend-deepspeed.md). This module

* builds the DeepSpeed config from the run's flags (:func:`deepspeed_config`): batch layout, ZeRO
  stage, bf16, the lb_dist optimizer section (CLARS/LARS/LAMB; torch's SGD/Adam/AdamW are passed as
  client optimizers), the ``gradient_mix`` section for device-wise mixing, plus the keys of a
  ``--deepspeed-config`` file that are not flags (``lb_dist.train.deepspeed_flags``);
* starts the process group the DeepSpeed way (the deepspeed launcher's environment, ``mpirun``
  through mpi4py, torchrun, or a single process);
* maps the loop's :class:`~lb_dist.train.backends.Engine` calls onto DeepSpeed's engine
  (``engine.backward`` per micro-batch, ``engine.step()`` after every micro-batch, DeepSpeed's
  checkpoints next to the loop's checkpoint file).

The schedule stays the loop's (it drives the param groups of the engine's optimizer; DeepSpeed gets
no scheduler), so the learning rate of every step is the same function of the step as under the
other backends.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from lb_dist._io import atomic_write_text
from lb_dist._vendor.deepspeed import step_without_update
from lb_dist.optim import adapted_params
from lb_dist.train.backends import BackendConfigError, BackendUnavailable, Engine, Torchrun, grads_finite
from lb_dist.train.checkpoint import CheckpointError, atomic_save, engine_checkpoint_dir

__all__ = ["DeepSpeedBackend", "DeepSpeedEngine", "lb_dist_config", "deepspeed_config", "CHECKPOINT_SUBDIR"]

#: DeepSpeed's files of checkpoint ``checkpoints/step-N.pt`` are in ``checkpoints/deepspeed/step-N/``.
CHECKPOINT_SUBDIR = "deepspeed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lb_dist_config(args, world_size: int, mix=None, config=None):
    """The run's DeepSpeed configuration, typed (:class:`lb_dist.deepspeed.config.LbDistConfig`, handed
    to ``lb_dist.deepspeed.initialize`` as it is: no JSON in between): DeepSpeed's keys are the
    ``--deepspeed-config`` file's that are not flags (``DeepSpeedFile.passthrough``) plus the flags'
    batch layout, ZeRO stage, bf16, and ``gradient_clipping`` 0 unless the file sets it (DeepSpeed
    0.19.8's default is 1.0; ``lb-dist train`` does not clip). The lb_dist sections come from the flags:
    the optimizer for CLARS/LARS/LAMB (:func:`lb_dist.train.optimizers.optimizer_spec`; ``lr`` is the
    peak, the loop's schedule drives it) and ``gradient_mix`` from ``mix`` (the loop's GradientMix) when
    it mixes device-wise (:func:`lb_dist.train.optimizers.mix_spec`; sample-wise mixing is the loop's
    weighted loss). With ``config`` (the run's :class:`~lb_dist.train.run_config.RunConfig`, as the loop
    passes it) both specs are the ones it already holds, not built again. ``mix`` is not read (kept for
    old callers)."""
    from lb_dist.deepspeed.config import LbDistConfig
    from lb_dist.train.optimizers import mix_spec, optimizer_spec

    ds_file = getattr(args, "deepspeed_file", None)
    raw = copy.deepcopy(ds_file.passthrough()) if ds_file is not None else {}
    B, A = args.batch_size, args.accumulation_steps
    raw.update(train_batch_size=B, gradient_accumulation_steps=A, train_micro_batch_size_per_gpu=B // (world_size * A))
    raw.setdefault("gradient_clipping", 0.0)
    raw.setdefault("steps_per_print", 2 ** 31 - 1)   # the loop logs; keep DeepSpeed's progress lines out
    zero = dict(raw.get("zero_optimization") or {})
    zero["stage"] = int(args.zero_stage or 0)
    raw["zero_optimization"] = zero
    bf16 = dict((ds_file.raw.get("bf16") or ds_file.raw.get("bfloat16") or {}) if ds_file is not None else {})
    if args.bf16 is not None:
        bf16["enabled"] = bool(args.bf16)
    if bf16:
        raw["bf16"] = bf16
        if bf16.get("enabled"):
            # DeepSpeed 0.19.8 casts the parameters only; BatchNorm then meets fp32 running statistics
            # ("expected scalar type BFloat16 but found Float"): the buffers go to bf16 as well
            raw["data_types"] = {"buffer_dtype": "bf16", **(raw.get("data_types") or {})}
    spec = LbDistConfig(raw=raw, optimizer=config.optimizer if config is not None else optimizer_spec(args))
    if spec.optimizer is None and zero["stage"] > 0:
        raw["zero_allow_untested_optimizer"] = True      # torch's SGD/Adam are elementwise: ZeRO-safe
    if args.mix == "device":
        spec.gradient_mix = config.mix if config is not None else mix_spec(args)
    return spec


def deepspeed_config(args, world_size: int, optimizer=None, mix=None) -> dict:
    """The DeepSpeed config of a run as JSON (:func:`lb_dist_config`'s ``to_dict()``: what
    ``RUN_DIR/deepspeed_config.json`` records). ``optimizer`` is not read (kept for old callers)."""
    return lb_dist_config(args, world_size, mix).to_dict()


def _cast_floating_inputs(dtype):
    def hook(module, args, kwargs):
        cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
        return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    return hook


class DeepSpeedEngine(Engine):
    """The loop's view of one DeepSpeed engine (``ds``, ``lb_dist.deepspeed.get_runtime(ds)`` =
    ``runtime`` or None for a plain DeepSpeed engine)."""

    def __init__(self, backend, ds, runtime, *, mix, adapted: list, config: dict, advance_mix: bool) -> None:
        super().__init__(backend, ds.module, ds.basic_optimizer, forward_module=ds, mix=mix, moments=None)
        self.ds, self.runtime, self.config = ds, runtime, config
        self._adapted = adapted
        self._advance_mix = advance_mix               # the loop's sample-wise mix: advanced here, per step
        self._last = True
        self.accumulation_steps = int(ds.gradient_accumulation_steps())
        self.zero_stage = int(ds.zero_optimization_stage())
        self.layerwise = hasattr(self.optimizer, "last_step_skipped")
        self._cast_hook = None
        if ds.bfloat16_enabled():
            self._cast_hook = self.model.register_forward_pre_hook(_cast_floating_inputs(torch.bfloat16),
                                                                   with_kwargs=True)

    # ---------------------------------------------------------------- step
    def accumulate(self, last: bool):
        self._last = last
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # the loop's micro-batch loss already carries 1/A (its N counts the whole global batch);
        # DeepSpeed divides by A again (and scales CLARS' statistics by it): multiply it back
        self.ds.backward(loss * self.accumulation_steps)
        if not self._last:
            self.ds.step()                            # DeepSpeed counts micro-steps; no update here

    def finish_gradients(self) -> None:
        pass                                          # DeepSpeed reduced them in the last backward

    def optimizer_step(self) -> bool:
        ds, opt = self.ds, self.optimizer
        engine_skips, opt_skips = ds.skipped_steps, getattr(opt, "skipped_steps", 0)
        # ZeRO-0 fp32 steps a torch optimizer without looking at the gradient: skip non-finite steps here
        shadow = self.zero_stage == 0 and not self.layerwise and not ds.bfloat16_enabled() \
            and not ds.fp16_enabled() and not grads_finite(self._trainable)
        if shadow:
            step_without_update(ds, opt)              # DeepSpeed still closes the step
        else:
            ds.step()
        skipped = shadow or ds.skipped_steps > engine_skips or (
            self.layerwise and getattr(opt, "skipped_steps", 0) > opt_skips)
        if self._advance_mix and self.mix is not None:
            self.mix.advance()
        return skipped

    def zero_grad(self) -> None:
        pass                                          # DeepSpeed zeroes the gradients in its step

    # ---------------------------------------------------------------- CLARS
    def adapted_params(self) -> list:
        return list(self._adapted)

    def moment_estimators(self) -> list:
        step_moments = getattr(self.runtime, "step_moments", None) if self.runtime is not None else None
        if step_moments is None:
            return []
        estimators = getattr(step_moments, "estimators", None)         # micro-batch: one per layer set
        return list(estimators.values()) if estimators is not None else [step_moments]   # training-pass

    def per_sample_second_moments(self, loss_fn, inputs, targets, *, subset_size, chunk_size, params, generator):
        values = self.runtime.update_second_moments(loss_fn, inputs, targets, generator=generator)
        return SimpleNamespace(second_moments=values, variance_factors={})

    # ---------------------------------------------------------------- evaluation
    def before_evaluation(self) -> None:
        if self.backend.world_size > 1:               # each rank's BatchNorm statistics moved with its batch
            for buf in self.model.buffers():
                dist.broadcast(buf, src=0)

    @contextlib.contextmanager
    def _full_parameters(self):
        """ZeRO-3: every parameter gathered and DeepSpeed's module hooks set aside (collective), so
        that each rank can run the plain module any number of times; otherwise nothing."""
        if self.zero_stage < 3:
            yield
            return
        from lb_dist.deepspeed.engine import full_module
        with full_module(self.model):
            handle = None
            if self._cast_hook is not None:       # set aside with the others: put the input cast back
                handle = self.model.register_forward_pre_hook(_cast_floating_inputs(torch.bfloat16), with_kwargs=True)
            try:
                yield
            finally:
                if handle is not None:
                    handle.remove()

    @contextlib.contextmanager
    def evaluation(self):
        self.before_evaluation()
        with self._full_parameters():
            yield self.model

    # ---------------------------------------------------------------- checkpoints
    def _describe(self) -> dict:
        return {"zero_stage": self.zero_stage, "world_size": self.backend.world_size,
                "bf16": bool(self.ds.bfloat16_enabled()), "fp16": bool(self.ds.fp16_enabled()),
                "gradient_clipping": float(self.ds.gradient_clipping() or 0.0)}

    def save_checkpoint(self, path: Path, state: dict) -> None:
        """DeepSpeed's checkpoint (every rank its ZeRO partition; lb_dist's mix and estimator state in
        its client_state) in ``checkpoints/deepspeed/step-N/``, then the loop's file ``path`` with the
        full model weights, written atomically by rank 0 only after every rank finished DeepSpeed's
        part: the file is the commit, a crash before it leaves the previous checkpoint the latest."""
        path = Path(path)
        ds_dir, tag = engine_checkpoint_dir(self.backend, path, CHECKPOINT_SUBDIR)
        self.ds.save_checkpoint(str(ds_dir), tag=tag, client_state={}, save_latest=False)
        self.backend.barrier()
        with self._full_parameters():
            model_state = {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()} \
                if self.backend.is_main else None
        if self.backend.is_main:
            atomic_save({**state, "model": model_state, "deepspeed": {"tag": tag, **self._describe()}}, path)
        # no barrier here: the loop agrees on every rank's outcome of the save (lb_dist.train.trainer._agree)

    def restore(self, state: dict, path: Path) -> None:
        path = Path(path)
        info = state.get("deepspeed")
        if info is None:
            raise CheckpointError(f"checkpoint {path} was written by the {state.get('backend', '?')} backend; the deepspeed "
                                  f"backend resumes only its own checkpoints (the optimizer state is partitioned by ZeRO); "
                                  f"resume with --backend {state.get('backend', '?')} or use a new --run-dir")
        now = self._describe()
        for key, flag in (("world_size", "the number of processes"), ("zero_stage", "--zero-stage"),
                          ("bf16", "--bf16"), ("fp16", "fp16.enabled"), ("gradient_clipping", "gradient_clipping")):
            if key in info and info[key] != now[key]:
                raise CheckpointError(f"checkpoint {path}: written with {key} = {info[key]!r}, this run has {now[key]!r} "
                                      f"({flag}); DeepSpeed resumes with the same setting (or use a new --run-dir)")
        ds_dir = path.parent / CHECKPOINT_SUBDIR
        if not (ds_dir / info["tag"]).is_dir():
            raise CheckpointError(f"checkpoint {path}: DeepSpeed's files {ds_dir / info['tag']} are missing; delete "
                                  f"{path} to resume from the previous checkpoint")
        try:
            loaded, _ = self.ds.load_checkpoint(str(ds_dir), tag=info["tag"], load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        except (RuntimeError, ValueError, KeyError, OSError, AssertionError) as e:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load {ds_dir / info['tag']}: "
                                  f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        if loaded is None:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed found no checkpoint in {ds_dir / info['tag']}")

    def close(self) -> None:
        super().close()
        if self.runtime is not None and getattr(self.runtime, "step_moments", None) is not None:
            self.runtime.step_moments.remove_hooks()
        if self._cast_hook is not None:
            self._cast_hook.remove()
            self._cast_hook = None
        if hasattr(self.ds, "destroy"):
            self.ds.destroy()


class DeepSpeedBackend(Torchrun):
    """DeepSpeed's process group (``deepspeed.init_distributed``): under the deepspeed launcher (or
    torchrun) from ``RANK``/``WORLD_SIZE``/``MASTER_*``; under ``mpirun`` from mpi4py; in a plain
    process as a group of one. The collectives are torch.distributed's (as for torchrun)."""

    name = "deepspeed"
    training_pass_moments = True         # optimizer.second_moments.source "training_pass" (lb_dist.deepspeed)
    deepspeed_settings = True
    builds_layerwise_optimizer = True

    @classmethod
    def from_flags(cls, *, device: str = "auto", dist_backend: str = "auto", local_rank_flag: int | None = None):
        return cls(device, dist_backend, local_rank_flag=local_rank_flag)

    def __init__(self, device: str = "auto", dist_backend: str = "auto", local_rank_flag: int | None = None) -> None:
        super().__init__(device, dist_backend)
        self.local_rank_flag = local_rank_flag
        self._mpi = False

    def start(self) -> None:
        try:
            import deepspeed

            import lb_dist.deepspeed
        except ImportError as e:
            raise BackendUnavailable(f"--backend deepspeed needs deepspeed (pip install deepspeed; {e})") from e
        for name in ("DeepSpeed", "deepspeed"):
            logging.getLogger(name).setLevel(logging.WARNING)
        deepspeed.utils.logger.setLevel(logging.WARNING)
        lb_dist.deepspeed.skip_shm_comm_op()    # training never uses DeepSpeed's CPU shm op: no JIT build
        self._owns_group = False
        env = os.environ
        if not (dist.is_available() and dist.is_initialized()):
            launched = all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
            mpi_size = env.get("OMPI_COMM_WORLD_SIZE") or env.get("PMI_SIZE")
            if not launched and mpi_size is None:      # a plain process: a group of one
                env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(_free_port()))
                launched = True
            self._mpi = not launched
            local = env.get("LOCAL_RANK") or env.get("OMPI_COMM_WORLD_LOCAL_RANK") or env.get("MPI_LOCALRANKID")
            self.local_rank = int(local) if local is not None else (self.local_rank_flag or 0)
            self.device = self._resolve_device()
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            backend = self.requested_dist_backend
            if backend == "auto":
                backend = "nccl" if self.device.type == "cuda" else "gloo"
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=self._mpi, verbose=False,
                                       distributed_port=int(env.get("MASTER_PORT", "29500")))
            self._owns_group = True
        else:
            self.local_rank = int(env.get("LOCAL_RANK", dist.get_rank()))
            self.device = self._resolve_device()
            deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)  # DeepSpeed's comm over it
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def check_args(self, args) -> str | None:
        message = super().check_args(args)
        if message or args is None or getattr(args, "deepspeed_file", None) is None:
            return message
        return args.deepspeed_file.check_micro_batch(args.batch_size, args.accumulation_steps, self.world_size)

    def close(self, failed: bool = False) -> None:
        super().close(failed)
        if self._mpi and self._owns_group and not failed:
            from mpi4py import MPI
            if not MPI.Is_finalized():
                MPI.Finalize()                        # mpirun reports a rank that exits without it as failed

    def prepare(self, model, optimizer, *, mix=None, moments=None, local_batch_size, accumulation_steps, args=None,
                config=None, param_groups=None):
        """``optimizer``: torch's SGD/Adam/AdamW (a client optimizer), or None with ``param_groups`` when
        the flags name lb_dist's CLARS/LARS/LAMB, which ``lb_dist.deepspeed.initialize`` builds (ZeRO-exact)
        from the run's typed spec (:attr:`builds_layerwise_optimizer`); a given lb_dist optimizer is used
        for its param groups only."""
        if args is None:
            raise ValueError("the deepspeed backend builds its config from the run's flags: prepare(..., args=...)")
        import lb_dist.deepspeed as lbds

        spec = lb_dist_config(args, self.world_size, mix, config=config)
        if param_groups is None:
            if optimizer is None:
                raise ValueError("prepare(): give the optimizer or its param_groups")
            param_groups = optimizer.param_groups
        groups = [{"params": list(g["params"]), "weight_decay": g.get("weight_decay", 0.0),
                   "layer_adaptation": g.get("layer_adaptation", True)} for g in param_groups]
        adapted = adapted_params(groups)
        if mix is not None:
            mix.detach()          # DeepSpeed steps the inner optimizer once per group: advanced by the engine instead
        try:
            if spec.optimizer is not None:           # lb_dist's CLARS/LARS/LAMB, built by the adapter (ZeRO-exact)
                ds, *_ = lbds.initialize(model=model, model_parameters=groups, config=spec)
            else:                                     # torch's SGD/Adam/AdamW, as a client optimizer
                for g in optimizer.param_groups:
                    g.pop("layer_adaptation", None)
                config = spec if spec.gradient_mix is not None else spec.deepspeed_config()
                ds, *_ = lbds.initialize(model=model, optimizer=optimizer, config=config)
        except lbds.ConfigError as e:
            raise BackendConfigError(f"the DeepSpeed config built from the flags{' and ' + args.deepspeed_config if args.deepspeed_config else ''} "
                             f"is refused by lb_dist.deepspeed: {e}") from e
        runtime = getattr(ds, "lb_dist", None)
        engine_mix = runtime.mix if runtime is not None and runtime.mix is not None else mix
        cfg = spec.to_dict()
        engine = DeepSpeedEngine(self, ds, runtime, mix=engine_mix, adapted=adapted, config=cfg,
                                 advance_mix=engine_mix is mix)
        if self.is_main and getattr(args, "run_dir", None):
            import json
            target = Path(args.run_dir) / "deepspeed_config.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(target, json.dumps(cfg, indent=2) + "\n")
        print_notes = args.deepspeed_file.notes if getattr(args, "deepspeed_file", None) is not None else None
        if print_notes and self.is_main:
            for note in print_notes:
                print(f"[lb-dist train] --deepspeed-config {args.deepspeed_config}: {note}", file=sys.stderr, flush=True)
        return engine
