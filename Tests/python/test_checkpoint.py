#!/usr/bin/env python3
"""A vqmoe checkpoint is a real safetensors file: load it with the `safetensors` package (NumPy
backend) and check tensor names, shapes and dtypes against the run's config, and the metadata.

usage: python Tests/python/test_checkpoint.py RUN_DIR   (after `vqmoe train ... --out RUN_DIR`)
"""
import json
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file


def main(run):
    cfg = json.load(open(f"{run}/config.json"))
    side = json.load(open(f"{run}/best.json"))
    m = cfg["model"]
    d, layers, seq = m["d_model"], m["n_layer"], m["seq_len"]
    f = m["ffn"].get("d_inner", 4 * d)
    e = 1 if m["ffn"].get("mode", "dense") == "dense" else m["ffn"].get("n_experts", 8)
    path = f"{run}/{side['checkpoint']}"
    tensors = load_file(path)
    with safe_open(path, framework="numpy") as fh:
        meta = fh.metadata()
    failures = []

    def check(name, shape, dtype=np.float32):
        if name not in tensors:
            failures.append(f"missing {name}")
        elif tuple(tensors[name].shape) != tuple(shape) or tensors[name].dtype != dtype:
            failures.append(f"{name}: {tensors[name].shape} {tensors[name].dtype}, expected {shape} {dtype}")

    check("wte", (256, d))
    check("wpe", (seq, d))
    for i in range(layers):
        check(f"layers.{i}.attn.qkv.weight", (3 * d, d))
        check(f"layers.{i}.attn.proj.bias", (d,))
        check(f"layers.{i}.ffn.experts.fc1.weight", (e, f, d))
        check(f"layers.{i}.ffn.experts.fc2.weight", (e, d, f))
        check(f"optimizer.m.layers.{i}.ln1.weight", (d,))
    check("head.weight", (256, d))
    check("lnf.weight", (d,))
    if meta.get("format") != "vqmoe-checkpoint-1" or len(meta.get("sha256", "")) != 64:
        failures.append(f"metadata: {meta}")
    if int(meta.get("step", -1)) != side["step"]:
        failures.append(f"metadata step {meta.get('step')} != sidecar step {side['step']}")
    if not all(np.isfinite(t).all() for t in tensors.values() if t.dtype == np.float32):
        failures.append("non-finite values")
    n = len([k for k in tensors if not k.startswith("optimizer.")])
    for msg in failures:
        print("FAIL", msg)
    print(f"{1 if not failures else 0} passed, {1 if failures else 0} failed  ({len(tensors)} tensors, {n} model/state tensors, {path})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
