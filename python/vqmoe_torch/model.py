"""The vqmoe models as torch.nn.Modules: GPT-2-style Transformer, Transformer-XL and ViT
backbones with dense, SMoE, VQMoE, VQMoE-finetune and shared-expert feed-forward layers.

The computation is the Swift engine's (docs/design.md, "The method"), written out:

  input       tokens: x = wte[tok] + wpe[t]   (Transformer-XL: x = wte[tok], positions are relative)
              images: x = [cls; patches W_p^T + b_p] + wpe   (patches (c, ph, pw)-flattened)
  block       x += proj(attn(LN1(x)));  x += FFN(LN2(x))        (pre-LN, LayerNorm eps 1e-5)
  attention   causal (GPT-2) / full (ViT): softmax(Q K^T / sqrt(Dh)) V over a fused qkv Linear;
              relative (Transformer-XL, Dai et al. 2019): AC = (q + u) k^T, BD = shift((q + v) r^T),
              r = W_r sin/cos(distance), over [memory; segment], keys after the query masked
  FFN paths   dense:     y = E_0(x)
              routed:    y = sum_{j<k} w_j E_{i_j}(x)     (top-k router)  or  C (E(D^T X))  (SoftMoE)
              discrete:  y = (1/L) sum_l E_{c_l mod E}(x_hat)  (quantizer codes c_1..c_L)
                         x_hat = x + sg(q - x) (ste) | (1 - c) x + c (q - x) (mix) | x (x)
              shared:    y = E_shared(x)
              vqmoe:     routed and discrete mixed by [g_c, g_d] = softmax(W_g x + b_g)
  expert      E_e(x) = fc2_e(act(fc1_e(x)))   (exact GELU or ReLU)
  output      LN_f, then the head plugin (lm: logits = h W^T + b)

Parameter names are the engine's checkpoint names ("layers.0.attn.qkv.weight", ...), so
`model.load_state_dict` takes a checkpoint's tensors as they are (see `load_run`).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import plugins


class ExpertBank(nn.Module):
    """E two-layer MLPs d -> d_inner -> d stored as one tensor per weight (the engine's
    `<layer>.experts` / `<layer>.shared_expert`): fc1.weight (E,F,d), fc1.bias (E,F),
    fc2.weight (E,d,F), fc2.bias (E,d)."""

    def __init__(self, count, d_model, d_inner, activation="gelu"):
        super().__init__()
        self.fc1 = nn.Module()
        self.fc1.weight = nn.Parameter(torch.zeros(count, d_inner, d_model))
        self.fc1.bias = nn.Parameter(torch.zeros(count, d_inner))
        self.fc2 = nn.Module()
        self.fc2.weight = nn.Parameter(torch.zeros(count, d_model, d_inner))
        self.fc2.bias = nn.Parameter(torch.zeros(count, d_model))
        if activation not in ("gelu", "relu"):
            raise ValueError(f"unknown activation {activation!r}")
        self.activation = activation

    def expert(self, e, x):
        """E_e(x) for x (n, d)."""
        h = x @ self.fc1.weight[e].t() + self.fc1.bias[e]                    # (n,F)
        h = F.gelu(h) if self.activation == "gelu" else F.relu(h)
        return h @ self.fc2.weight[e].t() + self.fc2.bias[e]                 # (n,d)

    def mix(self, x, experts, weights):
        """sum_j weights[:, j] * E_{experts[:, j]}(x) for x (N,d), experts / weights (N,k)."""
        y = torch.zeros_like(x)
        for j in range(experts.shape[1]):
            for e in torch.unique(experts[:, j]).tolist():
                sel = (experts[:, j] == e).nonzero(as_tuple=True)[0]
                y = y.index_add(0, sel, weights[sel, j:j + 1] * self.expert(e, x[sel]))
        return y


class MoELayer(nn.Module):
    """One feed-forward layer: its paths (see the module docstring), an optional gate over them,
    the experts, and the router / quantizer plugins. forward(x (N,d), token_ids (N,) | None,
    n_groups) -> y (N,d); `aux` and `vq` hold the last forward's router and quantizer losses (0
    for plugins whose loss is not ported)."""

    def __init__(self, arch, step=0, total_steps=0):
        super().__init__()
        f, d = arch["ffn"], arch["d_model"]
        self.paths = list(f["paths"])
        self.discrete_input, self.mix_c = f["discrete_input"], float(f["mix_c"])
        self.experts = ExpertBank(f["n_experts"], d, f["d_inner"], f["activation"])
        if "shared" in self.paths:
            self.shared_expert = ExpertBank(1, d, f["d_inner"], f["activation"])
        if f["gated"]:
            self.gate = nn.Linear(d, len(self.paths))
        if "routed" in self.paths:
            r = arch["router"]
            self.router = plugins.build_router(
                r["name"], r["hyperparameters"], d_model=d, n_experts=f["n_experts"],
                step=step, total_steps=total_steps, **_extra(r))
        if any(p.startswith("discrete") for p in self.paths):
            q = arch["quantizer"]
            self.quantizer = plugins.build_quantizer(
                q["name"], q["hyperparameters"], d_model=d, n_experts=f["n_experts"],
                step=step, total_steps=total_steps, **_extra(q))
        self.aux = torch.zeros(())
        self.vq = torch.zeros(())

    def forward(self, x, token_ids=None, n_groups=1):
        n = x.shape[0]
        g = self.gate(x).softmax(-1) if hasattr(self, "gate") else None     # (N,P)
        y = torch.zeros_like(x)
        self.aux, self.vq = x.new_zeros(()), x.new_zeros(())
        for p, path in enumerate(self.paths):
            scale = g[:, p:p + 1] if g is not None else x.new_ones(n, 1)   # (N,1)
            if path == "dense":
                y = y + scale * self.experts.expert(0, x)
            elif path == "shared":
                y = y + scale * self.shared_expert.expert(0, x)
            elif path == "routed":
                r = self.router(x, token_ids, n_groups)
                self.aux = getattr(self.router, "aux_loss", self.aux)
                if r.kind == "topk":
                    y = y + self.experts.mix(x, r.experts, scale * r.weights)
                else:
                    y = y + scale * self._soft(x, r.dispatch, r.combine, n_groups, r.slots)
            else:  # discrete / discrete_frozen
                q, codes = self.quantizer(x)                                 # (N,d), (N,L)
                self.vq = getattr(self.quantizer, "loss", self.vq)
                if self.discrete_input == "ste":
                    x_hat = x + (q - x).detach()
                elif self.discrete_input == "mix":
                    x_hat = (1 - self.mix_c) * x + self.mix_c * (q - x).detach()
                else:
                    x_hat = x
                levels = codes.shape[1]
                w = scale.expand(n, levels) / levels                           # (N,L)
                y = y + self.experts.mix(x_hat, codes % self.experts.fc1.weight.shape[0], w)
        return y

    def _soft(self, x, dispatch, combine, groups, slots):
        """SoftMoE (Puigcerver et al. 2024): per group X~ = D^T X (E*S slots), Y~_e = E_e(X~_e),
        Y = C Y~."""
        n, d = x.shape
        t, es = n // groups, dispatch.shape[1]
        xs = dispatch.view(groups, t, es).transpose(1, 2) @ x.view(groups, t, d)   # (G,E*S,d)
        ys = torch.empty_like(xs)
        for e in range(es // slots):
            sl = slice(e * slots, (e + 1) * slots)
            ys[:, sl] = self.experts.expert(e, xs[:, sl].reshape(-1, d)).view(groups, slots, d)
        return (combine.view(groups, t, es) @ ys).reshape(n, d)


def _extra(spec):
    """Creation facts a plugin may read beyond d_model / n_experts (vocab size, code count...)."""
    info = dict(spec.get("create_info", {}))
    for k in ("d_model", "n_experts", "total_steps"):
        info.pop(k, None)
    return {"create_info": info} if info else {}


class Attention(nn.Module):
    """Multi-head self-attention over a fused qkv projection, causal (GPT-2) or full (ViT)."""

    def __init__(self, d_model, n_head, causal):
        super().__init__()
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.n_head, self.causal = n_head, causal

    def forward(self, h):
        b, t, d = h.shape
        q, k, v = self.qkv(h).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)        # (B,H,T,Dh)
        return self.proj(a.transpose(1, 2).reshape(b, t, d))


class RelativeAttention(nn.Module):
    """Transformer-XL's relative positional attention (Dai et al. 2019, RelPartialLearnable):
    score = ((q + u) k^T + shift((q + v) r^T)) / sqrt(Dh) over the keys [memory; segment], r =
    W_r s(K-1 ... 0) with s the sinusoid encoding, keys after each query masked."""

    def __init__(self, d_model, n_head):
        super().__init__()
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.r = nn.Linear(d_model, d_model, bias=False)
        self.u = nn.Parameter(torch.zeros(d_model))
        self.v = nn.Parameter(torch.zeros(d_model))
        self.n_head = n_head

    @staticmethod
    def sinusoids(klen, d):
        """[sin(p f_i) ..., cos(p f_i) ...] for p = klen-1 ... 0, f_i = 10000^(-2i/d)."""
        pos = torch.arange(klen - 1, -1, -1.0, dtype=torch.float64)
        inv_freq = 1 / (10000 ** (torch.arange(0.0, d, 2.0, dtype=torch.float64) / d))
        s = torch.outer(pos, inv_freq)
        return torch.cat([s.sin(), s.cos()], dim=-1).float()                   # (K,d)

    def forward(self, h_cat, t):
        """h_cat (B,K,d): LN1 of [memory; segment]; the last t rows are the queries."""
        b, klen, d = h_cat.shape
        m, nh, dh = klen - t, self.n_head, d // self.n_head
        q, k, v = self.qkv(h_cat).split(d, dim=2)
        q = q[:, -t:]
        q, k, v = (z.view(b, z.shape[1], nh, dh) for z in (q, k, v))          # (B,len,H,Dh)
        r = self.r(self.sinusoids(klen, d).to(h_cat.dtype)).view(klen, nh, dh)
        ac = torch.einsum("bind,bjnd->bnij", q + self.u.view(nh, dh), k)       # (B,H,t,K)
        bd = torch.einsum("bind,jnd->bnij", q + self.v.view(nh, dh), r)
        bd = _rel_shift(bd)
        score = (ac + bd) / math.sqrt(dh)
        mask = torch.triu(torch.ones(t, klen, dtype=torch.bool, device=h_cat.device), diagonal=1 + m)
        prob = score.masked_fill(mask, float("-inf")).softmax(-1)
        a = torch.einsum("bnij,bjnd->bind", prob, v).reshape(b, t, d)
        return self.proj(a)


def _rel_shift(x):
    """Transformer-XL's _rel_shift over the last two axes (t, K): row i moves left by t-1-i."""
    *lead, t, klen = x.shape
    padded = torch.cat([x.new_zeros(*lead, t, 1), x], dim=-1).view(*lead, klen + 1, t)
    return padded[..., 1:, :].reshape(*lead, t, klen)


