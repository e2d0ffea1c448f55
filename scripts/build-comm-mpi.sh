#!/usr/bin/env bash
# Build the Open MPI communication backend (Plugins/CommMPI/comm_mpi.c) into the release
# build folder, beside the vqmoe executable, where the host finds it when launched by mpirun or
# srun. Needs Open MPI's headers (Debian: libopenmpi-dev; scripts/setup.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-.build/release}
mkdir -p "$out"
flags=$(pkg-config --cflags --libs ompi-c 2>/dev/null || echo "-I/usr/lib/x86_64-linux-gnu/openmpi/include -lmpi")
${CC:-cc} -O2 -std=c11 -Wall -Wextra -Werror -shared -fPIC -ISources/VQMoEABI/include Plugins/CommMPI/comm_mpi.c \
  -o "$out/libvqmoe_comm_mpi.so" $flags -ldl
echo "built $out/libvqmoe_comm_mpi.so"
