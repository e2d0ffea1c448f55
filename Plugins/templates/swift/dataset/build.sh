#!/bin/sh
# Build the my_dataset plugin and leave libmy_dataset.so in this folder.
set -e
cd "$(dirname "$0")"
swift build -c release
cp .build/release/libMyDataset.so libmy_dataset.so
echo "built $(pwd)/libmy_dataset.so"
