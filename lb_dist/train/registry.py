"""Which backends ``lb-dist train`` has, and which one runs: the backend registry.

Each backend is registered by name as ``"module:Class"``; its module is imported only when the
backend is selected (the DeepSpeed and Horovod packages are optional). The backend modules import
:mod:`lb_dist.train.backends` (the :class:`~lb_dist.train.backends.Backend` interface) and nothing
imports them back but this registry, so there is no import circle.

A backend declares what it can run as class attributes (``training_pass_moments``,
``deepspeed_settings``) and refuses the rest in ``Backend.check_args``; the training loop never
tests a backend's name.
"""
from __future__ import annotations

import importlib
import os

__all__ = ["BACKEND_CLASSES", "BACKEND_NAMES", "register_backend", "backend_class", "detect_backend",
           "accelerate_fsdp", "select_backend"]

#: ``--backend`` name -> ``"module:Class"`` of its :class:`~lb_dist.train.backends.Backend`.
BACKEND_CLASSES: dict[str, str] = {
    "single": "lb_dist.train.backends:SingleProcess",
    "torchrun": "lb_dist.train.backends:Torchrun",
    "deepspeed": "lb_dist.train.backend_deepspeed:DeepSpeedBackend",
    "horovod": "lb_dist.train.backend_horovod:HorovodBackend",
    "fsdp": "lb_dist.train.backend_fsdp:FSDPBackend",
}
#: The names ``--backend`` accepts: ``auto`` (:func:`detect_backend`) and the registered ones.
BACKEND_NAMES = ("auto", *BACKEND_CLASSES)


def register_backend(name: str, target: str) -> None:
    """Register ``target`` (``"module:Class"``) as backend ``name`` for :func:`select_backend`."""
    if not isinstance(target, str) or target.count(":") != 1:
        raise ValueError(f"register_backend: target must be 'module:Class', got {target!r}")
    BACKEND_CLASSES[name] = target


def backend_class(name: str) -> type:
    """The :class:`~lb_dist.train.backends.Backend` subclass registered as ``name`` (its module imported)."""
    from lb_dist.train.backends import BackendUnavailable
    if name not in BACKEND_CLASSES:
        raise BackendUnavailable(f"unknown backend {name!r}")
    module, cls = BACKEND_CLASSES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def detect_backend(environ=None, local_rank_flag: int | None = None) -> str:
    """The backend ``--backend auto`` picks from the launcher's environment:

    * ``horovod``: ``HOROVOD_RANK`` (horovodrun with Gloo);
    * ``fsdp``: ``ACCELERATE_USE_FSDP`` true next to ``RANK``/``WORLD_SIZE`` (``accelerate launch
      --use_fsdp``: Accelerate's FSDP plugin asks for a sharded model; the FSDP version and the
      plugin's other settings are checked by :class:`~lb_dist.train.backend_fsdp.FSDPBackend`);
    * ``torchrun``: ``TORCHELASTIC_RUN_ID`` (torchrun / torch.distributed.run);
    * ``deepspeed``: the ``--local_rank`` argument the deepspeed launcher passes, or its environment
      (``CROSS_RANK`` and ``LOCAL_SIZE`` next to ``RANK``/``WORLD_SIZE``);
    * ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (any env:// launcher);
    * ``horovod``: an MPI launch (``horovodrun --mpi``, ``mpirun``: ``OMPI_COMM_WORLD_SIZE`` or
      ``PMI_SIZE``) with more than one process (DeepSpeed under mpirun: give ``--backend deepspeed``);
    * else ``single``."""
    env = os.environ if environ is None else environ
    if "HOROVOD_RANK" in env:
        return "horovod"
    if accelerate_fsdp(env) and "RANK" in env and "WORLD_SIZE" in env:
        return "fsdp"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if local_rank_flag is not None:  # the deepspeed launcher passes --local_rank
        return "deepspeed"
    launched = all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if launched and "CROSS_RANK" in env and "LOCAL_SIZE" in env:  # deepspeed launcher with --no_local_rank
        return "deepspeed"
    if launched:
        return "torchrun"
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        value = env.get(var, "")
        if value.isdigit() and int(value) > 1:
            return "horovod"
    return "single"


def accelerate_fsdp(environ=None) -> bool:
    """Whether this process was started by ``accelerate launch`` with its FSDP plugin
    (``--use_fsdp`` or ``distributed_type: FSDP`` in the Accelerate config: ``ACCELERATE_USE_FSDP``)."""
    env = os.environ if environ is None else environ
    return env.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")


def select_backend(name: str, *, device: str = "auto", dist_backend: str = "auto",
                   local_rank_flag: int | None = None):
    """An unstarted backend for ``--backend name`` (``auto``: :func:`detect_backend`)."""
    if name == "auto":
        name = detect_backend(local_rank_flag=local_rank_flag)
    return backend_class(name).from_flags(device=device, dist_backend=dist_backend, local_rank_flag=local_rank_flag)
