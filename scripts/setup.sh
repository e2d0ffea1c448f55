#!/usr/bin/env bash
# Install what vqmoe needs on Debian 12 (OpenBLAS, libffi, zlib, a C compiler, Python venv/pip,
# Open MPI for multi-rank runs) when missing, fetch the data if it is not beside the checkout, then
# build the host, every plugin and the Open MPI comm backend in release mode. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -e /usr/include/zlib.h ] || need+=(zlib1g-dev)
[ -e /usr/include/x86_64-linux-gnu/cblas.h ] || [ -e /usr/include/cblas.h ] || need+=(libopenblas-dev)
[ -e /usr/include/x86_64-linux-gnu/ffi.h ] || [ -e /usr/include/ffi.h ] || need+=(libffi-dev)
command -v cc >/dev/null || need+=(gcc)
command -v python3 >/dev/null || need+=(python3)
python3 -c "import ensurepip" 2>/dev/null || need+=(python3-venv)   # venv for the tests' safetensors check
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)     # pip download for enwik8-mini
command -v mpirun >/dev/null || need+=(openmpi-bin)                 # multi-rank runs (mpirun)
pkg-config --exists ompi-c 2>/dev/null || need+=(libopenmpi-dev pkg-config)  # the comm backend's headers
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]} ..." >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
command -v swift >/dev/null || { echo "swift (6.x) is not on PATH: install the Swift toolchain first" >&2; exit 1; }

scripts/get-data.sh
swift build -c release "$@"
scripts/build-comm-mpi.sh .build/release >/dev/null
