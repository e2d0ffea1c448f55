#!/usr/bin/env bash
# python/vqmoe_torch against the engine: train small runs that cover every backbone, FFN mode,
# built-in router, quantizer and head, export the logits of their first two test batches
# (`vqmoe eval --logits`), and check that the PyTorch model of each run gives the same logits
# (Tests/python/test_torch_loading.py).
#
# usage: scripts/test-torch-loading.sh PYTHON [OUT_DIR]   (PYTHON must import torch and numpy)
set -euo pipefail
cd "$(dirname "$0")/.."
py=$1
out=${2:-.build/torch-loading}
bin=.build/release
rm -rf "$out"
mkdir -p "$out"
lm='"data": {"name": "char", "path": "$DATA/enwik8-mini/enwik8-mini"}, "head": {"name": "lm"},
  "train": {"steps": 30, "batch_size": 4, "eval_every": 30, "eval_batches": 2, "lr": 0.003}'
model='"n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 32'
ffn() {  # mode [router] [quantizer] [extra ffn fields]
  local r="" q=""
  [ -n "${2:-}" ] && r="\"router\": {\"name\": \"$2\"}, "
  [ -n "${3:-}" ] && q="\"quantizer\": {\"name\": \"$3\"}, "
  echo "\"ffn\": {$r$q${4:-} \"mode\": \"$1\", \"d_inner\": 48, \"n_experts\": 4}"
}
run() {  # name config-json
  echo "$2" > "$out/$1.json"
  "$bin/vqmoe" train "$out/$1.json" --out "$out/$1" > "$out/$1.log" 2>&1 || { cat "$out/$1.log"; exit 1; }
  "$bin/vqmoe" eval "$out/$1" --logits "$out/$1/logits.safetensors" --batches 2 > /dev/null
  runs+=("$out/$1")
}
runs=()
run dense "{\"name\": \"dense\", \"seed\": 1, $lm, \"model\": {$model, $(ffn dense)}}"
run smoe "{\"name\": \"smoe\", \"seed\": 2, $lm, \"model\": {$model, $(ffn smoe smoe)}}"
run shared "{\"name\": \"shared\", \"seed\": 3, $lm, \"model\": {$model, $(ffn shared smoe)}}"
run dense_router "{\"name\": \"dense_router\", \"seed\": 4, $lm, \"model\": {$model, $(ffn smoe dense)}}"
run hash "{\"name\": \"hash\", \"seed\": 5, $lm, \"model\": {$model, $(ffn smoe hash)}}"
run vqmoe_smoe_vqvae "{\"name\": \"v1\", \"seed\": 6, $lm, \"model\": {$model, $(ffn vqmoe smoe vqvae)}}"
run vqmoe_xmoe_vqgan "{\"name\": \"v2\", \"seed\": 7, $lm,
  \"model\": {$model, $(ffn vqmoe xmoe vqgan_cos '"discrete_input": "ste",')}}"
run vqmoe_stablemoe_lfq "{\"name\": \"v3\", \"seed\": 8, $lm,
  \"model\": {$model, $(ffn vqmoe stablemoe lfq '"discrete_input": "x",')}}"
run vqmoe_dropout_rvq "{\"name\": \"v4\", \"seed\": 9, $lm, \"model\": {$model, $(ffn vqmoe smoe_dropout rvq)}}"
# A long context: 520 tokens run the engine's blockwise attention (FlashAttention, from 512).
run long_context "{\"name\": \"long\", \"seed\": 13, \"data\": {\"name\": \"char\", \"path\": \"\$DATA/enwik8-mini/enwik8-mini\"},
  \"head\": {\"name\": \"lm\"}, \"train\": {\"steps\": 10, \"batch_size\": 2, \"eval_every\": 10, \"eval_batches\": 1},
  \"model\": {\"n_layer\": 2, \"n_head\": 2, \"d_model\": 32, \"seq_len\": 520, $(ffn smoe smoe)}}"
run txl "{\"name\": \"txl\", \"seed\": 10,
  \"data\": {\"name\": \"char\", \"path\": \"\$DATA/enwik8-mini/enwik8-mini\", \"order\": \"streams\"},
  \"head\": {\"name\": \"lm\"}, \"train\": {\"steps\": 30, \"batch_size\": 4, \"eval_every\": 30, \"eval_batches\": 2},
  \"model\": {$model, \"backbone\": \"transformer_xl\", \"mem_len\": 16, $(ffn vqmoe smoe vqvae)}}"
# Transformer-XL over 300 + 300 keys: the second batch runs the blockwise relative attention.
run txl_long "{\"name\": \"txl_long\", \"seed\": 14,
  \"data\": {\"name\": \"char\", \"path\": \"\$DATA/enwik8-mini/enwik8-mini\", \"order\": \"streams\"},
  \"head\": {\"name\": \"lm\"}, \"train\": {\"steps\": 6, \"batch_size\": 2, \"eval_every\": 6, \"eval_batches\": 1},
  \"model\": {\"n_layer\": 2, \"n_head\": 2, \"d_model\": 32, \"seq_len\": 300, \"backbone\": \"transformer_xl\",
  \"mem_len\": 300, $(ffn vqmoe smoe vqvae)}}"
vit='"data": {"name": "idx"}, "head": {"name": "image_classifier"},
  "train": {"steps": 20, "batch_size": 8, "eval_every": 20, "eval_batches": 2, "lr": 0.003}'
vitmodel='"backbone": "vit", "patch_size": 7, "n_layer": 2, "n_head": 2, "d_model": 32'
run vit_vqmoe "{\"name\": \"vit_vqmoe\", \"seed\": 11, $vit, \"model\": {$vitmodel, $(ffn vqmoe smoe vqvae)}}"
run vit_softmoe "{\"name\": \"vit_softmoe\", \"seed\": 12, $vit, \"model\": {$vitmodel, $(ffn smoe softmoe)}}"
# Text classification: fine-tune the VQMoE run on SST-2 (classifier head, padded sentences,
# vqmoe_finetune: the discrete path only).
"$bin/vqmoe" finetune configs/finetune/sst2_vqmoe.json --from "$out/vqmoe_smoe_vqvae" --out "$out/sst2" \
  --set model.n_layer=2 --set model.n_head=2 --set model.d_model=32 --set model.seq_len=32 \
  --set model.ffn.d_inner=48 --set model.ffn.n_experts=4 --set train.steps=10 --set train.batch_size=8 \
  --set train.eval_every=10 > "$out/sst2.log" 2>&1 || { cat "$out/sst2.log"; exit 1; }
"$bin/vqmoe" eval "$out/sst2" --logits "$out/sst2/logits.safetensors" --batches 2 > /dev/null
runs+=("$out/sst2")
"$py" Tests/python/test_torch_loading.py "${runs[@]}"
