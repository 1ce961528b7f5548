"""Start real torch.distributed worker processes (gloo, one machine) for the GradientMix / DDP tests."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = "1"
    env["MKL_NUM_THREADS"] = "1"
    return env


def launch(script: str, args: list[str], nproc: int = 2, timeout: float = 120.0) -> None:
    """Run ``tests/<script>`` as ``nproc`` ranks (RANK/WORLD_SIZE/MASTER_* env, as torchrun sets them)."""
    port = free_port()
    procs = []
    for rank in range(nproc):
        env = child_env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(TESTS / script), *args], env=env, cwd=str(REPO),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise AssertionError(f"{script} failed on ranks {failed}:\n" +
                             "\n".join(f"--- rank {r} ---\n{o[-4000:]}" for r, o in enumerate(outputs)))
