#!/usr/bin/env bash
# Table 3 analog: ViT on Fashion-MNIST, every method with identical training, 3 seeds each
# (configs/paper/table3_*.json; finished runs are skipped). Prints one table.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${VQMOE:-.build/release/vqmoe}   # VQMOE=path/to/vqmoe runs another build
start=$(date +%s)
for m in dense smoe xmoe stablemoe softmoe vqmoe; do
  "$bin" sweep "configs/paper/table3_$m.json" > /dev/null
done
echo "wall time of the sweeps run now: $(( $(date +%s) - start )) s"
echo "| method | test accuracy (mean ± std, 3 seeds) | valid accuracy | params | tokens/s |"
echo "|---|---|---|---|---|"
for m in dense smoe xmoe stablemoe softmoe vqmoe; do
  python3 - "$m" "runs/paper/table3/$m/results.csv" <<'PY'
import csv, sys
row = next(csv.DictReader(open(sys.argv[2])))
f = lambda k: float(row[k])
print(f"| {sys.argv[1]} | {f('test_accuracy_mean'):.4f} ± {f('test_accuracy_std'):.4f} | {f('valid_accuracy_mean'):.4f} ± {f('valid_accuracy_std'):.4f} | {int(row['params'])/1e6:.2f}M | {f('tokens_per_s_mean'):.0f} |")
PY
done
