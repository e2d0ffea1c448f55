#!/usr/bin/env python3
"""Golden fixtures for the Swift engine's PyTorch parity tests (Tests/EngineTests/Fixtures).

A tiny decoder-only Transformer LM in PyTorch, built from python/vqmoe_torch (the package that
loads vqmoe runs into PyTorch: one implementation of the engine's semantics for both), with the
`smoe` router, `vqvae` quantizer and `lm` head:

  x = wte[tok] + wpe[t];  per layer: x += proj(attn(LN1(x)));  x += FFN(LN2(x));  LN_f;  head
  attention: fused qkv Linear, causal softmax(QK^T/sqrt(Dh)) V, output Linear (all with bias)
  expert: fc2(gelu(fc1(x))), exact GELU, biases
  dense:  one expert
  smoe:   logits = x W_r^T (no bias); top-k (descending); weights = softmax over the kept logits;
          aux = 0.01 * E * sum_e f_e P_e  (f_e: share of the N*k assignments, P_e: mean full softmax)
  shared: y = smoe(x) + S(x), S a shared expert of its own (DeepSeekMoE), weight 1
  vqmoe:  y = g_c * smoe(x) + g_d * E_{c(x)}(x_hat), [g_c, g_d] = softmax(W_g x + b_g);
          vqvae: c = argmin ||x - e_j||^2, q = e_c, vq = mse(q, sg(x)) + 0.25 mse(x, sg(q));
          x_hat: ste = x + sg(q - x); mix = (1-c) x + c sg(q - x) (c = 0.05); x = x
  head:   logits = LN_f(x) W^T + b; loss = CE
  total = CE + sum(aux) + beta * sum(vq)   (beta = 0.08; vq enters only in vqmoe)

Each fixture stores the weights (under the Swift engine's parameter names), one batch, the
logits, the loss parts, every parameter gradient, and the total losses of 10 Adam steps
(lr 1e-2, betas 0.9/0.999, eps 1e-8, global-norm clipping at 1.0) on that batch.

Transformer-XL (parity_txl_*): the same layers with relative attention over a memory of the
previous segment (vqmoe_torch.RelativeAttention).

usage: python scripts/make_parity_fixtures.py [OUT_DIR]   (needs torch; default OUT_DIR is
Tests/EngineTests/Fixtures)
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from vqmoe_torch import VQMoEModel, load_weights  # noqa: E402
from vqmoe_torch.plugins import resolve_hparams  # noqa: E402

V, T, B, D, H, L, F_INNER, E, K = 32, 8, 2, 16, 2, 2, 32, 4, 2
BETA, MIX_C = 0.08, 0.05   # vqvae's commitment 0.25 and smoe's balance weight 0.01 are their defaults


def params(mode, gen):
    """Random weights (moderate scale, biases non-zero so that every gradient is exercised)."""
    def rnd(*shape, std=0.3):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).float()

    p = {"wte": rnd(V, D), "wpe": rnd(T, D)}
    e = 1 if mode == "dense" else E
    for i in range(L):
        pre = f"layers.{i}"
        p[f"{pre}.ln1.weight"] = 1 + rnd(D, std=0.1)
        p[f"{pre}.ln1.bias"] = rnd(D, std=0.1)
        p[f"{pre}.attn.qkv.weight"] = rnd(3 * D, D)
        p[f"{pre}.attn.qkv.bias"] = rnd(3 * D, std=0.1)
        p[f"{pre}.attn.proj.weight"] = rnd(D, D)
        p[f"{pre}.attn.proj.bias"] = rnd(D, std=0.1)
        p[f"{pre}.ln2.weight"] = 1 + rnd(D, std=0.1)
        p[f"{pre}.ln2.bias"] = rnd(D, std=0.1)
        p[f"{pre}.ffn.experts.fc1.weight"] = rnd(e, F_INNER, D)
        p[f"{pre}.ffn.experts.fc1.bias"] = rnd(e, F_INNER, std=0.1)
        p[f"{pre}.ffn.experts.fc2.weight"] = rnd(e, D, F_INNER)
        p[f"{pre}.ffn.experts.fc2.bias"] = rnd(e, D, std=0.1)
        if mode == "shared":
            p[f"{pre}.ffn.shared_expert.fc1.weight"] = rnd(1, F_INNER, D)
            p[f"{pre}.ffn.shared_expert.fc1.bias"] = rnd(1, F_INNER, std=0.1)
            p[f"{pre}.ffn.shared_expert.fc2.weight"] = rnd(1, D, F_INNER)
            p[f"{pre}.ffn.shared_expert.fc2.bias"] = rnd(1, D, std=0.1)
        if mode.startswith("vqmoe"):
            p[f"{pre}.ffn.gate.weight"] = rnd(2, D)
            p[f"{pre}.ffn.gate.bias"] = rnd(2, std=0.1)
        if mode != "dense":
            p[f"{pre}.ffn.router.weight"] = rnd(E, D)
        if mode.startswith("vqmoe"):
            p[f"{pre}.ffn.quantizer.codebook"] = rnd(E, D, std=1.0)
    p["lnf.weight"] = 1 + rnd(D, std=0.1)
    p["lnf.bias"] = rnd(D, std=0.1)
    p["head.weight"] = rnd(V, D)
    p["head.bias"] = rnd(V, std=0.1)
    return {k: v.clone().requires_grad_(True) for k, v in p.items()}


# The FFN modes of the fixtures: the composition of paths, the router and quantizer.
FFN_MODES = {
    "dense": (["dense"], False, None), "smoe": (["routed"], False, None), "shared": (["routed", "shared"], False, None),
    "vqmoe_mix": (["routed", "discrete"], True, "mix"), "vqmoe_ste": (["routed", "discrete"], True, "ste"),
    "vqmoe_x": (["routed", "discrete"], True, "x"),
}


def plugin(name, hp, **info):
    return {"name": name, "hyperparameters": resolve_hparams(name, hp), "create_info": info}


def architecture(mode, backbone="transformer", router="smoe"):
    """The model description (what a checkpoint sidecar's `model` holds) of a fixture."""
    paths, gated, discrete = FFN_MODES[mode]
    arch = {
        "backbone": backbone, "attention": {"transformer": "causal", "vit": "full", "transformer_xl": "relative"}[backbone],
        "vocab_size": V, "seq_len": T, "n_layer": L, "n_head": H, "d_model": D, "mem_len": 0, "layer_norm_eps": 1e-5,
        "image": None,
        "ffn": {"mode": mode.split("_")[0], "d_inner": F_INNER, "n_experts": 1 if mode == "dense" else E,
                "activation": "gelu", "discrete_input": discrete or "mix", "mix_c": MIX_C, "beta": BETA,
                "gated": gated, "paths": paths},
        "router": None, "quantizer": None,
        "head": dict(plugin("lm", {}), n_out=V, per_token=True),
    }
    if "routed" in paths:
        arch["router"] = (plugin("softmoe", {"slots_per_expert": S_SLOTS}) if router == "softmoe"
                          else plugin("smoe", {"k": K}))
    if discrete:
        arch["quantizer"] = plugin("vqvae", {"ema": False, "kmeans_init": False, "dead_code_threshold": 0.0},
                                   n_codes=E)
    return arch


def build(arch, p):
    """The model of `arch` with the weights `p` (names as the engine's checkpoint)."""
    model = VQMoEModel(arch)
    load_weights(model, {k: v.detach() for k, v in p.items()})
    return model.train()


def loss_parts(model, logits, tgt, mode):
    """CE, aux, vq and total = CE + aux + beta * vq (vq only where a quantizer trains)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
    aux, vq = model.aux_loss, model.vq_loss
    return logits, ce, aux, vq, ce + aux + (BETA * vq if "vqmoe" in mode else 0)


def grads_by_name(model):
    return {k: v.grad.detach().clone() for k, v in model.named_parameters()}


def adam_losses(model, loss_at):
    """Total losses of 10 Adam steps (lr 1e-2, clipping at 1.0); loss_at(step) runs the forward."""
    params = list(model.parameters())
    for v in params:
        v.grad = None
    opt = torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    losses = []
    for s in range(10):
        opt.zero_grad()
        tot = loss_at(s)
        losses.append(tot.item())
        tot.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    return losses


def fixture(mode, seed):
    gen = torch.Generator().manual_seed(seed)
    p = params(mode, gen)
    tok = torch.randint(0, V, (B, T), generator=gen)
    tgt = torch.randint(0, V, (B, T), generator=gen)
    init = {k: v.detach().clone() for k, v in p.items()}
    model = build(architecture(mode), p)
    forward = lambda: loss_parts(model, model(tok), tgt, mode)
    logits, ce, aux, vq, total = forward()
    total.backward()
    grads = grads_by_name(model)
    losses = adam_losses(model, lambda s: forward()[-1])   # 10 Adam steps on the same batch
    flat = lambda t: [float(v) for v in t.reshape(-1).tolist()]
    return {
        "mode": mode, "vocab": V, "seq_len": T, "batch": B, "d_model": D, "n_head": H, "n_layer": L,
        "d_inner": F_INNER, "n_experts": E, "k": K, "beta": BETA, "mix_c": MIX_C,
        "tokens": tok.reshape(-1).tolist(), "targets": tgt.reshape(-1).tolist(),
        "params": {k: {"shape": list(v.shape), "data": flat(v)} for k, v in init.items()},
        "grads": {k: flat(v) for k, v in grads.items()},
        "logits": flat(logits.detach()),
        "loss": {"task": ce.item(), "aux": aux.item(), "vq": vq.item(), "total": total.item()},
        "adam_losses": losses,
    }


# ----------------------------------------------------------------------------- ViT
IMG_C, IMG_H, IMG_W, PATCH, CLASSES, S_SLOTS = 1, 8, 8, 4, 5, 2
NP = (IMG_H // PATCH) * (IMG_W // PATCH)
VT = NP + 1


def vit_params(mode, gen):
    """Token-model weights minus the token embedding, plus patch projection, class token, the
    image head (LayerNorm + linear) and, for SoftMoE, phi (d, E·S) and scale."""
    base = params("dense" if mode == "vit_dense" else ("smoe" if mode != "vit_vqmoe" else "vqmoe_mix"), gen)
    def rnd(*shape, std=0.3):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).float()
    p = {k: v.detach() for k, v in base.items() if k not in ("wte", "wpe", "head.weight", "head.bias")}
    p["wpe"] = rnd(VT, D)
    p["patch.weight"] = rnd(D, IMG_C * PATCH * PATCH)
    p["patch.bias"] = rnd(D, std=0.1)
    p["cls"] = rnd(D)
    p["head.norm.weight"] = 1 + rnd(D, std=0.1)
    p["head.norm.bias"] = rnd(D, std=0.1)
    p["head.head.weight"] = rnd(CLASSES, D)
    p["head.head.bias"] = rnd(CLASSES, std=0.1)
    if mode == "vit_softmoe":
        for i in range(L):
            del p[f"layers.{i}.ffn.router.weight"]
            p[f"layers.{i}.ffn.router.phi"] = rnd(D, E * S_SLOTS, std=1.0)
            p[f"layers.{i}.ffn.router.scale"] = 1 + rnd(1, std=0.2)
    return {k: v.clone().requires_grad_(True) for k, v in p.items()}


def vit_architecture(mode):
    arch = architecture({"vit_dense": "dense", "vit_vqmoe": "vqmoe_mix"}.get(mode, "smoe"), backbone="vit",
                        router="softmoe" if mode == "vit_softmoe" else "smoe")
    arch.update(seq_len=VT, vocab_size=0, image={"channels": IMG_C, "height": IMG_H, "width": IMG_W, "patch": PATCH})
    arch["head"] = dict(plugin("image_classifier", {}), n_out=CLASSES, per_token=False)
    return arch


def vit_fixture(mode, seed):
    gen = torch.Generator().manual_seed(seed)
    p = vit_params(mode, gen)
    img = torch.rand(B, IMG_C, IMG_H, IMG_W, generator=gen)
    tgt = torch.randint(0, CLASSES, (B,), generator=gen)
    init = {k: v.detach().clone() for k, v in p.items()}
    model = build(vit_architecture(mode), p)
    logits, ce, aux, vq, total = loss_parts(model, model(img), tgt, mode)
    total.backward()
    grads = grads_by_name(model)
    flat = lambda t: [float(v) for v in t.reshape(-1).tolist()]
    return {
        "mode": mode, "batch": B, "d_model": D, "n_head": H, "n_layer": L, "d_inner": F_INNER, "n_experts": E, "k": K,
        "image": [IMG_C, IMG_H, IMG_W], "patch": PATCH, "classes": CLASSES, "slots": S_SLOTS, "beta": BETA,
        "images": flat(img), "targets": tgt.tolist(),
        "params": {k: {"shape": list(v.shape), "data": flat(v)} for k, v in init.items()},
        "grads": {k: flat(v) for k, v in grads.items()},
        "logits": flat(logits.detach()),
        "loss": {"task": ce.item(), "aux": aux.item(), "vq": vq.item(), "total": total.item()},
    }


# ----------------------------------------------------------------------------- Transformer-XL
MEM, SEGS = 6, 3   # memory length (< T, so the memory keeps the last MEM of [mem; segment]) and segments per stream


def txl_params(mode, gen):
    """Token-model weights without the absolute positions, plus per layer W_r (D,D) and the
    biases u, v (D = H*Dh) of relative attention."""
    base = params(mode, gen)
    def rnd(*shape, std=0.3):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).float()
    p = {k: v.detach() for k, v in base.items() if k != "wpe"}
    for i in range(L):
        p[f"layers.{i}.attn.r.weight"] = rnd(D, D)
        p[f"layers.{i}.attn.u"] = rnd(D)
        p[f"layers.{i}.attn.v"] = rnd(D)
    return {k: v.clone().requires_grad_(True) for k, v in p.items()}


def txl_architecture(mode):
    arch = architecture(mode, backbone="transformer_xl")
    arch["mem_len"] = MEM
    return arch


def txl_fixture(mode, seed):
    """A stream of SEGS segments per row: segment 0 fills the memory, the logits, losses and
    gradients are those of segment 1 over it; then 10 Adam steps on segments 0, 1, 2, 0, ...
    with the memory carried from step to step (empty at the first)."""
    gen = torch.Generator().manual_seed(seed)
    p = txl_params(mode, gen)
    tok = torch.randint(0, V, (B, SEGS * T), generator=gen)
    tgt = torch.randint(0, V, (B, SEGS * T), generator=gen)
    seg = lambda t, s: t[:, s * T:(s + 1) * T]
    init = {k: v.detach().clone() for k, v in p.items()}
    model = build(txl_architecture(mode), p)
    def txl_forward(s, mems):
        logits, mems = model(seg(tok, s), mems)
        return loss_parts(model, logits, seg(tgt, s), mode), mems
    _, mems = txl_forward(0, None)
    (logits, ce, aux, vq, total), _ = txl_forward(1, mems)
    total.backward()
    grads = grads_by_name(model)
    mems = None
    def step(s):
        nonlocal mems
        out, mems = txl_forward(s % SEGS, mems)
        return out[-1]
    losses = adam_losses(model, step)
    flat = lambda t: [float(v) for v in t.reshape(-1).tolist()]
    return {
        "mode": mode, "vocab": V, "seq_len": T, "mem_len": MEM, "segments": SEGS, "batch": B, "d_model": D, "n_head": H,
        "n_layer": L, "d_inner": F_INNER, "n_experts": E, "k": K, "beta": BETA, "mix_c": MIX_C,
        "tokens": tok.reshape(-1).tolist(), "targets": tgt.reshape(-1).tolist(),
        "params": {k: {"shape": list(v.shape), "data": flat(v)} for k, v in init.items()},
        "grads": {k: flat(v) for k, v in grads.items()},
        "logits": flat(logits.detach()),
        "loss": {"task": ce.item(), "aux": aux.item(), "vq": vq.item(), "total": total.item()},
        "adam_losses": losses,
    }


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "Tests", "EngineTests", "Fixtures")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    for i, mode in enumerate(["dense", "smoe", "vqmoe_mix", "vqmoe_ste", "vqmoe_x", "shared"]):
        fx = fixture(mode, 1000 + i)
        path = os.path.join(out, f"parity_{mode}.json")
        with open(path, "w") as fh:
            json.dump(fx, fh)
        print(f"{path}: total loss {fx['loss']['total']:.6f}, 10 Adam steps {fx['adam_losses'][0]:.4f} -> {fx['adam_losses'][-1]:.4f}")
    for i, mode in enumerate(["vit_dense", "vit_smoe", "vit_vqmoe", "vit_softmoe"]):
        fx = vit_fixture(mode, 2000 + i)
        path = os.path.join(out, f"parity_{mode}.json")
        with open(path, "w") as fh:
            json.dump(fx, fh)
        print(f"{path}: total loss {fx['loss']['total']:.6f}")
    for i, mode in enumerate(["dense", "smoe", "vqmoe_mix"]):
        fx = txl_fixture(mode, 3000 + i)
        path = os.path.join(out, f"parity_txl_{mode}.json")
        with open(path, "w") as fh:
            json.dump(fx, fh)
        print(f"{path}: total loss {fx['loss']['total']:.6f}, 10 Adam steps {fx['adam_losses'][0]:.4f} -> {fx['adam_losses'][-1]:.4f}")


if __name__ == "__main__":
    main()
