#!/usr/bin/env bash
# Install Horovod (PyTorch + Gloo + MPI operations) into a virtualenv, from a cached wheel when one
# matches, otherwise by building the PyPI sdist once and caching the wheel OUTSIDE the repository.
#
# Why a build: horovod 0.28.1 (the newest release) does not compile against torch >= 2.1 -- its CMake
# asks for C++14 and torch's headers need C++17 (fixed upstream on master, horovod PR #3998, never
# released). This script patches the two `set(CMAKE_CXX_STANDARD 14)` lines to 17 and builds with
# Release flags (no debug info: smaller and faster to compile). Measured: 2 min 38 s on 2 cores, once.
#
# Usage: scripts/install_horovod.sh VENV_PYTHON
# Environment:
#   LB_DIST_CACHE        cache folder (default: ${XDG_CACHE_HOME:-$HOME/.cache}/lb_dist)
#   HOROVOD_VERSION      default 0.28.1
#   HOROVOD_GPU_OPERATIONS=NCCL (and CUDA in the environment) for GPU images: the wheel cache key
#                        includes it, so CPU and GPU wheels never mix.
# Needs: a C++17 compiler, cmake (pip's cmake is used if the system has none), OpenMPI headers and
# mpicxx (Debian: libopenmpi-dev openmpi-bin; scripts/setup.sh installs them when run as root).
set -euo pipefail
PY="${1:?usage: scripts/install_horovod.sh VENV_PYTHON}"
VERSION="${HOROVOD_VERSION:-0.28.1}"
CACHE="${LB_DIST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lb_dist}"
GPU_OPS="${HOROVOD_GPU_OPERATIONS:-none}"

torch_version="$("$PY" -c 'import torch; print(torch.__version__)')"
py_tag="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
mpi_version="$(mpirun --version 2>/dev/null | head -n1 | tr -cd '[:alnum:]._-' || echo nompi)"
key="horovod-${VERSION}_${py_tag}_torch-${torch_version}_${mpi_version}_gpu-${GPU_OPS}_$(uname -m)"
wheel_dir="$CACHE/wheels/$key"

installed_ok() {
    "$PY" - "$VERSION" <<'EOF' 2>/dev/null
import sys
import horovod, horovod.torch as hvd
assert horovod.__version__ == sys.argv[1], horovod.__version__
assert hvd.gloo_built() and hvd.mpi_built(), "horovod.torch lacks Gloo or MPI"
EOF
}

if installed_ok; then
    echo "install_horovod: horovod $VERSION (torch, gloo, mpi) already installed"
    exit 0
fi

if ! command -v mpicxx >/dev/null || ! command -v mpirun >/dev/null; then
    echo "install_horovod: OpenMPI (mpicxx, mpirun) is missing; on Debian/Ubuntu: apt-get install libopenmpi-dev openmpi-bin" >&2
    exit 1
fi

# Horovod's runtime dependencies (the wheel is installed with --no-deps).
"$PY" -m pip install -q cloudpickle psutil pyyaml packaging

wheel="$(ls "$wheel_dir"/horovod-*.whl 2>/dev/null | head -n1 || true)"
if [ -z "$wheel" ]; then
    echo "install_horovod: no cached wheel for $key; building horovod $VERSION from source (about 3 minutes on 2 cores)"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$VERSION" -d "$work"
    tar -xzf "$work/horovod-$VERSION.tar.gz" -C "$work"
    src="$work/horovod-$VERSION"
    # The C++17 fix of horovod PR #3998, and Release instead of RelWithDebInfo.
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'set(CMAKE_CXX_STANDARD 17)' "$src/horovod/torch/CMakeLists.txt" || { echo "install_horovod: C++17 patch did not apply" >&2; exit 1; }
    sed -i "s/'RelWithDebInfo'/'Release'/" "$src/setup.py"
    command -v cmake >/dev/null || "$PY" -m pip install -q cmake
    export PATH="$(dirname "$PY"):$PATH"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1
    export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    export MAKEFLAGS="-j$(nproc)"
    [ "$GPU_OPS" = none ] || export HOROVOD_GPU_OPERATIONS="$GPU_OPS"
    "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" "$src"
    mkdir -p "$wheel_dir"
    cp "$work"/dist/horovod-*.whl "$wheel_dir/"
    wheel="$(ls "$wheel_dir"/horovod-*.whl | head -n1)"
    echo "install_horovod: cached $wheel"
fi

"$PY" -m pip install -q --no-deps --force-reinstall "$wheel"
if ! installed_ok; then
    echo "install_horovod: $wheel installed but horovod.torch lacks Gloo/MPI or does not import; delete $wheel_dir and rerun" >&2
    exit 1
fi
echo "install_horovod: horovod $VERSION installed from $wheel"
