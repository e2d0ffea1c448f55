#!/bin/sh
# Build the pq_c quantizer plugin against the framework's ABI headers.
set -e
cd "$(dirname "$0")"
${CC:-cc} -O2 -std=c11 -Wall -Wextra -Werror -shared -fPIC -I../../../Sources/VQMoEABI/include pq.c -o libpq_c.so -lm
echo "built $(pwd)/libpq_c.so"
