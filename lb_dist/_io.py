"""Atomic file writes: the one implementation behind checkpoints (lb_dist.train.checkpoint), tokenizer
files (lb_dist.text), lb-dist finetune's JSON records and the Multi30k download helper.

:func:`atomic_write` writes to a temporary file in the target's directory (``.NAME.tmp-PID``), flushes
and fsyncs it, renames it over ``path`` (``os.replace``, atomic on POSIX) and fsyncs the directory:
a crash leaves the old file or the new one, at most plus a temporary file, never a torn ``path``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Callable

__all__ = ["atomic_write", "atomic_write_text", "fsync_dir", "FAULT_ENV"]

#: Test-only fault injection (tests/test_train_faults.py): when this environment variable is set and
#: its value occurs in the name of a file being written by :func:`atomic_write`, the process kills
#: itself (SIGKILL) in the middle of the write, after half of the bytes reached the temporary file,
#: so that the atomic path is exercised by a real crash. Never set it outside tests.
FAULT_ENV = "LB_DIST_TEST_KILL_IN_WRITE"


def _maybe_die_mid_write(path: Path, f) -> None:
    target = os.environ.get(FAULT_ENV)
    if not target or target not in path.name:
        return
    import signal
    f.flush()
    size = f.tell()
    f.truncate(size // 2)
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory (so a rename in it is durable); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write_fn: Callable[[IO[bytes]], object], *, suffix: str = "",
                 remove_stale: bool = False) -> Path:
    """Create or replace ``path`` atomically with what ``write_fn(f)`` writes to ``f`` (a binary file
    opened for writing on the temporary file ``.NAME.tmp-PID{suffix}``; ``f.name`` is its path). The
    parent directory is created. If ``write_fn`` raises, the temporary file is removed, ``path`` is
    untouched and the exception propagates. ``remove_stale``: first delete ``.NAME.tmp-*`` files left
    by a crash of an earlier write (only where one process writes ``path``). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if remove_stale:
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            try:
                stale.unlink()
            except OSError:  # pragma: no cover
                pass
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}{suffix}"
    try:
        with open(tmp, "wb") as f:
            write_fn(f)
            _maybe_die_mid_write(path, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """:func:`atomic_write` of ``text`` encoded with ``encoding``."""
    data = text.encode(encoding)
    return atomic_write(path, lambda f: f.write(data))
