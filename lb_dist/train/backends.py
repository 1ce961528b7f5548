"""How the training loop talks to a distributed engine: :class:`Backend` and :class:`Engine`.

A :class:`Backend` is the process level: joining the job (``start``/``close``), ``rank``,
``world_size``, ``device``, and the collectives the loop needs for metrics and evaluation
(``all_reduce_sum``, ``all_gather_object``, ``broadcast_object``, ``barrier``). Its
``prepare(model, optimizer, ...)`` returns an :class:`Engine`: one model and its optimizer made
data-parallel. Per optimizer step the loop (``lb_dist.train.trainer``) does::

    for j, micro_batch in enumerate(micro_batches):          # A accumulation micro-batches
        with engine.accumulate(last=(j == A - 1)):            # no gradient sync before the last one
            engine.backward(loss_of(engine.forward_module, micro_batch))
    engine.finish_gradients()                                 # gradients final, moments fed
    skipped = engine.optimizer_step()                         # skips a non-finite step; mix advances
    engine.zero_grad()

and ``with engine.evaluation(): ...``, ``engine.save_checkpoint(path, state)``,
``engine.restore(state, path)`` (the engine owns the model and optimizer state; the loop passes the
rest). Several engines can live on one backend (the demo runs trainings one after the other in one
process group; benchmarks/bench_workloads.py interleaves them).

Implemented here: :class:`SingleProcess` (one plain process) and :class:`Torchrun` (torch.distributed,
DDP and the ``lb_dist.ddp`` communication hook for device-wise GradientMix and CLARS' micro-batch
statistics); in ``backend_deepspeed.py`` :class:`DeepSpeedBackend` (``lb_dist.deepspeed``, ZeRO
0-3), in ``backend_horovod.py`` :class:`HorovodBackend` (``lb_dist.horovod.DistributedOptimizer``) and in
``backend_fsdp.py`` :class:`FSDPBackend` (FSDP2 ``fully_shard`` with ``lb_dist.fsdp``, DCP checkpoints).
docs/training.md ("Adding a backend") lists what each method must guarantee. The backends are
registered by name in :mod:`lb_dist.train.registry` (``select_backend``, ``detect_backend``).
"""
from __future__ import annotations

import abc
import contextlib
import os
from pathlib import Path
from typing import Any, ContextManager

import torch
import torch.distributed as dist
from torch import nn

from lb_dist.optim import adapted_params
from lb_dist.train.checkpoint import CheckpointError, atomic_save

