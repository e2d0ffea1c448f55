#!/usr/bin/env python3
"""PyTorch reference for `vqmoe bench CONFIG --sample`: generation speed of the bench model
(configs/bench/*.json, ../shared/bench/ref_moe.py's model: d 256, 4 layers, 8 heads, d_ff 512,
8 experts top-2, seq 256, vocabulary 256, GELU experts, pre-LN, untied head) with a key/value
cache, at PyTorch's best: torch.inference_mode, fused attention (scaled_dot_product_attention),
each token's experts run directly (no per-expert loop over empty groups).

What is timed matches vqmoe's GenerationBench: a seeded random prompt is prefilled, then
--tokens tokens are drawn per stream (softmax at temperature 1), each fed back through the
cached layers; when the window (seq_len positions) is full it moves to its last seq_len/2
tokens, recomputed from position 0, as vqmoe's Generator does. Reported: generated tokens/s over
the loop (prefill apart), median ms per token, prefill ms, peak RSS. Weights are the init's
(speed does not depend on them). The JSON summary is the last stdout line.

Routing (--routing): dense (one FFN), smoe (softmax router, top-2, renormalised), vqmoe (the
smoe path plus a VQ code choosing one expert, mixed by a 2-way softmax gate, as ref_moe.py).

usage: python scripts/ref_generate.py --routing vqmoe --threads 1 --tokens 256 --batch 1
"""
import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn


class Expert(nn.Module):
    def __init__(self, d, d_ff):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class MoE(nn.Module):
    """dense / smoe / vqmoe feed-forward over (N, d) rows."""

    def __init__(self, routing, d, d_ff, n_experts, k):
        super().__init__()
        self.routing, self.k = routing, k
        self.experts = nn.ModuleList([Expert(d, d_ff) for _ in range(1 if routing == "dense" else n_experts)])
        if routing != "dense":
            self.router = nn.Linear(d, n_experts, bias=False)
        if routing == "vqmoe":
            self.codebook = nn.Parameter(torch.randn(n_experts, d))
            self.gate = nn.Linear(d, 2)

    def routed(self, x, experts, weights):
        """y[i] = sum_j weights[i, j] * expert_{experts[i, j]}(x[i])."""
        y = torch.zeros_like(x)
        for e in experts.unique().tolist():
            rows, slot = (experts == e).nonzero(as_tuple=True)
            y.index_add_(0, rows, self.experts[e](x[rows]) * weights[rows, slot, None])
        return y

    def forward(self, x):
        if self.routing == "dense":
            return self.experts[0](x)
        p = F.softmax(self.router(x), dim=-1)
        w, idx = p.topk(self.k, dim=-1)
        y = self.routed(x, idx, w / w.sum(-1, keepdim=True))
        if self.routing == "smoe":
            return y
        code = (F.normalize(x, dim=-1) @ F.normalize(self.codebook, dim=-1).t()).argmax(-1, keepdim=True)
        yd = self.routed(x, code, torch.ones_like(code, dtype=x.dtype))
        g = F.softmax(self.gate(x), dim=-1)
        return g[:, :1] * y + g[:, 1:] * yd


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.h, self.ln1, self.ln2 = a.n_head, nn.LayerNorm(a.d_model), nn.LayerNorm(a.d_model)
        self.qkv, self.proj = nn.Linear(a.d_model, 3 * a.d_model), nn.Linear(a.d_model, a.d_model)
        self.ffn = MoE(a.routing, a.d_model, a.d_ff, a.n_experts, a.k)

    def forward(self, x, cache, pos):
        """x (B, t, C) at positions pos..pos+t; cache (k, v) of (B, H, seq, Dh), filled in place."""
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
        cache[0][:, :, pos : pos + t], cache[1][:, :, pos : pos + t] = k, v
        keys, values = cache[0][:, :, : pos + t], cache[1][:, :, : pos + t]
        if t == 1:
            y = F.scaled_dot_product_attention(q, keys, values)
        elif pos == 0:
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:  # a chunk after cached positions: query i sees keys 0..pos+i
            mask = torch.ones(t, pos + t, dtype=torch.bool).tril(pos)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.ffn(self.ln2(x).view(b * t, c)).view(b, t, c)


class Model(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a
        self.wte, self.wpe = nn.Embedding(a.vocab, a.d_model), nn.Embedding(a.seq_len, a.d_model)
        self.blocks = nn.ModuleList([Block(a) for _ in range(a.n_layer)])
        self.lnf, self.head = nn.LayerNorm(a.d_model), nn.Linear(a.d_model, a.vocab, bias=False)

    def forward(self, tokens, caches, pos):
        """tokens (B, t) at positions pos..pos+t → logits (B, V) of the last position."""
        x = self.wte(tokens) + self.wpe(torch.arange(pos, pos + tokens.shape[1]))
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache, pos)
        return self.head(self.lnf(x[:, -1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routing", choices=["dense", "smoe", "vqmoe"], default="vqmoe")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=8)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--n-experts", type=int, default=8)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=256)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Model(a).eval()
    dh = a.d_model // a.n_head
    caches = [
        (torch.zeros(a.batch, a.n_head, a.seq_len, dh), torch.zeros(a.batch, a.n_head, a.seq_len, dh))
        for _ in range(a.n_layer)
    ]
    g = torch.Generator().manual_seed(7)
    seq = torch.randint(0, a.vocab, (a.batch, a.prompt_tokens), generator=g)
    with torch.inference_mode():
        start = time.perf_counter()
        window = max(0, seq.shape[1] - a.seq_len)  # a prompt longer than the window keeps its end
        logits, length = model(seq[:, window:], caches, 0), seq.shape[1] - window
        prefill = time.perf_counter() - start
        steps, last = [], time.perf_counter()
        for i in range(a.tokens):
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=g)
            seq = torch.cat([seq, nxt], dim=1)
            if i + 1 == a.tokens:
                break
            if length == a.seq_len:  # the window is full: keep its last half, recomputed from position 0
                keep = a.seq_len // 2
                model(seq[:, -1 - keep : -1], caches, 0)
                length = keep
            logits = model(nxt, caches, length)
            length += 1
            now = time.perf_counter()
            steps.append(now - last)
            last = now
        loop = last - start - prefill
    out = {
        "mode": "sample", "routing": a.routing, "threads": a.threads, "batch": a.batch, "tokens": a.tokens,
        "prompt_tokens": a.prompt_tokens, "tokens_per_s": (a.tokens - 1) * a.batch / loop,
        "ms_per_token": 1000 * statistics.median(steps), "ms_prefill": 1000 * prefill,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "torch": torch.__version__,
    }
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
