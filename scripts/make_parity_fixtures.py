#!/usr/bin/env python3
"""Golden fixtures for the Swift engine's PyTorch parity tests (Tests/EngineTests/Fixtures).

A tiny decoder-only Transformer LM, written here in plain PyTorch with the exact semantics of
the Swift engine and its plugins (`smoe` router, `vqvae` quantizer, `lm` head):

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
previous segment (see txl_forward).

usage: python scripts/make_parity_fixtures.py [OUT_DIR]   (needs torch; default OUT_DIR is
Tests/EngineTests/Fixtures)
"""
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

V, T, B, D, H, L, F_INNER, E, K = 32, 8, 2, 16, 2, 2, 32, 4, 2
BETA, MIX_C, GAMMA, AUX_W = 0.08, 0.05, 0.25, 0.01


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


def expert(p, pre, e, x, bank="experts"):
    h = F.gelu(x @ p[f"{pre}.ffn.{bank}.fc1.weight"][e].t() + p[f"{pre}.ffn.{bank}.fc1.bias"][e])
    return h @ p[f"{pre}.ffn.{bank}.fc2.weight"][e].t() + p[f"{pre}.ffn.{bank}.fc2.bias"][e]


def smoe(p, pre, x):
    logits = x @ p[f"{pre}.ffn.router.weight"].t()                       # (N,E)
    probs = logits.softmax(-1)
    topv, topi = logits.topk(K, dim=-1)                                   # descending
    w = topv.softmax(-1)                                                  # softmax over kept logits
    frac = F.one_hot(topi, E).sum(dim=(0, 1)).float() / topi.numel()
    aux = AUX_W * E * (frac * probs.mean(0)).sum()
    return topi, w, aux


def ffn(p, pre, x, mode):
    n = x.shape[0]
    zero = x.new_zeros(())
    if mode == "dense":
        return expert(p, pre, 0, x), zero, zero
    topi, w, aux = smoe(p, pre, x)
    if mode in ("smoe", "shared"):
        gc = torch.ones(n, 1)
    else:
        g = (x @ p[f"{pre}.ffn.gate.weight"].t() + p[f"{pre}.ffn.gate.bias"]).softmax(-1)
        gc, gd = g[:, :1], g[:, 1]
    y = torch.zeros_like(x)
    for j in range(K):
        for e in range(E):
            sel = (topi[:, j] == e).nonzero(as_tuple=True)[0]
            if sel.numel():
                y = y.index_add(0, sel, (gc[sel] * w[sel, j:j + 1]) * expert(p, pre, e, x[sel]))
    if mode == "smoe":
        return y, aux, zero
    if mode == "shared":
        return y + expert(p, pre, 0, x, bank="shared_expert"), aux, zero
    cb = p[f"{pre}.ffn.quantizer.codebook"]
    dist = (x * x).sum(1, keepdim=True) - 2 * x @ cb.t() + (cb * cb).sum(1)
    code = dist.argmin(-1)
    q = cb[code]
    vq = F.mse_loss(q, x.detach()) + GAMMA * F.mse_loss(x, q.detach())
    kind = mode.split("_")[1]
    if kind == "ste":
        xh = x + (q - x).detach()
    elif kind == "mix":
        xh = (1 - MIX_C) * x + MIX_C * (q - x).detach()
    else:
        xh = x
    for e in range(E):
        sel = (code % E == e).nonzero(as_tuple=True)[0]
        if sel.numel():
            y = y.index_add(0, sel, gd[sel].unsqueeze(1) * expert(p, pre, e, xh[sel]))
    return y, aux, vq


def ffn_residual(p, pre, x, mode):
    """x + FFN(LN2(x)) over (B, T, D), with the layer's aux and vq losses."""
    b, t, _ = x.shape
    h = F.layer_norm(x, (D,), p[f"{pre}.ln2.weight"], p[f"{pre}.ln2.bias"], 1e-5)
    y, aux, vq = ffn(p, pre, h.reshape(b * t, D), mode)
    return x + y.view(b, t, D), aux, vq


def lm_output(p, x, tgt, mode, aux_t, vq_t):
    """LN_f, the LM head and the loss parts: logits, CE, aux, vq, total."""
    h = F.layer_norm(x, (D,), p["lnf.weight"], p["lnf.bias"], 1e-5)
    logits = h @ p["head.weight"].t() + p["head.bias"]
    ce = F.cross_entropy(logits.view(-1, V), tgt.reshape(-1))
    total = ce + aux_t + (BETA * vq_t if mode.startswith("vqmoe") else 0)
    return logits, ce, aux_t, vq_t, total


