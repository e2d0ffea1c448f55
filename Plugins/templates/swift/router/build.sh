#!/bin/sh
# Build the my_router plugin and leave libmy_router.so in this folder.
set -e
cd "$(dirname "$0")"
swift build -c release
cp .build/release/libMyRouter.so libmy_router.so
echo "built $(pwd)/libmy_router.so"
