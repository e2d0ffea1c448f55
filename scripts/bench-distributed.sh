#!/usr/bin/env bash
# Multi-rank speed and memory, side by side in one run (README "Running on several machines"):
# for configs/bench/{dense,smoe,vqmoe}.json, one process with 2 threads against
# `mpirun -np 2 ... --threads 1` data parallel and (routed models) data + expert parallel; then
# the routed bench model at 64 experts (peak RSS per rank, data vs expert parallel), and the
# paper's base configurations (configs/paper/base_*.json) at one rank, whose communication
# volume the README's projections use. Prints a markdown table of ratios; raw JSON lines go to
# .build/bench-distributed.jsonl. Usage: scripts/bench-distributed.sh [--steps N]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=12
[ "${1:-}" = "--steps" ] && steps=$2
bin=.build/release/vqmoe
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
out=.build/bench-distributed.jsonl
: > "$out"
one() { # label, then the command
  local label=$1; shift
  echo "  $label" >&2
  printf '{"label": "%s", "result": %s}\n' "$label" "$("$@" --json | tail -n 1)" >> "$out"
}
mpi() { mpirun --oversubscribe -np 2 "$bin" "$@"; }
for m in dense smoe vqmoe; do
  one "$m 1x2T" "$bin" bench "configs/bench/$m.json" --threads 2 --steps "$steps"
  one "$m dp 2x1T" mpi bench "configs/bench/$m.json" --threads 1 --steps "$steps"
  [ "$m" = dense ] || one "$m ep 2x1T" mpi bench "configs/bench/$m.json" --threads 1 --steps "$steps" \
    --set model.ffn.expert_parallel=true
done
for p in false true; do
  one "smoe E=64 $([ $p = true ] && echo ep || echo dp) 2x1T" mpi bench configs/bench/smoe.json --threads 1 \
    --steps 6 --set model.ffn.n_experts=64 --set model.ffn.expert_parallel=$p
done
for m in smoe vqmoe; do
  one "base_$m 1x2T" "$bin" bench "configs/paper/base_$m.json" --threads 2 --steps 6
  one "base_$m ep 2x1T" mpi bench "configs/paper/base_$m.json" --threads 1 --steps 6 \
    --set model.ffn.expert_parallel=true
done
python3 - "$out" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[r["label"]] = r["result"]
def tps(l): return rows[l]["tokens_per_s"]
print("| model | 1 process, 2 threads | data parallel 2×1 thread | DP / 1×2T | expert parallel 2×1 | EP / DP | all-reduce hidden (DP) | MB sent per step per rank (DP / EP) |")
print("|---|---|---|---|---|---|---|---|")
for m in ["dense", "smoe", "vqmoe"]:
    dp = rows[f"{m} dp 2x1T"]; ep = rows.get(f"{m} ep 2x1T")
    print(f"| {m} | {tps(f'{m} 1x2T'):.0f} tok/s | {dp['tokens_per_s']:.0f} tok/s | {dp['tokens_per_s']/tps(f'{m} 1x2T'):.2f} | "
          + (f"{ep['tokens_per_s']:.0f} tok/s | {ep['tokens_per_s']/dp['tokens_per_s']:.2f} | " if ep else "– | – | ")
          + f"{100*dp['allreduce_hidden']:.0f}% | {dp['sent_bytes_per_step_per_rank']/1e6:.1f}"
          + (f" / {ep['sent_bytes_per_step_per_rank']/1e6:.1f} |" if ep else " |"))
dp, ep = rows["smoe E=64 dp 2x1T"], rows["smoe E=64 ep 2x1T"]
print()
print(f"64 experts (bench smoe): peak RSS per rank {max(dp['peak_rss_mb_per_rank']):.0f} MB data parallel, "
      f"{max(ep['peak_rss_mb_per_rank']):.0f} MB expert parallel (ratio {max(ep['peak_rss_mb_per_rank'])/max(dp['peak_rss_mb_per_rank']):.2f}); "
      f"tokens/s {ep['tokens_per_s']/dp['tokens_per_s']:.2f}x")
for m in ["smoe", "vqmoe"]:
    one_, e = rows[f"base_{m} 1x2T"], rows[f"base_{m} ep 2x1T"]
    print(f"base_{m}: {one_['tokens_per_s']:.0f} tokens/s in one process (2 threads); 2 ranks expert parallel: "
          f"{e['tokens_per_s']:.0f} tokens/s, {e['allreduce_bytes_per_step']/1e6:.1f} MB all-reduced + "
          f"{e['exchange_bytes_per_step']/1e6:.1f} MB exchanged per step per rank")
PY
