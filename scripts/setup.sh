#!/usr/bin/env bash
# Idempotent setup: a virtualenv in .venv with lb_dist (editable) and the requested extras.
# Usage: scripts/setup.sh [EXTRAS]   e.g. scripts/setup.sh dev,deepspeed,horovod
# A second run with the same inputs installs nothing (a stamp records what was installed).
#
# Extras (pyproject.toml): dev, bench, deepspeed, mpi, horovod, hf, workloads.
# * "mpi" and "horovod" need OpenMPI: installed from Debian/Ubuntu packages when run as root
#   (libopenmpi-dev openmpi-bin), otherwise it must already be there.
# * "horovod" builds a patched Horovod wheel once (scripts/install_horovod.sh, ~3 min on 2 cores)
#   and caches it outside the repository, in ${LB_DIST_CACHE:-~/.cache/lb_dist}.
# * "deepspeed" compiles nothing: DeepSpeed's one CPU JIT op (its shared-memory all-reduce, used only
#   by its tensor-parallel layers) is skipped by lb_dist.deepspeed (see lb_dist/deepspeed/cpu_comm.py).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-dev}"
VENV="${LB_DIST_VENV:-.venv}"
CONSTRAINTS="${LB_DIST_CONSTRAINTS:-constraints/cpu.txt}"
PYTHON="${PYTHON:-python3}"

has_extra() { case ",$EXTRAS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "setup: $PYTHON is missing or older than 3.10; lb_dist needs Python >= 3.10" >&2
    exit 1
fi

apt_install() {  # apt_install PACKAGE... (only as root on Debian/Ubuntu)
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: apt-get install $*"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        echo "setup: missing system packages: $* (install them, or run this script as root on Debian/Ubuntu)" >&2
        exit 1
    fi
}

if has_extra mpi || has_extra horovod; then
    if ! command -v mpirun >/dev/null || ! command -v mpicxx >/dev/null; then
        apt_install libopenmpi-dev openmpi-bin
    fi
fi
if has_extra horovod || has_extra deepspeed; then
    # Horovod's build and DeepSpeed's CPU op compile C++ against torch and Python's headers.
    command -v c++ >/dev/null || apt_install g++
    if ! "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
        apt_install python3-dev
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
        # Debian ships venv/ensurepip separately.
        rm -rf "$VENV"
        apt_install python3-venv
        "$PYTHON" -m venv "$VENV"
    fi
fi

stamp="$VENV/.lb_dist-setup"
want="$(cat pyproject.toml "$CONSTRAINTS" scripts/setup.sh scripts/install_horovod.sh | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ -f "$stamp" ] && grep -qxF "$want" "$stamp"; then
    echo "setup: $VENV is up to date (extras: $EXTRAS)"
    exit 0
fi

echo "setup: installing lb_dist[$EXTRAS] into $VENV (constraints: $CONSTRAINTS)"
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
if has_extra horovod; then
    scripts/install_horovod.sh "$VENV/bin/python"
fi
"$VENV/bin/python" -c 'import torch, lb_dist; print(f"setup: torch {torch.__version__}, lb_dist {lb_dist.__version__}")'
if [ "$(basename "$CONSTRAINTS")" = cpu.txt ] && "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)'; then
    echo "setup: warning: constraints/cpu.txt but pip installed a CUDA build of torch (plain PyPI serves the CUDA" \
         "build for a bare version pin); on a CPU-only machine rerun with" \
         "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu after removing $VENV" >&2
fi
echo "$want" >> "$stamp"