__all__ = ["Backend", "Engine", "SingleProcess", "Torchrun", "LocalEngine", "DDPEngine", "BackendUnavailable",
           "BackendConfigError", "grads_finite"]


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (its package is missing, or the launcher's environment)."""


class BackendConfigError(ValueError):
    """The backend refuses the run's configuration (e.g. lb_dist.deepspeed refuses the DeepSpeed config
    built from the flags and ``--deepspeed-config``); the message names the key."""


def grads_finite(params) -> bool:
    """True when every existing ``.grad`` of ``params`` is finite (one ``torch._foreach_norm``)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack(norms)).all())


class Engine:
    """One model and its optimizer, made data-parallel by a backend (default methods: a plain
    process; subclasses override what their engine does differently).

    Attributes the loop reads: ``model`` (the plain module: ``state_dict``, evaluation),
    ``forward_module`` (what the loop calls forward on), ``optimizer`` (whose param groups the
    schedule drives; ``trust_ratios()`` of the layer-wise ones), ``mix`` (the run's
    :class:`lb_dist.GradientMix` the engine uses and advances once per optimizer step, or None) and
    ``moments`` (the :class:`lb_dist.moments.MicroBatchMoments` the loop checkpoints, or None when
    the engine keeps CLARS' statistics in its own checkpoint)."""

    def __init__(self, backend: "Backend", model: nn.Module, optimizer: torch.optim.Optimizer,
                 forward_module: nn.Module | None = None, *, mix=None, moments=None) -> None:
        self.backend = backend
        self.model = model                                   # the plain model (parameters, state_dict)
        self.forward_module = forward_module or model        # what the loop calls (e.g. the DDP wrapper)
        self.optimizer = optimizer
        self.mix = mix
        self.moments = moments
        self.local_moments = None                            # MicroBatchMoments fed by track_backward
        self._trainable = [p for p in model.parameters() if p.requires_grad]

    def track_accumulation(self, moments, local_batch_size: int, accumulation_steps: int) -> None:
        """Feed ``moments`` from this process's accumulation micro-batches (``track_backward``); a
        ``TrainingPassMoments`` measures through its own hooks and only needs ``finish_step``."""
        if not hasattr(moments, "track_backward"):
            moments.grad_scale = 1.0 / accumulation_steps
            self.local_moments = moments
            return
        moments.micro_batch_size = local_batch_size // accumulation_steps
        self.local_moments = moments.track_backward(grad_scale=1.0 / accumulation_steps)

    def accumulate(self, last: bool) -> ContextManager:
        """Context of one micro-batch's forward + backward; ``last``: the step's last micro-batch
        (gradients are reduced then)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def finish_gradients(self) -> None:
        """After the last micro-batch's backward: gradients final (reduced, mixed), the moments
        estimator fed with this step's statistics."""
        if self.local_moments is not None:
            self.local_moments.finish_step()

    def per_sample_second_moments(self, loss_fn, inputs, targets, *, subset_size: int, chunk_size: int,
                                  params, generator):
        """CLARS' exact per-sample ``S_k`` on a global subset (a collective; this rank's share comes
        from ``inputs``), handed to the optimizer for the coming step. Returns an object with
        ``second_moments`` ``{param: S_k}`` and ``variance_factors`` ``{param: M_k}`` (may be empty)."""
        from lb_dist.moments import per_sample_second_moments
        stats = per_sample_second_moments(self.model, loss_fn, inputs, targets, subset_size=subset_size,
                                          chunk_size=chunk_size, params=params, generator=generator,
                                          return_stats=True)
        self.optimizer.set_second_moments(stats.second_moments)
        return stats

    def _step(self) -> None:
        self.optimizer.step()

    def optimizer_step(self) -> bool:
        """The optimizer step of the reduced gradient, skipped (weights untouched) when it is not
        finite, on every rank alike; returns True when skipped. The layer-wise optimizers check and
        skip by themselves; for the others the gradient norms are checked here. ``mix`` advances
        exactly once either way."""
        opt = self.optimizer
        if hasattr(opt, "last_step_skipped"):
            self._step()
            return bool(opt.last_step_skipped)
        if not grads_finite(self._trainable):
            if self.mix is not None:
                self.mix.advance()  # an attached mix advances in the step hook, which does not run
            return True
        self._step()
        return False

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def adapted_params(self) -> list:
        """The model's parameters in layer-adapted param groups (LARS/CLARS/LAMB; all for the others)."""
        return adapted_params(self.optimizer.param_groups)

    def moment_estimators(self) -> list:
        """The :class:`lb_dist.moments.MicroBatchMoments` holding CLARS' current micro-batch
        estimates (for the per-layer metrics)."""
        return [self.moments] if self.moments is not None else []

    def before_evaluation(self) -> None:
        """Make every rank's model identical (buffers included) before each rank evaluates
        :attr:`model` on its share of the test set."""

    @contextlib.contextmanager
    def evaluation(self):
        """Context of the evaluation: :meth:`before_evaluation`, then :attr:`model` is usable as a
        plain module on every rank independently (any number of forward calls per rank)."""
        self.before_evaluation()
        yield self.model

    def save_checkpoint(self, path: Path, state: dict) -> None:
        """Collective. Write ``state`` (the loop's part: step, schedule, mixing, moments, RNG, ...)
        plus the model and optimizer state to ``path`` atomically, so that
        ``lb_dist.train.checkpoint.load_checkpoint(path)`` returns ``state`` with them. Default: rank 0
        writes one file (replicated data parallelism: every rank holds the same model and optimizer).
        It ends without a collective after the last write: the loop then agrees on every rank's
        outcome (one all-gather), so a rank whose write failed never leaves the others waiting."""
        if self.backend.is_main:
            atomic_save({**state, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                        path)

    def restore(self, state: dict, path: Path) -> None:
        """Restore model and optimizer from ``state``, what :meth:`save_checkpoint` wrote to ``path``
        as read back by ``load_checkpoint`` (the loop reads the file first to check the run's flags)."""
        if "optimizer" not in state and state.get("backend") == "deepspeed":
            raise CheckpointError(f"checkpoint {path} was written by the deepspeed backend: its optimizer state is in "
                                  f"DeepSpeed's files ({Path(path).parent / 'deepspeed' / Path(path).stem}, per rank "
                                  f"and ZeRO partition); resume it with --backend deepspeed")
        missing = [k for k in ("model", "optimizer") if k not in state]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it is incomplete")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {e}") from e

    def close(self) -> None:
        """Release what :meth:`Backend.prepare` attached (hooks)."""
        if self.local_moments is not None:
            self.local_moments.remove_hooks()
            self.local_moments = None


class Backend(abc.ABC):
    """One data-parallel job. Attributes after :meth:`start`: ``rank``, ``world_size``,
    ``local_rank``, ``device``."""

    name: str = "?"
    #: Capabilities the run's flags are checked against (:meth:`check_args`); the loop never tests ``name``.
    #: CLARS' ``--clars-moments training-pass`` (module hooks on the plain model, reduced by the backend).
    training_pass_moments: bool = False
    #: The DeepSpeed settings (``--zero-stage``, ``--bf16``, ``--deepspeed-config``).
    deepspeed_settings: bool = False
    #: ``prepare`` builds lb_dist's layer-wise optimizer (CLARS/LARS/LAMB) itself from the run's typed
    #: spec: the loop then passes ``optimizer=None, param_groups=...`` instead of building one (DeepSpeed).
    builds_layerwise_optimizer: bool = False
    #: The FSDP settings (``--fsdp-wrap``).
    fsdp_settings: bool = False

    def __init__(self, device: str = "auto", dist_backend: str = "auto") -> None:
        self.requested_device = device
        self.requested_dist_backend = dist_backend
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0
        self.device = torch.device("cpu")
        self._owns_group = False

    @classmethod
    def from_flags(cls, *, device: str = "auto", dist_backend: str = "auto", local_rank_flag: int | None = None):
        """The unstarted backend for the flags ``--device``, ``--dist-backend`` and the launcher's
        ``--local_rank`` (:func:`lb_dist.train.registry.select_backend`)."""
        return cls(device, dist_backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def owns_process_group(self) -> bool:
        """True when :meth:`start` created the process group (and :meth:`close` destroys it)."""
        return self._owns_group

    def _resolve_device(self) -> torch.device:
        want = self.requested_device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            if not torch.cuda.is_available():
                raise BackendUnavailable("--device cuda: no CUDA device is available to this process")
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    @abc.abstractmethod
    def start(self) -> None:
        """Join the job (process group); set rank, world_size, local_rank, device."""

    def check_args(self, args) -> str | None:
        """After :meth:`start`, before anything is created: the message (naming the flag) of a flag
        this backend refuses with this world size, or None. Here: the flags the backend's capabilities
        (:attr:`deepspeed_settings`, :attr:`training_pass_moments`) do not cover; a subclass adds its
        own checks after ``super().check_args(args)``."""
        if args is None:
            return None
        if not self.deepspeed_settings:
            for flag, dest in (("--zero-stage", "zero_stage"), ("--bf16", "bf16"),
                               ("--deepspeed-config", "deepspeed_config")):
                if getattr(args, dest, None) is not None:
                    return f"argument {flag}: only for --backend deepspeed, and this run's backend is {self.name}"
        if not self.fsdp_settings and getattr(args, "fsdp_wrap", None) is not None:
            return f"argument --fsdp-wrap: only for --backend fsdp, and this run's backend is {self.name}"
        if not self.training_pass_moments and getattr(args, "optimizer", None) == "clars" and \
                getattr(args, "clars_moments", None) == "training-pass":
            return (f"argument --clars-moments: training-pass is implemented for --backend single, torchrun, "
                    f"horovod, deepspeed and fsdp (module hooks), and this run's backend is {self.name}; use "
                    f"micro-batch or per-sample")
        return None

    def close(self, failed: bool = False) -> None:
        """Leave the job (only what :meth:`start` created). ``failed``: this rank is leaving on an
        error; no collective is entered (another rank may never reach it: the launcher ends the
        others when this process exits with an error)."""

    @abc.abstractmethod
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, mix=None, moments=None,
                local_batch_size: int, accumulation_steps: int, args=None, config=None) -> Engine:
        """Make ``model`` (already on :attr:`device`) and ``optimizer`` data-parallel.

        ``mix``: the run's :class:`lb_dist.GradientMix` (attached to ``optimizer``), or None; a
        device-wise one is applied in the gradient reduction. ``moments``: a
        :class:`lb_dist.moments.MicroBatchMoments` to feed with each step's micro-batch statistics, or
        None. ``local_batch_size``: samples per rank per optimizer step (micro-batch x
        ``accumulation_steps``). ``args``: the run's flags (``lb_dist.train.parse_args``), for backends
        that build their own configuration from them (DeepSpeed); None elsewhere is fine. ``config``: the
        run's :class:`lb_dist.train.run_config.RunConfig` (its typed optimizer and mix specs: a backend
        that builds the optimizer takes them from here, not from ``args`` again); may be None."""

    @abc.abstractmethod
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place SUM over ranks; returns ``tensor``."""

    @abc.abstractmethod
    def all_gather_object(self, obj: Any) -> list:
        """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""

    @abc.abstractmethod
    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""

    @abc.abstractmethod
    def barrier(self) -> None:
        ...


class LocalEngine(Engine):
    """A plain process's engine: CLARS' micro-batch statistics from the accumulation micro-batches."""


class SingleProcess(Backend):
    """One plain process: no communication. Micro-batch statistics for CLARS come from gradient
    accumulation (``MicroBatchMoments.track_backward``; ``accumulation_steps`` >= 2)."""

    name = "single"
    training_pass_moments = True

    def start(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise BackendUnavailable(f"--backend single in a process group of {dist.get_world_size()} ranks: "
                                     f"use --backend torchrun (or auto)")
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device = self._resolve_device()

    def prepare(self, model, optimizer, *, mix=None, moments=None, local_batch_size, accumulation_steps, args=None,
                config=None):
        if mix is not None and mix.granularity == "device":
            raise ValueError("device-wise GradientMix needs >= 2 data-parallel processes")
        engine = LocalEngine(self, model, optimizer, mix=mix, moments=moments)
        if moments is not None:
            engine.track_accumulation(moments, local_batch_size, accumulation_steps)
        return engine

    def all_reduce_sum(self, tensor):
        return tensor

    def all_gather_object(self, obj):
        return [obj]

    def broadcast_object(self, obj):
        return obj

    def barrier(self) -> None:
        pass


class DDPEngine(Engine):
    """``DistributedDataParallel`` with the ``lb_dist.ddp`` hook (device-wise GradientMix, CLARS'
    micro-batch statistics) when needed; ``no_sync`` for all but the last micro-batch."""

    hook_state = None

    def accumulate(self, last: bool):
        return contextlib.nullcontext() if last else self.forward_module.no_sync()

    def before_evaluation(self) -> None:
        # DDP broadcasts rank 0's buffers at the start of every forward, after which each rank's
        # BatchNorm running statistics move with its own batch: evaluate (and checkpoint) rank 0's.
        if self.backend.world_size > 1:
            for buf in self.model.buffers():
                dist.broadcast(buf, src=0)


class Torchrun(Backend):
    """torch.distributed (``env://``: torchrun, or RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set) with
    ``DistributedDataParallel``. Device-wise GradientMix and CLARS' micro-batch statistics go through
    :func:`lb_dist.ddp.register` (one all-reduce per bucket, no extra round); with a single rank the
    statistics come from the accumulation micro-batches instead. If the process group is already
    initialized (several trainings in one job), it is used and left open."""

    name = "torchrun"
    training_pass_moments = True

    def check_args(self, args) -> str | None:
        message = super().check_args(args)
        if message or self.fsdp_settings:
            return message
        from lb_dist.train.registry import accelerate_fsdp
        if accelerate_fsdp():
            return (f"argument --backend: {self.name} (DistributedDataParallel) in a job started by `accelerate "
                    f"launch --use_fsdp` (ACCELERATE_USE_FSDP is set): the FSDP plugin asks for a sharded model; "
                    f"use --backend fsdp (or auto), or launch without --use_fsdp")
        return None

    def start(self) -> None:
        self._owns_group = False
        if not (dist.is_available() and dist.is_initialized()):
            missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
            if missing:
                raise BackendUnavailable(f"--backend torchrun: environment variable(s) {', '.join(missing)} are not "
                                         f"set; start with `torchrun --nproc_per_node N -m lb_dist.train ...`")
            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            self.device = self._resolve_device()
            backend = self.requested_dist_backend
            if backend == "auto":
                backend = "nccl" if self.device.type == "cuda" else "gloo"
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend)
            self._owns_group = True
        else:
            self.local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
            self.device = self._resolve_device()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def close(self, failed: bool = False) -> None:
        if self._owns_group and dist.is_initialized() and not failed:
            dist.barrier()
            dist.destroy_process_group()

    def prepare(self, model, optimizer, *, mix=None, moments=None, local_batch_size, accumulation_steps, args=None,
                config=None):
        from torch.nn.parallel import DistributedDataParallel as DDP

        import lb_dist.ddp

        ids = [self.device.index] if self.device.type == "cuda" else None
        engine = DDPEngine(self, model, optimizer, DDP(model, device_ids=ids), mix=mix, moments=moments)
        hook_moments = moments
        if moments is not None and not hasattr(moments, "track_backward"):
            # TrainingPassMoments: its sums ride in the hook's all-reduce; finish_step closes the step
            engine.track_accumulation(moments, local_batch_size, accumulation_steps)
        elif moments is not None and self.world_size == 1:
            # one rank: nothing to compare in the all-reduce; as in a single process
            engine.track_accumulation(moments, local_batch_size, accumulation_steps)
            hook_moments = None
        device_mix = mix if mix is not None and mix.granularity == "device" else None
        if device_mix is not None or hook_moments is not None:
            engine.hook_state = lb_dist.ddp.register(engine.forward_module, mix=device_mix, moments=hook_moments,
                                                     micro_batch_size=local_batch_size)
        return engine

    def all_reduce_sum(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_object(self, obj):
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


def __getattr__(name):
    # select_backend / detect_backend moved to lb_dist.train.registry (public: lb_dist.train.select_backend)
    if name in ("select_backend", "detect_backend"):
        import warnings

        from lb_dist.train import registry
        warnings.warn(f"lb_dist.train.backends.{name} moved to lb_dist.train.registry (also lb_dist.train.{name})",
                      DeprecationWarning, stacklevel=2)
        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
