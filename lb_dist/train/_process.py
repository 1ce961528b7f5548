"""Process-level safety of a training job: the run directory's lock, and workers that stop with their
launcher (docs/training.md, "What survives what").

* :class:`RunDirLock`: ``RUN_DIR/.lb-dist.lock`` held by rank 0 for the whole run with ``fcntl.flock``
  (released by the kernel when the process dies, so a crashed holder never blocks a rerun); the file
  names the holder (host, pid, start time). A second live job on the same directory is refused with
  :class:`RunDirLocked` naming the holder.
* :func:`stop_with_launcher`: under a launcher (torchrun, deepspeed, horovodrun, mpirun), a daemon
  thread watches the launcher processes this worker descends from (read once from ``/proc``) and
  ends the worker when one of them is gone (``kill -9`` of the launcher would otherwise leave the
  workers training to the end); SIGINT then ends the worker at once, as SIGTERM does (a worker
  blocked in a collective would not see Python's KeyboardInterrupt until the collective returns).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

__all__ = ["RunDirLock", "RunDirLocked", "stop_with_launcher", "LOCK_NAME"]

LOCK_NAME = ".lb-dist.lock"

#: Words in a process's command line that mark it as a launcher of this worker.
_LAUNCHERS = ("torch.distributed.run", "torchrun", "deepspeed", "horovodrun", "mpirun", "orterun", "prterun",
              "orted", "prted", "torch.distributed.launch")


class RunDirLocked(RuntimeError):
    """Another live job holds the run directory."""


class RunDirLock:
    """``fcntl.flock`` on ``RUN_DIR/.lb-dist.lock`` (see the module docstring). :meth:`acquire` raises
    :class:`RunDirLocked` naming the holder; :meth:`release` (also at process exit, by the kernel)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunDirLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
                   f"{holder.get('started', '?')}") if holder else "a process that has not written its name yet"
            raise RunDirLocked(f"run directory {self.path.parent} is in use by another live job ({who}; lock file "
                               f"{self.path}): wait for it to end, or use another --run-dir") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:  # pragma: no cover
                pass
            os.close(self._fd)                    # closing the descriptor releases the flock
            self._fd = None


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of ``pid`` from /proc, or None when it is gone (a zombie, killed but
    not yet reaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), fields[19]            # ppid, starttime (clock ticks after boot)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def launcher_ancestors() -> list[tuple[int, str]]:
    """``[(pid, start time)]`` of the launcher processes above this one: the parent and its own
    ancestors as long as their command lines name a launcher (empty without /proc)."""
    out = []
    pid = os.getppid()
    while pid > 1:
        st = _stat(pid)
        if st is None or not any(word in _cmdline(pid) for word in _LAUNCHERS):
            break
        out.append((pid, st[1]))
        pid = st[0]
    return out


_installed = False


def stop_with_launcher(interval: float = 0.5) -> list[tuple[int, str]]:
    """Under a launcher: watch its processes and end this worker when one is gone; SIGINT ends the
    worker at once. Idempotent; returns the watched ``[(pid, start time)]`` (empty: nothing watched)."""
    global _installed
    watched = launcher_ancestors()
    if _installed or not watched:
        return watched
    _installed = True
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    def watch() -> None:
        while True:
            time.sleep(interval)
            for pid, started in watched:
                st = _stat(pid)
                if st is None or st[1] != started:
                    print(f"[lb-dist train] rank process {os.getpid()}: the launcher (pid {pid}) is gone; stopping",
                          file=sys.stderr, flush=True)
                    os._exit(1)

    threading.Thread(target=watch, name="lb-dist-launcher-watch", daemon=True).start()
    return watched
