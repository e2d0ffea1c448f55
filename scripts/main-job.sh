#!/usr/bin/env bash
# The main job: set up (OpenBLAS, libffi, data, release build), then a short
# dense-vs-SMoE-vs-VQMoE training on enwik8-mini and a BPC table (test BPC from each run's
# best-validation checkpoint). STEPS=N changes the length (default 600 steps each).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
steps=${STEPS:-600}
for m in dense smoe vqmoe; do
  echo "== $m ($steps steps)"
  .build/release/vqmoe train "configs/enwik8_$m.json" --set "train.steps=$steps" --out "runs/main/$m" --force
done
echo
.build/release/vqmoe results runs/main/dense runs/main/smoe runs/main/vqmoe
