"""Helpers the benchmark scripts share: CPU time spent inside wrapped functions, paired overheads
(the median over rounds of each round's ratio to the base variant, with quartiles), and the launch of
a script's own worker processes."""
from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time


def run_local_workers(script: str, nproc: int, marker: str) -> None:
    """Run ``script`` (with this process's arguments) as ``nproc`` torch.distributed workers on this
    machine: RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set, and the environment variable
    ``marker`` = 1 so that the script knows it is a worker. Waits; raises SystemExit if one fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{marker: "1"})
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(script), *sys.argv[1:]], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"workers of {os.path.basename(script)} failed: {codes}")


def time_counter(clock=time.perf_counter):
    """``(spent, timed)``: ``timed(fn)`` wraps ``fn`` so that the time by ``clock`` spent inside it
    is added to ``spent[0]`` (seconds)."""
    spent = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            t = clock()
            try:
                return fn(*a, **k)
            finally:
                spent[0] += clock() - t
        return wrapper

    return spent, timed


def thread_time_counter():
    """:func:`time_counter` of the calling thread's CPU time."""
    return time_counter(time.thread_time)


def median_quartiles(values) -> tuple[float, float, float]:
    """``(median, first quartile, third quartile)``; a single value is all three."""
    values = list(values)
    if len(values) < 2:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4)
    return statistics.median(values), q[0], q[2]


def paired_overheads(values, base) -> list[float]:
    """Per round: ``value / base - 1`` (rounds paired by position)."""
    return [v / b - 1 for v, b in zip(values, base)]


def fmt_overhead(overheads) -> str:
    """``+1.2 % [-3.4, +5.6]``: median and quartiles of relative overheads, in percent."""
    m, q1, q3 = median_quartiles(overheads)
    return f"{100 * m:+.1f} % [{100 * q1:+.1f}, {100 * q3:+.1f}]"


def paired_summary(per_variant: dict, base_name: str) -> dict:
    """``{variant: {"median_s", "overhead"}}`` from ``{variant: [seconds per round]}``: the median time
    and the sorted per-round overheads against ``base_name``."""
    base = per_variant[base_name]
    return {k: {"median_s": statistics.median(v), "overhead": sorted(paired_overheads(v, base))}
            for k, v in per_variant.items()}