def adam_losses(p, loss_at):
    """Total losses of 10 Adam steps (lr 1e-2, clipping at 1.0); loss_at(step) runs the forward."""
    for v in p.values():
        v.grad = None
    opt = torch.optim.Adam(list(p.values()), lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    losses = []
    for s in range(10):
        opt.zero_grad()
        tot = loss_at(s)
        losses.append(tot.item())
        tot.backward()
        torch.nn.utils.clip_grad_norm_(list(p.values()), 1.0)
        opt.step()
    return losses


def forward(p, tok, tgt, mode):
    x = p["wte"][tok] + p["wpe"][torch.arange(T)]
    aux_t, vq_t = x.new_zeros(()), x.new_zeros(())
    for i in range(L):
        pre = f"layers.{i}"
        h = F.layer_norm(x, (D,), p[f"{pre}.ln1.weight"], p[f"{pre}.ln1.bias"], 1e-5)
        qkv = h @ p[f"{pre}.attn.qkv.weight"].t() + p[f"{pre}.attn.qkv.bias"]
        q, k, v = qkv.split(D, dim=2)
        q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D // H)
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        a = (att @ v).transpose(1, 2).reshape(B, T, D)
        x = x + a @ p[f"{pre}.attn.proj.weight"].t() + p[f"{pre}.attn.proj.bias"]
        x, aux, vq = ffn_residual(p, pre, x, mode)
        aux_t, vq_t = aux_t + aux, vq_t + vq
    return lm_output(p, x, tgt, mode, aux_t, vq_t)


def fixture(mode, seed):
    gen = torch.Generator().manual_seed(seed)
    p = params(mode, gen)
    tok = torch.randint(0, V, (B, T), generator=gen)
    tgt = torch.randint(0, V, (B, T), generator=gen)
    init = {k: v.detach().clone() for k, v in p.items()}
    logits, ce, aux, vq, total = forward(p, tok, tgt, mode)
    total.backward()
    grads = {k: v.grad.detach().clone() for k, v in p.items()}
    losses = adam_losses(p, lambda s: forward(p, tok, tgt, mode)[-1])   # 10 Adam steps on the same batch
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


def softmoe(p, pre, x, groups):
    """Soft MoE (Puigcerver et al. 2024) as the `softmoe` plugin computes it: normalised x and
    phi columns (norm sqrt(|v|^2 + 1e-12)), logits = scale * x^ phi^, dispatch softmax over a
    group's tokens, combine softmax over the E*S slots."""
    phi, scale = p[f"{pre}.ffn.router.phi"], p[f"{pre}.ffn.router.scale"]
    xn = x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-12)
    pn = phi / torch.sqrt((phi * phi).sum(0, keepdim=True) + 1e-12)
    logits = scale * (xn @ pn)                                       # (N, E*S)
    t = x.shape[0] // groups
    lg = logits.view(groups, t, E * S_SLOTS)
    disp, comb = lg.softmax(dim=1), lg.softmax(dim=2)
    xs = disp.transpose(1, 2) @ x.view(groups, t, D)                  # (G, E*S, d)
    ys = torch.empty_like(xs)
    for e in range(E):
        sl = slice(e * S_SLOTS, (e + 1) * S_SLOTS)
        ys[:, sl] = expert(p, pre, e, xs[:, sl].reshape(-1, D)).view(groups, S_SLOTS, D)
    return (comb @ ys).reshape(-1, D)


