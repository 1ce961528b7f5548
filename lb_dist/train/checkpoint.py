"""Checkpoint files: written atomically, found by step, read with errors that name the file.

A checkpoint is one file ``RUN_DIR/checkpoints/step-{step:08d}.pt`` (``torch.save`` of a dict of
tensors, numbers, strings, lists and dicts, read back with ``torch.load(weights_only=True)``, so
loading a checkpoint never runs code). It is written to a temporary file in the same directory
(``.step-...pt.tmp-PID``), flushed and fsync'ed, then renamed over the final name (``os.replace``,
atomic on POSIX), and the directory is fsync'ed: a crash while writing leaves at most a temporary
file, which is ignored (and removed by the next save), never a checkpoint that loads wrong.

A backend that keeps more files for a checkpoint (DeepSpeed's per-rank ZeRO partitions) puts them in
``DIR/<backend>/step-NNNNNNNN/``, writes them before the checkpoint file, and the checkpoint file is
the commit: files without their ``.pt`` are leftovers of a crash. They are pruned with their file.

The newest complete checkpoint is the one with the highest step. A file that exists under a
checkpoint name but does not load (truncated, corrupt, not a checkpoint) is an error naming it: it
is never skipped silently in favour of an older one (delete it to fall back, the message says so).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from lb_dist._io import atomic_write

__all__ = ["CheckpointError", "FORMAT", "atomic_save", "load_checkpoint", "list_checkpoints", "latest_checkpoint",
           "checkpoint_path", "prune_checkpoints"]

FORMAT = "lb_dist.train.checkpoint/1"
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, truncated, another format, another run)."""


def checkpoint_path(directory: str | os.PathLike, step: int) -> Path:
    return Path(directory) / f"step-{step:08d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of the checkpoint files in ``directory``, oldest first (temporaries ignored)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for entry in d.iterdir():
        m = _NAME.match(entry.name)
        if m and entry.is_file():
            found.append((int(m.group(1)), entry))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def atomic_save(obj: dict, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through a temporary file + fsync + rename
    (:func:`lb_dist._io.atomic_write`; temporaries left by a crash of an earlier save are removed)."""
    return atomic_write(path, lambda f: torch.save(obj, f), remove_stale=True)


def load_checkpoint(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict:
    """Read a checkpoint written by :func:`atomic_save`; :class:`CheckpointError` naming ``path`` if
    it is unreadable, truncated, of another format or lacks one of ``required``."""
    path = Path(path)
    older = [p for _, p in list_checkpoints(path.parent) if p != path]
    hint = (f"; delete it to resume from the previous checkpoint {older[-1]}" if older else
            "; delete it (and the run directory's other files) to start the run over")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read: {e}") from e
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes){hint}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - zip, pickle and EOF errors all mean the same to the user
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'}){hint}") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"checkpoint {path} is not an lb_dist.train checkpoint (format {found!r}, "
                              f"expected {FORMAT!r})")
    missing = [k for k in required if k not in obj]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it is incomplete{hint}")
    return obj


def prune_checkpoints(directory: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (with a backend's ``DIR/<backend>/step-N/`` files)."""
    import shutil

    for _, p in list_checkpoints(directory)[:-keep]:
        try:
            p.unlink()
        except OSError:  # pragma: no cover
            pass
        for sidecar in Path(directory).glob(f"*/{p.stem}"):
            if sidecar.is_dir():
                shutil.rmtree(sidecar, ignore_errors=True)
