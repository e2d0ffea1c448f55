#!/usr/bin/env python3
"""A vqmoe checkpoint is a real safetensors file: load it with the `safetensors` package (NumPy
backend) and check tensor names, shapes and dtypes against the run's config, and the metadata.

usage: python Tests/python/test_checkpoint.py RUN_DIR   (after `vqmoe train ... --out RUN_DIR`)
"""
import hashlib
import json
import struct
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file


def digest(path):
    """The format-2 checksum (docs: Checkpoint.digest): sha256 of a canonical text of the header,
    then the data section."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__")

    def field(s):
        return f"{len(s.encode())}:{s}"

    text = "vqmoe-checkpoint-2\n"
    for k in sorted(meta):
        if k != "sha256":
            text += f"meta {field(k)} {field(meta[k])}\n"
    for name in sorted(header):
        e = header[name]
        shape = ",".join(str(d) for d in e["shape"])
        text += f"tensor {field(name)} {e['dtype']} {shape} {e['data_offsets'][0]} {e['data_offsets'][1]}\n"
    text += "\n"
    return hashlib.sha256(text.encode() + raw[8 + n :]).hexdigest()


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
    if meta.get("format") != "vqmoe-checkpoint-2" or meta.get("sha256") != digest(path):
        failures.append(f"metadata: {meta} (checksum recomputed here: {digest(path)})")
    if side.get("tensors_sha256") != meta.get("sha256"):
        failures.append(f"sidecar tensors_sha256 {side.get('tensors_sha256')} != file's {meta.get('sha256')}")
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
