#!/bin/sh
# Build the my_head plugin and leave libmy_head.so in this folder.
set -e
cd "$(dirname "$0")"
swift build -c release
cp .build/release/libMyHead.so libmy_head.so
echo "built $(pwd)/libmy_head.so"
