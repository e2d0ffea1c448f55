#!/usr/bin/env bash
# The test command: set up, build (release: numeric code is 10-50x slower in debug), run the
# unit tests, then `vqmoe plugins check` on every registered plugin, template and example.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --build-tests
bin=.build/release

echo "== plugins check (every registered plugin)"
failed=0
# cifar has no data on this machine: its unit tests check it on CIFAR-format files they write.
for name in $("$bin/vqmoe" plugins list --json | python3 -c 'import json,sys; print(" ".join(p["name"] for p in json.load(sys.stdin) if p["name"] != "cifar"))'); do
  if "$bin/vqmoe" plugins check "$name" > "/tmp/vqmoe-check-$name.txt" 2>&1; then
    echo "ok    plugins check $name ($(tail -n 1 "/tmp/vqmoe-check-$name.txt"))"
  elif grep -q "failed in create: IO: .* not found" "/tmp/vqmoe-check-$name.txt"; then
    # A dataset whose files are not on this machine (no ../shared/data): say so, don't fail.
    echo "skip  plugins check $name: its data is not here ($(grep -o 'data file [^ ]*\|images file [^ ]*' "/tmp/vqmoe-check-$name.txt" | head -n 1))"
  else
    echo "FAIL  plugins check $name"; cat "/tmp/vqmoe-check-$name.txt"; failed=1
  fi
done
echo "== plugin templates and examples, built and checked as they are"
scripts/check-templates.sh || failed=1
[ "$failed" = 0 ] || exit 1

echo "== checkpoint is real safetensors (Python safetensors package)"
py=.build/pyenv/bin/python
if ! "$py" -c "import safetensors, numpy, tensorboard" 2>/dev/null; then
  python3 -m venv .build/pyenv && .build/pyenv/bin/pip install -q safetensors numpy tensorboard
fi
"$bin/vqmoe" train configs/enwik8_vqmoe.json --out .build/test-run --force --set train.steps=6 --set train.eval_every=3 \
  --set model.n_layer=2 --set model.seq_len=64 > /dev/null
"$py" Tests/python/test_checkpoint.py .build/test-run

echo "== TensorBoard event files (TensorBoard's own reader)"
"$py" Tests/python/test_tensorboard.py .build/test-run
# A run that dies past its last checkpoint (a 300 KB file-size limit fails a write as a full disk
# does: exit 74), then resumes: TensorBoard must show each step once, as metrics.jsonl does.
tiny='{"name": "tiny", "seed": 1, "data": {"name": "char", "path": "$DATA/enwik8-mini/enwik8-mini"},
  "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "seq_len": 16, "ffn": {"mode": "vqmoe", "d_inner": 16,
    "n_experts": 4, "router": {"name": "smoe"}, "quantizer": {"name": "vqvae"}}}, "head": {"name": "lm"},
  "train": {"steps": 3000, "batch_size": 2, "eval_every": 50, "eval_batches": 2, "log_every": 1}}'
echo "$tiny" > .build/test-tiny.json
status=0
(ulimit -f 300; trap '' XFSZ; exec "$bin/vqmoe" train .build/test-tiny.json --out .build/test-resumed --force) \
  > /dev/null 2>&1 || status=$?
[ "$status" = 74 ] || { echo "expected exit 74 from the file-size limit, got $status" >&2; exit 1; }
"$bin/vqmoe" train --resume .build/test-resumed > /dev/null
"$py" Tests/python/test_tensorboard.py .build/test-resumed --resumed

echo "== PyTorch loading (python/vqmoe_torch) against the engine's logits"
# The venv of ../shared/bench/compare.sh and the fixture script (torch + numpy), made once.
tvenv=${TORCH_VENV:-/tmp/vqmoe-torch-venv}
if ! "$tvenv/bin/python" -c "import torch, numpy" 2>/dev/null; then
  python3 -m venv "$tvenv" && "$tvenv/bin/pip" install -q torch numpy
fi
"$tvenv/bin/python" python/vqmoe_torch/plugins.py > /dev/null
scripts/test-torch-loading.sh "$tvenv/bin/python"
# One implementation: the parity fixtures the Swift tests read are what the package computes.
"$tvenv/bin/python" scripts/make_parity_fixtures.py .build/fixtures > /dev/null
"$tvenv/bin/python" Tests/python/test_parity_fixtures.py .build/fixtures

echo "== unit tests"
swift test -c release --skip-build --disable-swift-testing