class Block(nn.Module):
    def __init__(self, arch, step=0, total_steps=0):
        super().__init__()
        d, eps = arch["d_model"], arch.get("layer_norm_eps", 1e-5)
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.ln2 = nn.LayerNorm(d, eps=eps)
        kind = arch["attention"]
        self.attn = (RelativeAttention(d, arch["n_head"]) if kind == "relative"
                     else Attention(d, arch["n_head"], causal=kind == "causal"))
        self.ffn = MoELayer(arch, step, total_steps)

    def forward(self, x, token_ids=None, mem=None):
        b, t, d = x.shape
        if isinstance(self.attn, RelativeAttention):
            cat = x if mem is None else torch.cat([mem, x], dim=1)
            x = x + self.attn(self.ln1(cat), t)
        else:
            x = x + self.attn(self.ln1(x))
        ids = None if token_ids is None else token_ids.reshape(-1)
        return x + self.ffn(self.ln2(x).reshape(b * t, d), ids, b).view(b, t, d)


class VQMoEModel(nn.Module):
    """A vqmoe model in PyTorch, built from an architecture description (the `model` entry of a
    checkpoint sidecar, see `Architecture` in the engine). Load a run with `load_run`.

    forward(x, mems=None):
      x      tokens (B,T) long, or images (B,C,H,W) float for a ViT
      mems   Transformer-XL only: per layer the memory (B,m,d) from the previous segment
    returns  logits: (B,T,n_out) for a per-token head (language models), (B,n_out) for a pooled
             head; Transformer-XL returns (logits, new_mems). `aux_loss` / `vq_loss` hold the
             summed router and quantizer losses of the forward.

    Example:
        model = vqmoe_torch.load_run("runs/main/vqmoe")
        logits = model(torch.tensor([[84, 104, 101, 32]]))          # (1, 4, 256)
    """

    def __init__(self, arch, step=0, total_steps=0):
        super().__init__()
        self.arch = arch
        d, L = arch["d_model"], arch["n_layer"]
        self.backbone = arch["backbone"]
        self.mem_len = arch.get("mem_len", 0)
        self.wte = nn.Parameter(torch.zeros(arch["vocab_size"], d)) if self.backbone != "vit" else None
        if self.backbone == "vit":
            im = arch["image"]
            self.image = im
            self.patch = nn.Linear(im["channels"] * im["patch"] ** 2, d)
            self.cls = nn.Parameter(torch.zeros(d))
        if self.backbone != "transformer_xl":
            self.wpe = nn.Parameter(torch.zeros(arch["seq_len"], d))
        self.layers = nn.ModuleList(Block(arch, step, total_steps) for _ in range(L))
        self.lnf = nn.LayerNorm(d, eps=arch.get("layer_norm_eps", 1e-5))
        h = arch["head"]
        self.head = plugins.build_head(h["name"], h["hyperparameters"], d_model=d, n_out=h["n_out"], **_extra(h))
        self.per_token = bool(h.get("per_token", True))

    def embed(self, x):
        if self.backbone == "vit":
            im, p = self.image, self.image["patch"]
            b, c, hh, ww = x.shape
            pt = x.view(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (hh // p) * (ww // p), -1)
            e = self.patch(pt)                                                   # (B,Np,d)
            return torch.cat([self.cls.view(1, 1, -1).expand(b, 1, -1), e], dim=1) + self.wpe
        h = self.wte[x]
        return h if self.backbone == "transformer_xl" else h + self.wpe[: x.shape[1]]

    def forward(self, x, mems=None, lengths=None):
        h = self.embed(x)
        ids = x if self.backbone != "vit" else None
        new_mems = []
        self.aux_loss, self.vq_loss = h.new_zeros(()), h.new_zeros(())
        for i, block in enumerate(self.layers):
            if self.backbone == "transformer_xl":
                mem = None if mems is None or mems[i].shape[1] == 0 else mems[i]
                cat = h if mem is None else torch.cat([mem, h], dim=1)
                new_mems.append(cat[:, -self.mem_len:].detach() if self.mem_len > 0 else cat[:, :0].detach())
                h = block(h, ids, mem)
            else:
                h = block(h, ids)
            self.aux_loss = self.aux_loss + block.ffn.aux
            self.vq_loss = self.vq_loss + block.ffn.vq
        logits = self.head(self.lnf(h), lengths)
        if self.per_token:
            logits = logits.view(h.shape[0], h.shape[1], -1)
        return (logits, new_mems) if self.backbone == "transformer_xl" else logits
