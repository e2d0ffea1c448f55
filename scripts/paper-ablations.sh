#!/usr/bin/env bash
# Ablations of VQMoE (enwik8-mini, the Transformer of Table 1, 3 seeds): quantizer type, codebook
# size K and the quantizer-loss weight beta (configs/paper/ablation_*.json; finished runs are
# skipped). Table 1's VQMoE row (runs/paper/table1/vqmoe, scripts/paper-table1.sh) is each
# ablation's reference point. Prints one table per ablation (test BPC, mean ± std) with the code
# usage (perplexity of the codes chosen on the last logged training batch, mean over layers).
# VQMOE=path/to/vqmoe runs another build (default .build/release/vqmoe).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${VQMOE:-.build/release/vqmoe}
start=$(date +%s)
for a in quantizer codebook beta; do
  "$bin" sweep "configs/paper/ablation_$a.json" > "runs/paper/ablation.$a.log" 2>&1 || { echo "sweep $a failed: runs/paper/ablation.$a.log" >&2; exit 1; }
done
echo "wall time of the sweeps run now: $(( $(date +%s) - start )) s"
python3 - <<'PY'
import glob, json, math, os, statistics as st
def runs(pattern):
    out = []
    for d in sorted(glob.glob(pattern)):
        if not os.path.exists(f"{d}/result.json"):
            continue
        r = json.load(open(f"{d}/result.json"))
        train = [json.loads(l) for l in open(f"{d}/metrics.jsonl") if '"split":"train"' in l]
        ppl = []
        for layer in train[-1].get("code_counts", []):
            s = sum(layer)
            ppl.append(math.exp(-sum(c / s * math.log(c / s) for c in layer if c > 0)) if s else 0)
        out.append((r["test_bpc"], st.mean(ppl) if ppl else float("nan")))
    return out
def row(label, rs):
    b = [x for x, _ in rs]; p = [y for _, y in rs]
    sd = st.stdev(b) if len(b) > 1 else 0
    return f"| {label} | {st.mean(b):.3f} ± {sd:.3f} | {st.mean(p):.2f} | {len(b)} |"
ref = runs("runs/paper/table1/vqmoe/backbone=transformer,data=enwik8,seed=*")
tables = [("quantizer", "quantizer", ["vqvae_plain", "vqgan_cos", "lfq", "rvq"], "vqvae + EMA, k-means init, dead-code restart (Table 1)"),
          ("codebook", "n_codes", ["4", "16", "32"], "8 (= E, Table 1)"),
          ("beta", "beta", ["0.01", "0.05", "0.1", "0.5", "1"], "0.08 (Table 1)")]
for name, key, values, reflabel in tables:
    print(f"\n| {key} | test BPC (mean ± std) | code perplexity | seeds |\n|---|---|---|---|")
    rows = [(v, runs(f"runs/paper/ablation/{name}/{key}={v},seed=*")) for v in values]
    rows.append((reflabel, ref))
    if name == "codebook":
        rows.sort(key=lambda r: int(r[0].split()[0]))
    if name == "beta":
        rows.sort(key=lambda r: float(r[0].split()[0]))
    for v, rs in rows:
        print(row(v, rs) if rs else f"| {v} | - | - | 0 |")
PY
