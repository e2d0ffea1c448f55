#!/usr/bin/env bash
# Table 2 analog: fine-tune each seed's enwik8-mini Transformer checkpoint from Table 1
# (runs/paper/table1, scripts/paper-table1.sh) on SST-2, SST-5 and BANKING77, every method with
# identical training (configs/paper/table2_*.json; finished runs are skipped). Prints test
# accuracy (mean ± std, 3 seeds) and the analytic FFN FLOPs per token of each fine-tuning path.
# VQMOE=path/to/vqmoe runs another build (default .build/release/vqmoe).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${VQMOE:-.build/release/vqmoe}
methods="dense smoe xmoe stablemoe smoe_dropout vqmoe"
for m in $methods; do
  for s in 1 2 3; do
    ck="runs/paper/table1/$m/backbone=transformer,data=enwik8,seed=$s/best.safetensors"
    [ -f "$ck" ] || { echo "missing $ck: run scripts/paper-table1.sh first" >&2; exit 1; }
  done
done
start=$(date +%s)
for m in $methods; do
  "$bin" sweep "configs/paper/table2_$m.json" > "runs/paper/table2.$m.log" 2>&1 || { echo "sweep $m failed: runs/paper/table2.$m.log" >&2; exit 1; }
done
echo "wall time of the sweeps run now: $(( $(date +%s) - start )) s"
python3 - $methods <<'PY'
import csv, json, sys
names = {"dense": "Dense", "smoe": "SMoE (top-2)", "xmoe": "XMoE (top-2)", "stablemoe": "StableMoE (top-1)",
         "smoe_dropout": "SMoE-Dropout (k = 2 at the end)", "vqmoe": "VQMoE (discrete path only)"}
data = ["sst2", "sst5", "banking77"]
flops = {}
for m in sys.argv[1:]:
    r = json.load(open(f"runs/paper/table2/{m}/data=sst2,seed=1/result.json"))
    flops[m] = (r["ffn_flops_per_token_pretrain"], r["ffn_flops_per_token_finetune"])
print("| method | SST-2 | SST-5 | BANKING77 | FFN FLOPs / token / layer, fine-tuning | vs its pre-training | vs SMoE |")
print("|---|---|---|---|---|---|---|")
for m in sys.argv[1:]:
    rows = {r["run"]: r for r in csv.DictReader(open(f"runs/paper/table2/{m}/results.csv"))}
    cells = [f"{float(rows[f'data={d}']['test_accuracy_mean']):.4f} ± {float(rows[f'data={d}']['test_accuracy_std']):.4f}" for d in data]
    pre, ft = flops[m]
    print(f"| {names[m]} | " + " | ".join(cells) + f" | {ft:,.0f} | {100 * (ft / pre - 1):+.1f}% | {100 * (ft / flops['smoe'][1] - 1):+.1f}% |")
PY
