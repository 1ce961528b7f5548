"""How the training loop talks to a distributed engine: the :class:`Backend` interface.

The loop (``lb_dist.train.trainer``) is backend-neutral. Per optimizer step it does::

    for j, micro_batch in enumerate(micro_batches):          # A accumulation micro-batches
        with backend.accumulate(last=(j == A - 1)):           # no gradient sync before the last one
            backend.backward(loss_of(backend.forward_module, micro_batch))
    backend.finish_gradients()                                # gradients final (moments fed)
    backend.optimizer_step()                                  # unless the loop skips the step
    backend.zero_grad()

and it uses ``rank``/``world_size``, the collectives ``all_reduce_sum``/``all_gather_object``/
``broadcast_object``/``barrier`` (metrics, evaluation), and ``save_checkpoint``/``restore`` (the
backend owns the model and optimizer state, the loop passes the rest).

Implemented: :class:`SingleProcess` (one plain process) and :class:`Torchrun` (torch.distributed, DDP
and the ``lb_dist.ddp`` communication hook for device-wise GradientMix and CLARS' micro-batch
statistics). ``deepspeed`` and ``horovod`` are not available yet: selecting them raises
:class:`BackendUnavailable` naming what is missing. A new backend implements the abstract methods
below; docs/training.md ("Adding a backend") lists what each must guarantee.
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

from lb_dist.train.checkpoint import atomic_save

__all__ = ["Backend", "SingleProcess", "Torchrun", "BackendUnavailable", "select_backend", "detect_backend"]


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not implemented yet, or its package is missing)."""


class Backend(abc.ABC):
    """One data-parallel engine. Attributes after :meth:`start`: ``rank``, ``world_size``, ``device``."""

    name: str = "?"

    def __init__(self, device: str = "auto", dist_backend: str = "auto") -> None:
        self.requested_device = device
        self.requested_dist_backend = dist_backend
        self.rank = 0
        self.world_size = 1
        self.local_rank = 0
        self.device = torch.device("cpu")
        self.model: nn.Module | None = None          # the plain model (parameters, state_dict)
        self.forward_module: nn.Module | None = None  # what the loop calls (e.g. the DDP wrapper)
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _resolve_device(self) -> torch.device:
        want = self.requested_device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        if want == "cuda":
            if not torch.cuda.is_available():
                raise BackendUnavailable("--device cuda: no CUDA device is available to this process")
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    # -------------------------------------------------------------- lifecycle
    @abc.abstractmethod
    def start(self) -> None:
        """Join the job (process group); set rank, world_size, device."""

    def close(self) -> None:
        """Leave the job (only what :meth:`start` created)."""

    # ------------------------------------------------------ model, optimizer
    @abc.abstractmethod
    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, mix=None, moments=None,
                local_batch_size: int, accumulation_steps: int) -> nn.Module:
        """Wrap ``model`` (already on :attr:`device`) for data-parallel training with ``optimizer``.

        ``mix``: a device-wise :class:`lb_dist.GradientMix` to apply in the gradient reduction (or None).
        ``moments``: a :class:`lb_dist.moments.MicroBatchMoments` to feed with the step's micro-batch
        statistics (or None). ``local_batch_size``: samples per rank per optimizer step
        (micro-batch x ``accumulation_steps``). Returns the module to call forward on."""

    def accumulate(self, last: bool) -> ContextManager:
        """Context of one micro-batch's forward + backward; ``last``: the step's last micro-batch
        (gradients are reduced then)."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def finish_gradients(self) -> None:
        """After the last micro-batch's backward: gradients are final (reduced, mixed) and the
        moments estimator has this step's statistics."""

    def optimizer_step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------ collectives
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

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: Path, state: dict) -> None:
        """Write ``state`` (the loop's part: step, schedule, mixing, moments, RNG, ...) plus the model
        and optimizer state to ``path`` atomically; collective (every rank calls it). Default: rank 0
        writes one file, replicated data parallelism (every rank holds the same model and optimizer)."""
        if self.is_main:
            atomic_save({**state, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                        path)
        self.barrier()

    def restore(self, state: dict, path: Path) -> None:
        """Restore model and optimizer from ``state``, the dict read from ``path`` by
        :func:`lb_dist.train.checkpoint.load_checkpoint` (the loop reads the file first to check the
        run's configuration). Collective."""
        from lb_dist.train.checkpoint import CheckpointError

        missing = [k for k in ("model", "optimizer") if k not in state]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it is incomplete")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {path} does not fit this model/optimizer: {e}") from e


