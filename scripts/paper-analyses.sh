#!/usr/bin/env bash
# Analyses of the Table 1 runs (runs/paper/table1, scripts/paper-table1.sh):
#  - routing consistency over training (the fraction of a fixed probe batch's tokens whose top-1
#    expert is unchanged between consecutive evaluations), every routed method, both backbones;
#  - representation collapse: effective rank of the MoE-layer inputs of the probe tokens at the
#    last evaluation, and the share of their variance explained by the top-1 expert;
#  - figures: `vqmoe report` over the seed-1 Transformer enwik8-mini runs of SMoE, XMoE and
#    VQMoE (consistency, PCA of expert inputs, expert load, code usage) into docs/figures/.
# Needs numpy (installed into .build/pyenv when missing). VQMOE=path/to/vqmoe as in the others.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${VQMOE:-.build/release/vqmoe}
py=.build/pyenv/bin/python
if ! "$py" -c "import numpy" 2>/dev/null; then
  python3 -m venv .build/pyenv && .build/pyenv/bin/pip install -q numpy
fi
run() { echo "runs/paper/table1/$1/backbone=transformer,data=enwik8,seed=1"; }
"$bin" report "$(run smoe)" "$(run xmoe)" "$(run vqmoe)" --out docs/figures > /dev/null
"$py" - <<'PY'
import glob, json, os
import numpy as np
methods = [("smoe", "SMoE"), ("xmoe", "XMoE"), ("stablemoe", "StableMoE"), ("smoe_dropout", "SMoE-Dropout"), ("vqmoe", "VQMoE")]
cols = [(b, d) for b in ("transformer", "transformer_xl") for d in ("enwik8", "shakespeare", "text8")]
label = {"transformer": "T", "transformer_xl": "TXL", "enwik8": "enwik8", "shakespeare": "Shakespeare", "text8": "text8"}
def probes(d):
    return [json.loads(l) for l in open(f"{d}/metrics.jsonl") if '"split":"probe"' in l]
def consistency(m, b, d, key):
    """Mean over seeds of (mean over evaluation pairs, last pair) of the mean over layers."""
    over, last = [], []
    for run in sorted(glob.glob(f"runs/paper/table1/{m}/backbone={b},data={d},seed=*")):
        ps = [np.mean(p[key]) for p in probes(run) if p.get(key)]
        if ps:
            over.append(np.mean(ps)); last.append(ps[-1])
    return (np.mean(over), np.mean(last)) if over else None
print("Validation BPC (evaluation batches) at 50%, 80% and 100% of training, mean over the six methods and 3 seeds:"
      " how far each curve has flattened.\n")
print("| backbone, data | step 500 | step 800 | step 1000 | last 20% of training |")
print("|---|---|---|---|---|")
for b, d in cols:
    at = {499: [], 799: [], 999: []}
    for run in glob.glob(f"runs/paper/table1/*/backbone={b},data={d},seed=*"):
        for l in open(f"{run}/metrics.jsonl"):
            o = json.loads(l)
            if o["split"] == "valid" and o["step"] in at:
                at[o["step"]].append(o["bpc"])
    if all(at.values()):
        m = {k: np.mean(v) for k, v in at.items()}
        print(f"| {label[b]} {label[d]} | {m[499]:.3f} | {m[799]:.3f} | {m[999]:.3f} | {m[999] - m[799]:+.3f} |")
print()
print("Consistency over training: mean over consecutive evaluations (and at the last one), 3 seeds, mean over layers.\n")
print("| method (path) | " + " | ".join(f"{label[b]} {label[d]}" for b, d in cols) + " |")
print("|---|" + "---|" * len(cols))
rows = [(m, n, "consistency_router") for m, n in methods] + [("vqmoe", "VQMoE", "consistency_discrete")]
for m, n, key in rows:
    cells = []
    for b, d in cols:
        c = consistency(m, b, d, key)
        cells.append(f"{c[0]:.3f} ({c[1]:.3f})" if c else "-")
    path = "discrete path" if key.endswith("discrete") else "router"
    print(f"| {n} ({path}) | " + " | ".join(cells) + " |")

def collapse(run):
    """Effective rank (exp entropy of the normalised eigenvalues of the covariance) of each layer's
    probe-token MoE inputs at the last dump, and the share of their variance between experts."""
    dumps = sorted(glob.glob(f"{run}/repr/step_*.json"), key=lambda f: int(f.split("_")[-1][:-5]))
    layers = json.load(open(dumps[-1]))["layers"]
    ranks, between = [], []
    for layer in layers:
        x = np.array(layer["x"]); e = np.array(layer["code_expert"] or layer["expert"])
        xc = x - x.mean(0)
        ev = np.clip(np.linalg.eigvalsh(xc.T @ xc / len(x)), 0, None)
        p = ev / ev.sum()
        ranks.append(float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum())))
        total = (xc ** 2).sum()
        means = {k: x[e == k].mean(0) for k in set(e.tolist())}
        between.append(sum((e == k).sum() * ((mu - x.mean(0)) ** 2).sum() for k, mu in means.items()) / total)
    return np.mean(ranks), np.mean(between)
print("\nRepresentation collapse at the last evaluation (Transformer, enwik8-mini, 256 probe tokens, mean over layers and 3 seeds;"
      " d_model = 128). VQMoE's experts are those of its discrete path (the code).\n")
print("| method | effective rank of the MoE-layer inputs | variance share between top-1 experts |")
print("|---|---|---|")
for m, n in [("dense", "Dense")] + methods:
    rs = [collapse(r) for r in sorted(glob.glob(f"runs/paper/table1/{m}/backbone=transformer,data=enwik8,seed=*")) if glob.glob(f"{r}/repr/step_*.json")]
    if rs:
        print(f"| {n} | {np.mean([r[0] for r in rs]):.1f} | {np.mean([r[1] for r in rs]):.3f} |")
PY
