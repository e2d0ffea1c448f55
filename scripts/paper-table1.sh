#!/usr/bin/env bash
# Table 1 analog: char-level language modelling, Transformer and Transformer-XL, on enwik8-mini,
# tiny Shakespeare and text8-cleaned enwik8-mini; dense, SMoE, XMoE, StableMoE, SMoE-Dropout and
# VQMoE with identical training, 3 seeds each (configs/paper/table1_*.json; finished runs are
# skipped, so an interrupted script continues). Prints the test-BPC table (mean ± std).
# VQMOE=path/to/vqmoe runs another build (default .build/release/vqmoe).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${VQMOE:-.build/release/vqmoe}
methods="dense smoe xmoe stablemoe smoe_dropout vqmoe"
start=$(date +%s)
for m in $methods; do
  "$bin" sweep "configs/paper/table1_$m.json" > "runs/paper/table1.$m.log" 2>&1 || { echo "sweep $m failed: runs/paper/table1.$m.log" >&2; exit 1; }
done
echo "wall time of the sweeps run now: $(( $(date +%s) - start )) s"
python3 - $methods <<'PY'
import csv, sys
names = {"dense": "Dense", "smoe": "SMoE (top-2)", "xmoe": "XMoE (top-2)", "stablemoe": "StableMoE (top-1)",
         "smoe_dropout": "SMoE-Dropout (1 → 2)", "vqmoe": "VQMoE (top-1 StableMoE gate + discrete)"}
cols = [(b, d) for b in ("transformer", "transformer_xl") for d in ("enwik8", "shakespeare", "text8")]
label = {"transformer": "T", "transformer_xl": "TXL", "enwik8": "enwik8-mini", "shakespeare": "Shakespeare", "text8": "text8-mini"}
print("| method | " + " | ".join(f"{label[b]} {label[d]}" for b, d in cols) + " | params |")
print("|---|" + "---|" * (len(cols) + 1))
for m in sys.argv[1:]:
    rows = {r["run"]: r for r in csv.DictReader(open(f"runs/paper/table1/{m}/results.csv"))}
    cells = []
    for b, d in cols:
        r = rows.get(f"backbone={b},data={d}")
        cells.append(f"{float(r['test_bpc_mean']):.3f} ± {float(r['test_bpc_std']):.3f}" if r and r["test_bpc_mean"] else "-")
    p = rows.get("backbone=transformer,data=enwik8", {}).get("params", "0")
    print(f"| {names[m]} | " + " | ".join(cells) + f" | {int(p) / 1e6:.2f}M |")
PY
