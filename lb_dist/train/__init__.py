"""``lb-dist train`` / ``python -m lb_dist.train``: one training entry point for every backend.

Public API:

* :func:`main` ``(argv=None) -> int``: the command line (docs/training.md lists every flag);
* :func:`train` ``(argv_or_args, backend=None) -> dict``: the same from Python (the demo runs several
  trainings in one process group through it; a given ``backend`` must be started and is not closed);
* :class:`Backend` (process level) and :class:`Engine` (one prepared model + optimizer),
  :func:`select_backend`, :func:`detect_backend`, :func:`register_backend` (``lb_dist.train.registry``): the
  backend interface, implemented for ``single``,
  ``torchrun``, ``deepspeed`` (:class:`DeepSpeedBackend`, ``lb_dist.deepspeed``) and ``horovod``
  (:class:`HorovodBackend`, ``lb_dist.horovod``); docs/training.md, "Adding a backend";
* :func:`build_parser`, :func:`parse_args`: the flags.
"""
from __future__ import annotations

import argparse
import os
import sys

from lb_dist.train.backends import Backend, BackendConfigError, BackendUnavailable, Engine, SingleProcess, Torchrun
from lb_dist.train.checkpoint import CheckpointError
from lb_dist.train.config import build_parser, parse_args
from lb_dist.train.registry import detect_backend, register_backend, select_backend
from lb_dist.train.trainer import RankFailed, TrainingDiverged, run_training

__all__ = ["main", "train", "Backend", "Engine", "SingleProcess", "Torchrun", "DeepSpeedBackend", "HorovodBackend",
           "BackendUnavailable", "BackendConfigError", "select_backend", "detect_backend", "register_backend", "build_parser", "parse_args",
           "CheckpointError", "TrainingDiverged"]


def __getattr__(name):
    # the DeepSpeed and Horovod backends import their packages only when asked for
    lazy = {"DeepSpeedBackend": "deepspeed", "HorovodBackend": "horovod"}
    if name in lazy:
        from lb_dist.train.registry import backend_class
        return backend_class(lazy[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def train(argv_or_args=None, backend: Backend | None = None) -> dict:
    """Run one training. ``argv_or_args``: a list of flags (as on the command line) or a namespace
    from :func:`parse_args`. Without ``backend``, the one of ``--backend`` is selected, started and
    closed at the end; a given backend must be started and stays open."""
    args = argv_or_args if isinstance(argv_or_args, argparse.Namespace) else parse_args(argv_or_args)
    own = backend is None
    if own:
        backend = select_backend(args.backend, device=args.device, dist_backend=args.dist_backend,
                                 local_rank_flag=args.local_rank)
        backend.start()
    try:
        summary = run_training(args, backend)
    except BaseException:
        if own:
            backend.close(failed=True)    # no barrier: another rank may never reach it
        raise
    if own:
        backend.close()
    summary["closed_process_group"] = own and backend.owns_process_group
    return summary


def main(argv=None, prog: str = "lb-dist train") -> int:
    """Command-line entry point; returns the exit status: 0, or 1 for a failure with a message naming
    the file or setting (a missing data file, a corrupt checkpoint, ...). A bad flag exits with status 2
    (argparse) before any work. A process that ran a torch.distributed job leaves with ``os._exit``
    after flushing (torch 2.13 + gloo can abort in interpreter teardown after a clean shutdown)."""
    args = parse_args(argv, prog=prog)
    try:
        summary = train(args)
    except _USER_ERRORS as e:
        if not getattr(e, "quiet", False):     # RankFailed: the failing rank printed the error
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        _exit_if_launched(1)
        return 1
    except Exception:
        # a traceback: printed by the interpreter; under a launcher leave at once (the other ranks may
        # wait in a collective for this one: the launcher ends them when this process is gone)
        if detect_backend(local_rank_flag=args.local_rank) != "single":
            import traceback
            traceback.print_exc()
            _exit_if_launched(1)
        raise
    if summary.get("stopped"):
        print(f"[lb-dist train] stopped after step {summary['step']} (--stop-after-steps); run the same command to "
              f"continue", file=sys.stderr, flush=True)
    if summary.get("closed_process_group"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _exit_if_launched(code: int) -> None:
    """Under a launcher (several ranks): flush and leave with ``code`` now, without the interpreter's
    teardown (which may wait on the process group)."""
    if detect_backend() != "single" or any(k in os.environ for k in ("LOCAL_RANK", "OMPI_COMM_WORLD_SIZE")):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _user_errors() -> tuple:
    from lb_dist.train._process import RunDirLocked
    errors = [BackendUnavailable, BackendConfigError, CheckpointError, FileNotFoundError, TrainingDiverged,
              RankFailed, RunDirLocked]
    try:
        from lb_dist.data import CifarFormatError, MissingDependencyError, Multi30kFormatError
        errors += [CifarFormatError, MissingDependencyError, Multi30kFormatError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from lb_dist.text import TokenizerFileError, TokenizerMismatchError
        errors += [TokenizerFileError, TokenizerMismatchError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


_USER_ERRORS = _user_errors()
