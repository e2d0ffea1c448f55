#!/bin/sh
# Build the cosine_vq_c quantizer plugin against the framework's ABI header.
set -e
cd "$(dirname "$0")"
${CC:-cc} -O2 -std=c11 -Wall -Wextra -shared -fPIC -I../../../Sources/VQMoEABI/include cosine_vq.c -o libcosine_vq.so -lm
echo "built $(pwd)/libcosine_vq.so"
