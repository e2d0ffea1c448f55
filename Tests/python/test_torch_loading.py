#!/usr/bin/env python3
"""python/vqmoe_torch loads a run directory into PyTorch and gives the engine's logits.

For each RUN_DIR: `vqmoe eval RUN_DIR --logits RUN_DIR/logits.safetensors --batches 2` has
written the inputs and the logits of the first two test batches (Transformer-XL: in order, the
memory carried from the first to the second). The test builds the model with
`vqmoe_torch.load_run(RUN_DIR)`, runs the same inputs and compares: max |diff| <= 2e-4 * (1 + max
|logit|) for every run, and the same argmax at >= 99.9% of positions.

usage: python Tests/python/test_torch_loading.py RUN_DIR...   (needs torch and numpy)
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
import vqmoe_torch  # noqa: E402


def check(run):
    model = vqmoe_torch.load_run(run)
    arch = model.arch
    data, meta = vqmoe_torch.read_safetensors(os.path.join(run, "logits.safetensors"))
    bs, batches = int(meta["batch_size"]), int(meta["batches"])
    inputs, want = data["inputs"], data["logits"]
    lengths = data.get("lengths")
    got, mems = [], None
    with torch.inference_mode():
        for i in range(batches):
            x = inputs[i * bs:(i + 1) * bs]
            x = x.long() if x.dtype == torch.int32 else x
            lens = None if lengths is None else lengths[i * bs:(i + 1) * bs].long()
            if arch["backbone"] == "transformer_xl":
                out, mems = model(x, mems)
            else:
                out = model(x, lengths=lens)
            got.append(out.reshape(-1, out.shape[-1]))
    got = torch.cat(got)
    diff = (got - want).abs().max().item()
    scale = 1 + want.abs().max().item()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    ffn = arch["ffn"]
    what = (f"{arch['backbone']} {ffn['mode']} router={(arch['router'] or {}).get('name')} "
            f"quantizer={(arch['quantizer'] or {}).get('name')} head={arch['head']['name']}")
    ok = diff <= 2e-4 * scale and agree >= 0.999
    print(f"{'ok  ' if ok else 'FAIL'}  {run}: {what}: {tuple(want.shape)} logits, max |diff| {diff:.2e} "
          f"(scale {scale:.1f}), argmax agrees {agree:.4f}")
    return ok


def main(runs):
    results = [check(r) for r in runs]
    if not all(results):
        sys.exit(1)
    print(f"{len(results)} runs: PyTorch logits equal the engine's")


if __name__ == "__main__":
    main(sys.argv[1:])
