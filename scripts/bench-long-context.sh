#!/usr/bin/env bash
# Long contexts side by side with PyTorch's fused attention (../shared/bench/ref_moe.py --attn
# sdpa): the dense bench model at the same 4,096 tokens per batch as seq × batch = 256 × 16,
# 1,024 × 4, 2,048 × 2, 4,096 × 1, alternating ours / PyTorch; tokens/s and peak RSS of each,
# and the ratios (ours / PyTorch).
#
# usage (after `swift build -c release`): scripts/bench-long-context.sh
# env: THREADS="1 2"  STEPS=5  SHAPES="256x16 1024x4 2048x2 4096x1"  TORCH_VENV=/tmp/vqmoe-torch-venv
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-"1 2"} STEPS=${STEPS:-5} SHAPES=${SHAPES:-"256x16 1024x4 2048x2 4096x1"}
TORCH_VENV=${TORCH_VENV:-/tmp/vqmoe-torch-venv}
ref=../shared/bench/ref_moe.py
data=../shared/data/enwik8-mini/enwik8-mini
if ! "$TORCH_VENV/bin/python" -c "import torch" 2>/dev/null; then
  python3 -m venv "$TORCH_VENV" && "$TORCH_VENV/bin/pip" -q install torch numpy >&2
fi
printf '%-11s %2s %12s %12s %6s %10s %10s %6s\n' seq×batch T ours_tok/s torch_tok/s ratio ours_MB torch_MiB ratio
for t in $THREADS; do
  for shape in $SHAPES; do
    seq=${shape%x*} batch=${shape#*x}
    ours=$(.build/release/vqmoe bench configs/bench/dense.json --steps "$STEPS" --threads "$t" --json \
      --set model.seq_len="$seq" --set train.batch_size="$batch" | grep '^{' | tail -n 1)
    theirs=$(OMP_NUM_THREADS=$t "$TORCH_VENV/bin/python" "$ref" --routing dense --threads "$t" --attn sdpa \
      --steps "$STEPS" --warmup 2 --seq "$seq" --batch "$batch" --data file --data-file "$data" --log-every 0 2>/dev/null \
      | grep '^{' | tail -n 1)
    python3 - "$ours" "$theirs" "$seq×$batch" "$t" <<'PY'
import json, sys
o, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
a, b = o["tokens_per_s"], p["tokens_per_s_median"]
m, n = o["peak_rss_mb"], p["rss_mib"]["peak"]
print(f"{sys.argv[3]:<11} {sys.argv[4]:>2} {a:12.0f} {b:12.0f} {a / b:6.2f} {m:10.0f} {n:10.0f} {m / n:6.2f}")
PY
  done
done