def vit_forward(p, img, tgt, mode):
    b = img.shape[0]
    pt = img.view(b, IMG_C, IMG_H // PATCH, PATCH, IMG_W // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5).reshape(b, NP, -1)
    emb = pt @ p["patch.weight"].t() + p["patch.bias"]
    x = torch.cat([p["cls"].view(1, 1, D).expand(b, 1, D), emb], dim=1) + p["wpe"]
    aux_t, vq_t = x.new_zeros(()), x.new_zeros(())
    ffn_mode = {"vit_dense": "dense", "vit_smoe": "smoe", "vit_vqmoe": "vqmoe_mix"}.get(mode)
    for i in range(L):
        pre = f"layers.{i}"
        h = F.layer_norm(x, (D,), p[f"{pre}.ln1.weight"], p[f"{pre}.ln1.bias"], 1e-5)
        qkv = h @ p[f"{pre}.attn.qkv.weight"].t() + p[f"{pre}.attn.qkv.bias"]
        q, k, v = qkv.split(D, dim=2)
        q, k, v = (t.view(b, VT, H, D // H).transpose(1, 2) for t in (q, k, v))
        att = ((q @ k.transpose(-2, -1)) / math.sqrt(D // H)).softmax(-1)  # full attention
        a = (att @ v).transpose(1, 2).reshape(b, VT, D)
        x = x + a @ p[f"{pre}.attn.proj.weight"].t() + p[f"{pre}.attn.proj.bias"]
        h = F.layer_norm(x, (D,), p[f"{pre}.ln2.weight"], p[f"{pre}.ln2.bias"], 1e-5).reshape(b * VT, D)
        if mode == "vit_softmoe":
            y, aux, vq = softmoe(p, pre, h, b), h.new_zeros(()), h.new_zeros(())
        else:
            y, aux, vq = ffn(p, pre, h, ffn_mode)
        x = x + y.view(b, VT, D)
        aux_t, vq_t = aux_t + aux, vq_t + vq
    h = F.layer_norm(x, (D,), p["lnf.weight"], p["lnf.bias"], 1e-5)[:, 0]   # class token
    h = F.layer_norm(h, (D,), p["head.norm.weight"], p["head.norm.bias"], 1e-5)
    logits = h @ p["head.head.weight"].t() + p["head.head.bias"]
    ce = F.cross_entropy(logits, tgt)
    total = ce + aux_t + (BETA * vq_t if mode == "vit_vqmoe" else 0)
    return logits, ce, aux_t, vq_t, total


def vit_fixture(mode, seed):
    gen = torch.Generator().manual_seed(seed)
    p = vit_params(mode, gen)
    img = torch.rand(B, IMG_C, IMG_H, IMG_W, generator=gen)
    tgt = torch.randint(0, CLASSES, (B,), generator=gen)
    init = {k: v.detach().clone() for k, v in p.items()}
    logits, ce, aux, vq, total = vit_forward(p, img, tgt, mode)
    total.backward()
    grads = {k: v.grad.detach().clone() for k, v in p.items()}
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


def rel_shift(x):
    """Transformer-XL's _rel_shift on (qlen, klen, B, H): row i moves left by qlen-1-i."""
    zero_pad = torch.zeros((x.size(0), 1, *x.size()[2:]), dtype=x.dtype)
    x_padded = torch.cat([zero_pad, x], dim=1).view(x.size(1) + 1, x.size(0), *x.size()[2:])
    return x_padded[1:].view_as(x)


def txl_forward(p, tok, tgt, mode, mems):
    """One segment (B,T) over the memories (one (B,m,D) per layer, m <= MEM), pre-LN layers as in
    the Swift engine; attention as Transformer-XL's RelPartialLearnableMultiHeadAttn (pre_lnorm):
    AC = (q + u) k^T, BD = rel_shift((q + v) r^T), r = W_r pos_emb(K-1 ... 0), mask j > m + i.
    Returns the outputs and the next memories: the last MEM rows of [mem; layer input], detached."""
    dh = D // H
    m = mems[0].shape[1]
    klen = m + T
    pos = torch.arange(klen - 1, -1, -1.0, dtype=torch.float64)
    inv_freq = 1 / (10000 ** (torch.arange(0.0, D, 2.0, dtype=torch.float64) / D))
    sinus = torch.outer(pos, inv_freq)
    pos_emb = torch.cat([sinus.sin(), sinus.cos()], dim=-1).float()          # (K, D)
    mask = torch.triu(torch.ones(T, klen, dtype=torch.bool), diagonal=1 + m)  # (T, K)
    x = p["wte"][tok]
    aux_t, vq_t = x.new_zeros(()), x.new_zeros(())
    new_mems = []
    for i in range(L):
        pre = f"layers.{i}"
        cat = torch.cat([mems[i], x], dim=1)                                  # (B, K, D)
        new_mems.append(cat[:, -MEM:].detach())
        h = F.layer_norm(cat, (D,), p[f"{pre}.ln1.weight"], p[f"{pre}.ln1.bias"], 1e-5)
        w_heads = h @ p[f"{pre}.attn.qkv.weight"].t() + p[f"{pre}.attn.qkv.bias"]
        q, k, v = w_heads.split(D, dim=2)
        q = q[:, -T:]
        q, k, v = (t.transpose(0, 1).reshape(t.shape[1], B, H, dh) for t in (q, k, v))   # (len, B, H, dh)
        r = (pos_emb @ p[f"{pre}.attn.r.weight"].t()).view(klen, H, dh)
        u, vb = p[f"{pre}.attn.u"].view(H, dh), p[f"{pre}.attn.v"].view(H, dh)
        ac = torch.einsum("ibnd,jbnd->ijbn", q + u, k)
        bd = rel_shift(torch.einsum("ibnd,jnd->ijbn", q + vb, r))
        score = (ac + bd) / math.sqrt(dh)
        score = score.masked_fill(mask[:, :, None, None], float("-inf"))
        prob = score.softmax(dim=1)
        a = torch.einsum("ijbn,jbnd->ibnd", prob, v).reshape(T, B, D).transpose(0, 1)
        x = x + a @ p[f"{pre}.attn.proj.weight"].t() + p[f"{pre}.attn.proj.bias"]
        x, aux, vq = ffn_residual(p, pre, x, mode)
        aux_t, vq_t = aux_t + aux, vq_t + vq
    return lm_output(p, x, tgt, mode, aux_t, vq_t), new_mems


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
    empty = [torch.zeros(B, 0, D) for _ in range(L)]
    _, mems = txl_forward(p, seg(tok, 0), seg(tgt, 0), mode, empty)
    (logits, ce, aux, vq, total), _ = txl_forward(p, seg(tok, 1), seg(tgt, 1), mode, mems)
    total.backward()
    grads = {k: v.grad.detach().clone() for k, v in p.items()}
    mems = empty
    def step(s):
        nonlocal mems
        out, mems = txl_forward(p, seg(tok, s % SEGS), seg(tgt, s % SEGS), mode, mems)
        return out[-1]
    losses = adam_losses(p, step)
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
