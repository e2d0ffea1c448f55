#!/bin/sh
# Build the my_quantizer plugin and leave libmy_quantizer.so in this folder.
set -e
cd "$(dirname "$0")"
swift build -c release
cp .build/release/libMyQuantizer.so libmy_quantizer.so
echo "built $(pwd)/libmy_quantizer.so"
