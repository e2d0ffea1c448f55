#!/bin/sh
# Build the my_router plugin: one C11 file against the vqmoe ABI headers (beside it once
# `vqmoe plugin new` copied it; the framework's include folder inside the vqmoe checkout).
set -e
cd "$(dirname "$0")"
INC=.
[ -f vqmoe_plugin.h ] || INC=../../../../Sources/VQMoEABI/include
${CC:-cc} -O2 -std=c11 -Wall -Wextra -Werror -shared -fPIC -I"$INC" my_router.c -o libmy_router.so -lm
echo "built $(pwd)/libmy_router.so"