class SingleProcess(Backend):
    """One plain process: no communication. Micro-batch statistics for CLARS come from gradient
    accumulation (``MicroBatchMoments.track_backward``; ``accumulation_steps`` >= 2)."""

    name = "single"

    def start(self) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise BackendUnavailable(f"--backend single in a process group of {dist.get_world_size()} ranks: "
                                     f"use --backend torchrun (or auto)")
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.device = self._resolve_device()

    def prepare(self, model, optimizer, *, mix=None, moments=None, local_batch_size, accumulation_steps):
        if mix is not None:
            raise ValueError("device-wise GradientMix needs >= 2 data-parallel processes")
        self.model, self.optimizer, self.forward_module = model, optimizer, model
        self.moments = moments
        if moments is not None:
            # the statistics' micro-batches are the accumulation micro-batches
            moments.micro_batch_size = local_batch_size // accumulation_steps
            moments.track_backward(grad_scale=1.0 / accumulation_steps)
        return model

    def finish_gradients(self) -> None:
        if self.moments is not None:
            self.moments.finish_step()

    def close(self) -> None:
        if getattr(self, "moments", None) is not None:
            self.moments.remove_hooks()

    def all_reduce_sum(self, tensor):
        return tensor

    def all_gather_object(self, obj):
        return [obj]

    def broadcast_object(self, obj):
        return obj

    def barrier(self) -> None:
        pass


class Torchrun(Backend):
    """torch.distributed (``env://``: torchrun, or RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set) with
    ``DistributedDataParallel``. Device-wise GradientMix and CLARS' micro-batch statistics go through
    :func:`lb_dist.ddp.register` (one all-reduce per bucket, no extra round). Gradient accumulation
    uses ``DDP.no_sync`` for all but the last micro-batch. If the process group is already
    initialized (e.g. several trainings in one job), it is used and left open."""

    name = "torchrun"

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

    def close(self) -> None:
        if getattr(self, "local_moments", None) is not None:
            self.local_moments.remove_hooks()
        if self._owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def prepare(self, model, optimizer, *, mix=None, moments=None, local_batch_size, accumulation_steps):
        from torch.nn.parallel import DistributedDataParallel as DDP

        import lb_dist.ddp

        ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = DDP(model, device_ids=ids)
        self.hook_state = None
        self.local_moments = None
        if moments is not None and self.world_size == 1:
            # one rank: nothing to compare in the all-reduce; the accumulation micro-batches are the
            # statistics' micro-batches, as in a single process
            moments.micro_batch_size = local_batch_size // accumulation_steps
            self.local_moments = moments.track_backward(grad_scale=1.0 / accumulation_steps)
            moments = None
        if mix is not None or moments is not None:
            self.hook_state = lb_dist.ddp.register(ddp, mix=mix, moments=moments, micro_batch_size=local_batch_size)
        self.model, self.optimizer, self.forward_module = model, optimizer, ddp
        return ddp

    def finish_gradients(self) -> None:
        if self.local_moments is not None:
            self.local_moments.finish_step()

    def accumulate(self, last: bool):
        return contextlib.nullcontext() if last else self.forward_module.no_sync()

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


def detect_backend(environ=None, local_rank_flag: int | None = None) -> str:
    """The backend ``--backend auto`` picks from the launcher's environment."""
    env = os.environ if environ is None else environ
    if "HOROVOD_RANK" in env:
        return "horovod"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if local_rank_flag is not None:  # the deepspeed launcher passes --local_rank
        return "deepspeed"
    if all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return "torchrun"
    return "single"


def select_backend(name: str, *, device: str = "auto", dist_backend: str = "auto",
                   local_rank_flag: int | None = None) -> Backend:
    """An unstarted backend for ``--backend name`` (``auto``: :func:`detect_backend`)."""
    if name == "auto":
        name = detect_backend(local_rank_flag=local_rank_flag)
    if name == "single":
        return SingleProcess(device, dist_backend)
    if name == "torchrun":
        return Torchrun(device, dist_backend)
    if name in ("deepspeed", "horovod"):
        adapter = {"deepspeed": "lb_dist.deepspeed", "horovod": "lb_dist.horovod"}[name]
        raise BackendUnavailable(f"backend {name} is not available yet in lb-dist train (its adapter {adapter} is "
                                 f"being integrated); use --backend torchrun or single")
    raise BackendUnavailable(f"unknown backend {name!r}")
