"""Loading a vqmoe run directory into PyTorch: its checkpoint sidecar (NAME.json: the model as
built, every default resolved) and its safetensors weights (NAME.safetensors)."""
import json
import os
import struct

import numpy as np
import torch

from .model import VQMoEModel

_DTYPES = {"F32": np.float32, "F64": np.float64, "I32": np.int32, "I64": np.int64, "U8": np.uint8}


def read_safetensors(path):
    """(tensors by name as torch tensors, metadata) of a safetensors file; needs no package but
    NumPy (the format: 8-byte little-endian header length, JSON header, data section)."""
    with open(path, "rb") as fh:
        raw = fh.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, e in header.items():
        begin, end = e["data_offsets"]
        a = np.frombuffer(data[begin:end], dtype=_DTYPES[e["dtype"]]).reshape(e["shape"])
        out[name] = torch.from_numpy(a.copy())
    return out, meta


def architecture(run_dir, checkpoint="best"):
    """The sidecar of NAME.safetensors in run_dir: (architecture, step, total training steps)."""
    side_path = os.path.join(run_dir, f"{checkpoint}.json")
    with open(side_path) as fh:
        side = json.load(fh)
    if "model" not in side:
        raise ValueError(
            f"{side_path} has no 'model' entry (the model as built, with every default resolved): it was "
            "written by a vqmoe from before 2026-12-05; train the run again to load it here")
    total = side.get("config", {}).get("train", {}).get("steps", 0)
    return side["model"], side.get("step", 0), total


def load_weights(model, tensors):
    """Copy a checkpoint's tensors into `model`: plugin buffers (`<prefix>.B` parameters,
    `state.<prefix>.B` states) to each plugin module, the rest by parameter name. Every model
    parameter must be present and every checkpoint tensor used (optimizer moments and the
    Transformer-XL training memory aside: evaluation starts from an empty memory)."""
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("optimizer.", "memory."))}
    used = set()
    plugin_prefixes = []
    for prefix, module in model.named_modules():
        if hasattr(module, "load_plugin_tensors"):
            plugin_prefixes.append(prefix)
            params = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
            state = {k[len(prefix) + 7:]: v for k, v in tensors.items() if k.startswith("state." + prefix + ".")}
            module.load_plugin_tensors(params, state)
            used |= {prefix + "." + k for k in params} | {"state." + prefix + "." + k for k in state}
    own = {k: v for k, v in model.named_parameters()
           if not any(k.startswith(p + ".") for p in plugin_prefixes)}
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise KeyError(f"the checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for name, p in own.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)}, model shape {tuple(p.shape)}")
            p.copy_(t)
            used.add(name)
    unused = sorted(set(tensors) - used)
    if unused:
        raise KeyError(f"checkpoint tensors the model does not use: {unused[:5]}{' ...' if len(unused) > 5 else ''}")


def load_run(run_dir, checkpoint="best"):
    """The model of a vqmoe run directory with the weights of NAME.safetensors (`best` or `last`),
    in evaluation mode.

    Example:
        model = load_run("runs/main/vqmoe")
        logits = model(tokens)              # (B, T, vocab), as `vqmoe eval` computes them
    """
    arch, step, total = architecture(run_dir, checkpoint)
    model = VQMoEModel(arch, step=step, total_steps=total)
    tensors, _ = read_safetensors(os.path.join(run_dir, f"{checkpoint}.safetensors"))
    load_weights(model, tensors)
    return model.eval()
