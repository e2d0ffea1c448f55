"""PyTorch ports of vqmoe's built-in router, quantizer and head plugins, for an EVALUATION forward.

Each class reproduces what the Swift plugin (``Plugins/<Folder>/*.swift``) computes when the host
calls its forward with an eval step (``VQMOE_STEP_TRAIN`` not set: no dropout, no noise, no EMA /
k-means / dead-code upkeep, no state changes). Operation order follows the Swift code -- float32
where it computes in float32 (left-to-right sums included, see ``SEQUENTIAL_SUMS``), float64 where
it accumulates in double, ``x * (1 / s)`` where it multiplies by a reciprocal, ``x / r`` where it
divides -- and every tie is broken as there (top-k: the lower expert wins among equal scores, slots
in descending order; argmin / argmax: the lowest index). The forwards are differentiable (the
quantizers' straight-through estimators included), but only the values are specified by the Swift
plugins; the backward of a Swift plugin is not ported.

Checkpoints: a plugin declares its buffers by name (``buffer_specs``), as PARAM (an
``nn.Parameter`` here) or STATE (a registered buffer). A dotted name ("proj.weight") becomes a
child container, so ``module.state_dict()`` keys are exactly the plugin's buffer names. The host
saves layer i's router buffer B as ``layers.{i}.ffn.router.B`` (STATE: ``state.layers.{i}.ffn.router.B``),
the quantizer's as ``...ffn.quantizer.B`` and the head's as ``head.B`` / ``state.head.B``;
``load_plugin_tensors(params, state)`` takes the two dicts keyed by the bare buffer names.

What differs from the Swift numbers, by construction: float32 GEMMs (``x @ W.T``) sum in another
order than the host's sgemm, and exp / erf / tanh (taken in double and rounded) may differ from
glibc's expf / erff / tanhf by an ulp, so scores and weights agree to float32 rounding (~1e-6
relative), not always bit for bit; an exact tie in
the Swift scores stays an exact tie here when it comes from equal parameter rows. On CUDA keep
TF32 off (``torch.backends.cuda.matmul.allow_tf32 = False``, the default).

Usage::

    router = build_router("smoe", hp, d_model=512, n_experts=8, step=step, total_steps=total)
    router.load_plugin_tensors({"weight": w}, {})
    out = router(x, token_ids, n_groups)            # RouterOutput(kind="topk", experts, weights)
    quantizer = build_quantizer("vqvae", hp, 512, 8, step, total, n_codes=8)
    quantized, codes = quantizer(x)                 # (N,d), (N,L)
    head = build_head("lm", hp, d_model=512, n_out=vocab)
    logits = head(h, None)                          # (B*T, V)
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RouterOutput",
    "build_router",
    "build_quantizer",
    "build_head",
    "resolve_hparams",
    "HYPERPARAMETERS",
    "ROUTERS",
    "QUANTIZERS",
    "HEADS",
    "smoe_dropout_k",
    "stablemoe_stage",
]

# Sum float32 vectors left to right, as the Swift loops do (``for j in 0..<n { s += v[j] }``), so
# that softmax denominators, row norms and pooled means are the Swift values to the last bit.
# False: use torch's (pairwise / vectorised) reductions instead: faster for long reductions
# (SoftMoE's dispatch over a group's tokens, mean pooling), equal to float32 rounding.
SEQUENTIAL_SUMS = True

# Raise on non-finite scores / inputs (VQMOE_ERR_NUMERIC) and on token ids outside stablemoe's
# vocabulary, as the Swift plugins do. Each check is one device synchronisation; False skips them.
CHECK_FINITE = True


# ----------------------------------------------------------------------------- small helpers


def _f32(v: float) -> float:
    """The float32 value of v, as Swift's ``Float(v)`` (hyperparameters read with ``hp.float``)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _seq_sum(v: Tensor, dim: int) -> Tensor:
    """Left-to-right sum along ``dim``, starting from 0, in v's dtype (Swift's ``s += v[j]``)."""
    if not SEQUENTIAL_SUMS:
        return v.sum(dim)
    v = v.movedim(dim, 0)
    acc = torch.zeros_like(v[0]) if v.shape[0] > 0 else v.new_zeros(v.shape[1:])
    for j in range(v.shape[0]):
        acc = acc + v[j]
    return acc


def _expf(t: Tensor) -> Tensor:
    """expf in t's dtype, computed in double and rounded: correctly rounded where glibc's expf
    is (torch's float32 exp on CPU is off by an ulp ten times as often)."""
    return torch.exp(t.double()).to(t.dtype)


def _sqrtf(t: Tensor) -> Tensor:
    """The correctly rounded float32 square root (Swift's ``squareRoot()``), through double:
    torch's float32 sqrt on CPU (vectorised MKL) is not always correctly rounded."""
    return torch.sqrt(t.double()).to(t.dtype)


def _check_finite(t: Tensor, what: str) -> None:
    if CHECK_FINITE and t.numel() > 0 and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).nonzero()[0].tolist()
        raise ValueError(f"non-finite {what} {t[tuple(bad)].item()} at {tuple(bad)} (non-finite input or parameter?)")


def _softmax_rows_f32(logits: Tensor, dim: int = -1) -> Tensor:
    """Softmax as the Swift kernels write it: v = exp(l - max), p = v * (1 / sum v) (float32,
    sequential sum). (TopKRouting.swift routeTokens, SoftMoE combineSoftmax, StableMoE softmax.)"""
    m = logits.amax(dim=dim, keepdim=True)
    v = _expf(logits - m)
    return v * (1.0 / _seq_sum(v, dim)).unsqueeze(dim)


def _normalize_rows_div(v: Tensor) -> Tensor:
    """v_i / r_i, r_i = sqrt(||v_i||^2 + 1e-12), norm and quotient in double, rounded to float32
    (StableMoE/Kernels.swift and SoftMoE/Kernels.swift ``normalizeRows``)."""
    v64 = v.double()
    r = torch.sqrt((v64 * v64).sum(-1, keepdim=True) + 1e-12)
    return (v64 / r).to(v.dtype)


def _normalize_rows_clamped_f32(v: Tensor, eps: float) -> Tensor:
    """u = v * (1 / max(||v||, eps)) in float32 with a sequential sum of squares (XMoE
    Normalize.swift: norms below eps = 1e-4 are clamped, as F.normalize's eps)."""
    norm = _sqrtf(_seq_sum(v * v, -1))
    eps_t = torch.tensor(eps, dtype=v.dtype, device=v.device)
    clamped = torch.where(norm >= eps_t, norm, eps_t)
    return v * (1.0 / clamped).unsqueeze(-1)


def _normalize_rows_invmul_f64(v: Tensor, eps: float = 1e-12) -> Tensor:
    """Float(Double(v) * (1 / max(||v||, eps))), norm in double (VQGANCos.swift ``normalizeRows``)."""
    v64 = v.double()
    norm = torch.sqrt((v64 * v64).sum(-1, keepdim=True))
    return (v64 * (1.0 / torch.clamp(norm, min=eps))).to(v.dtype)


def _chunk_rows(n: int, per_row: int, budget: int = 1 << 24) -> int:
    return max(1, budget // max(1, per_row))


def _nearest_codes(x: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """c_t = argmin_j ||x_t - e_j||^2 with exact float64 distances, ties -> lowest j
    (PluginKit/NearestCode.swift: the float GEMM only screens the codes, every code within
    float rounding of the best is re-ranked by its exact squared distance in double, so equal
    codes tie exactly and the lowest index wins). Returns codes (N,) long and the squared
    errors (N,) float64. Each distance is an elementwise reduction over d, so equal codebook
    rows give equal distances (a GEMM would not guarantee that)."""
    n, d = x.shape
    k = codebook.shape[0]
    c64 = codebook.detach().double()
    codes = torch.empty(n, dtype=torch.long, device=x.device)
    err = torch.empty(n, dtype=torch.float64, device=x.device)
    step = _chunk_rows(n, k * d)
    for s in range(0, n, step):
        xs = x[s : s + step].detach().double()
        diff = xs.unsqueeze(1) - c64.unsqueeze(0)  # (n_s,K,d)
        dist = (diff * diff).sum(-1)  # (n_s,K)
        best = dist.argmin(dim=1)  # first minimum: lowest index on ties
        codes[s : s + step] = best
        err[s : s + step] = dist.gather(1, best.unsqueeze(1)).squeeze(1)
    return codes, err


# ----------------------------------------------------------------------------- hyperparameters


@dataclass(frozen=True)
class Hyper:
    """One entry of a plugin's hyperparameter schema (PluginKit/Hyperparameters.swift ``Hyper``)."""

    name: str
    type: str  # "int" | "float" | "bool" | "string"
    default: Any
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] | None = None
    power_of_two: bool = False


def _i(name, default, min=None, max=None, power_of_two=False):
    return Hyper(name, "int", default, min, max, None, power_of_two)


def _fl(name, default, min=None, max=None):
    return Hyper(name, "float", default, min, max)


def _b(name, default):
    return Hyper(name, "bool", default)


def _s(name, default, choices=None):
    return Hyper(name, "string", default, choices=tuple(choices) if choices else None)


_CODEBOOK_UPKEEP = [
    _b("ema", True),
    _fl("ema_decay", 0.9, 0, 1),
    _fl("ema_epsilon", 1e-5, 0),
    _b("kmeans_init", True),
    _i("kmeans_iters", 10, 1, 100),
]

# The schemas of the Swift plugins (names, types, defaults, ranges, choices), in schema order.
HYPERPARAMETERS: dict[str, list[Hyper]] = {
    # routers
    "smoe": [
        _i("k", 2, 1, 64),
        _fl("balance_weight", 0.01, 0),
        _fl("init_std", 0.02, 0),
        _b("bias", False),
        _s("weights", "kept", ["kept", "full"]),
    ],
    "xmoe": [
        _i("k", 2, 1, 64),
        _i("router_dim", 16, 1, 4096),
        _fl("temperature", 0.3, 0),
        _s("temperature_mode", "learnable", ["learnable", "fixed"]),
        _fl("embedding_norm", 0.0, 0),
        _fl("balance_weight", 0.01, 0),
        _fl("init_std", 0.02, 0),
    ],
    "stablemoe": [
        _i("stage2_step", 0, 0),
        _i("distill_dim", 16, 1, 4096),
        _fl("balance_weight", 0.01, 0),
        _fl("distill_weight", 1.0, 0),
        _fl("init_std", 0.02, 0),
        _b("distill", True),
    ],
    "smoe_dropout": [
        _i("k_min", 1, 1, 64),
        _i("k_max", 2, 0, 64),
        _fl("balance_weight", 0.0, 0),
        _fl("init_std", 0.02, 0),
    ],
    "dense": [],
    "softmoe": [_i("slots_per_expert", 1, 1, 64), _b("normalize", True)],
    # FFI routers (Sources/VQMoE/PluginHost/FFIComponent.swift routerSchema)
    "hash": [_i("k", 1, 1, 64)],
    "lsh": [_i("k", 1, 1, 64)],
    # quantizers
    "vqvae": [
        _i("codebook_size", 0, 0),
        _fl("commitment", 0.25, 0),
        _fl("init_scale", 1.0, 0),
        *_CODEBOOK_UPKEEP,
        _fl("dead_code_threshold", 4.0, 0),
    ],
    "vqgan_cos": [
        _i("codebook_size", 0, 0),
        _i("code_dim", 16, 1, 1024),
        _fl("commitment", 0.25, 0),
        *_CODEBOOK_UPKEEP,
        _fl("dead_code_threshold", 16.0, 0),
    ],
    "lfq": [
        _i("codebook_size", 0, 0, 1 << 16),
        _fl("entropy_weight", 0.1, 0),
        _fl("diversity_gamma", 1.0, 0),
        _fl("temperature", 1.0, 1e-6),
        _fl("commitment", 0.25, 0),
        _fl("scale", 1.0, 1e-6),
    ],
    "rvq": [
        _i("levels", 2, 1, 16),
        _i("codebook_size", 0, 0),
        _fl("commitment", 0.25, 0),
        _fl("init_scale", 1.0, 0),
        *_CODEBOOK_UPKEEP,
        _fl("dead_code_threshold", 4.0, 0),
        _s("codebook_loss", "residual", ["residual", "cumulative"]),
    ],
    "lsh_code": [],
    # heads
    "lm": [_fl("init_std", 0.02, 0), _b("bias", True)],
    "classifier": [
        _s("pooling", "mean", ["mean", "first", "last", "max"]),
        _i("hidden", 0, 0, 1 << 20),
        _s("activation", "tanh", ["relu", "gelu", "tanh"]),
        _fl("dropout", 0.1, 0, 0.9),
        _fl("init_std", 0.02, 0),
    ],
    "image_classifier": [_s("pooling", "cls", ["cls", "mean"]), _fl("init_std", 0.02, 0)],
}


def resolve_hparams(plugin: str, hp: dict | None) -> dict:
    """Validate ``hp`` against the plugin's schema and fill in the defaults (what the host does
    before create()). Unknown names, wrong types, out-of-range values and strings outside the
    choices are errors, as in PluginKit's ``HyperValues``."""
    if plugin not in HYPERPARAMETERS:
        raise KeyError(f"unknown plugin '{plugin}'; known: {', '.join(sorted(HYPERPARAMETERS))}")
    schema = {h.name: h for h in HYPERPARAMETERS[plugin]}
    hp = dict(hp or {})
    unknown = sorted(set(hp) - set(schema))
    if unknown:
        raise KeyError(f"{plugin}: unknown hyperparameter(s) {unknown}; known: {list(schema)}")
    out = {}
    for name, h in schema.items():
        v = hp.get(name, h.default)
        if h.type == "string":
            if not isinstance(v, str):
                raise TypeError(f"{plugin}.{name} must be a string, got {v!r}")
            if h.choices and v not in h.choices:
                raise ValueError(f"{plugin}.{name} '{v}' must be one of {', '.join(h.choices)}")
            out[name] = v
            continue
        if isinstance(v, bool) or (h.type == "bool" and v in (0, 1)):
            num = float(bool(v)) if h.type == "bool" else float(v)
        elif isinstance(v, (int, float)):
            num = float(v)
        else:
            raise TypeError(f"{plugin}.{name} must be a number, got {v!r}")
        if not math.isfinite(num):
            raise ValueError(f"{plugin}.{name} = {num} must be finite")
        if h.type == "int" and num != int(num):
            raise ValueError(f"{plugin}.{name} = {num} must be an integer")
        if h.min is not None and num < h.min:
            raise ValueError(f"{plugin}.{name} = {num} is below the minimum {h.min}")
        if h.max is not None and num > h.max:
            raise ValueError(f"{plugin}.{name} = {num} is above the maximum {h.max}")
        out[name] = int(num) if h.type == "int" else (num != 0 if h.type == "bool" else num)
    return out


# ----------------------------------------------------------------------------- declared buffers


class PluginModule(nn.Module):
    """A plugin component with the buffers the Swift plugin declares (``buffers`` in Swift),
    under the same names, shapes, dtypes and roles (PARAM -> ``nn.Parameter``, STATE -> buffer)."""

    plugin_name = ""

    def __init__(self) -> None:
        super().__init__()
        self._specs: dict[str, tuple[tuple[int, ...], bool, torch.dtype]] = {}

    def _declare(
        self, name: str, shape: tuple[int, ...], *, param: bool, init: Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        *path, leaf = name.split(".")
        mod: nn.Module = self
        for part in path:  # "proj.weight" -> child container "proj" holding "weight"
            child = mod._modules.get(part)
            if child is None:
                child = nn.Module()
                mod.add_module(part, child)
            mod = child
        t = torch.zeros(shape, dtype=dtype) if init is None else init.to(dtype).reshape(shape)
        if param:
            mod.register_parameter(leaf, nn.Parameter(t))
        else:
            mod.register_buffer(leaf, t)
        self._specs[name] = (tuple(shape), param, dtype)

    def plugin_tensor(self, name: str) -> Tensor:
        """A declared buffer by its plugin name ("proj.weight")."""
        shape, param, _ = self._specs[name]
        return self.get_parameter(name) if param else self.get_buffer(name)

    @property
    def buffer_specs(self) -> dict[str, dict]:
        """name -> {"shape", "role" ("param" | "state"), "dtype"}, in declaration order."""
        return {
            n: {"shape": s, "role": "param" if p else "state", "dtype": dt} for n, (s, p, dt) in self._specs.items()
        }

    def load_plugin_tensors(self, params: dict[str, Any], state: dict[str, Any]) -> None:
        """Copy the plugin's PARAM buffers from ``params`` and its STATE buffers from ``state``
        (both keyed by the bare buffer names), checking names and shapes."""
        want_p = [n for n, (_, p, _) in self._specs.items() if p]
        want_s = [n for n, (_, p, _) in self._specs.items() if not p]
        where = f"{type(self).__name__} ('{self.plugin_name}')"
        for role, given, want in (("parameter", params, want_p), ("state", state, want_s)):
            missing = [n for n in want if n not in given]
            extra = sorted(set(given) - set(want))
            if missing or extra:
                raise KeyError(
                    f"{where}: {role} buffers missing {missing} / unexpected {extra}; it declares {role} "
                    f"buffers {want} (shapes {[self._specs[n][0] for n in want]})")
        with torch.no_grad():
            for name in want_p + want_s:
                src = params[name] if name in want_p else state[name]
                src = torch.as_tensor(src)
                dst = self.plugin_tensor(name)
                if tuple(src.shape) != tuple(dst.shape):
                    if src.numel() == dst.numel() and src.dim() <= 1 and dst.dim() <= 1:
                        src = src.reshape(dst.shape)
                    else:
                        raise ValueError(
                            f"{where}: buffer '{name}' has shape {tuple(dst.shape)}, the given tensor "
                            f"{tuple(src.shape)}")
                dst.copy_(src.to(device=dst.device, dtype=dst.dtype))


def _normal(shape, std: float) -> Tensor:
    """Initial values with the Swift init's distribution (not its host RNG stream: load the
    checkpoint's values for parity)."""
    return torch.randn(shape) * std


# ============================================================================= routers


@dataclass
class RouterOutput:
    """A router forward (vqmoe_router_output).

    kind "topk": experts (N,k) long, weights (N,k) float32.
    kind "dense": dispatch (N,E*S) (softmax over the tokens of a group, per slot), combine
    (N,E*S) (softmax over the slots, per token); slot (e, s) is column e*S + s.
    aux_loss: the router's weighted auxiliary loss of this forward (0-d float32), as the plugin
    returns it in aux_loss (the host adds it to the total loss as is); extra to the interface.
    """

    kind: str
    experts: Tensor | None = None
    weights: Tensor | None = None
    dispatch: Tensor | None = None
    combine: Tensor | None = None
    slots: int = 0
    aux_loss: Tensor | None = None


class _RouterBase(PluginModule):
    """Router conventions: forward(x (N,d) float32, token_ids (N,) long or None, n_groups) ->
    RouterOutput; the last forward's weighted aux loss is also kept as ``aux_loss``."""

    aux_loss: Tensor | None = None

    def forward(self, x: Tensor, token_ids: Tensor | None = None, n_groups: int = 1) -> RouterOutput:
        out = self.route(x, token_ids, n_groups)
        self.aux_loss = out.aux_loss
        return out

    def route(self, x: Tensor, token_ids: Tensor | None, n_groups: int) -> RouterOutput:
        raise NotImplementedError


def topk_routing(
    scores: Tensor, k: int, *, balance_weight: float, need_probs: bool = True, full_softmax: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k routing over scores (N,E) with the Switch balance loss (PluginKit/TopKRouting.swift):

        index_t = top-k of s_t, ties -> lower expert, written in descending-score order
                  (insertion: a later expert only displaces a strictly smaller score)
        w_t     = softmax over the kept scores: exp(s - s_max) * (1 / sum)      (Mixtral)
                  full_softmax: p_{t,i} = softmax(s_t)_i of the kept experts    (Switch, GShard)
        aux     = balance_weight * E * sum_e f_e P_e,  f_e = load_e / (N k),  P_e = mean_t p_te
                  (in double, Fedus et al. 2021 eq. 4; 0 without probabilities)

    Returns experts (N,k) long, weights (N,k) float32, aux (0-d float32)."""
    n, e = scores.shape
    # A stable descending sort keeps equal scores in index order: exactly the insertion top-k.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # (N,k)
    kept = scores.gather(1, order)  # (N,k), descending
    top = kept[:, :1]  # row max
    probs = None
    if need_probs or full_softmax:
        ex = _expf(scores - top)  # (N,E)
        probs = ex * (1.0 / _seq_sum(ex, 1)).unsqueeze(1)  # p_t = softmax(s_t)
    if full_softmax:
        weights = probs.gather(1, order)
    else:
        v = _expf(kept - top)
        weights = v * (1.0 / _seq_sum(v, 1)).unsqueeze(1)
    aux = torch.zeros((), dtype=torch.float64, device=scores.device)
    if probs is not None and n > 0:
        load = torch.bincount(order.reshape(-1), minlength=e).double()  # (E) assignments
        psum = probs.double().sum(0)  # (E) sum_t p_te (differentiable; f_e is a constant, as in Swift)
        aux = (load / (n * k) * (psum / n)).sum() * (_f32(balance_weight) * e)
    return order, weights, aux.float()


class SMoERouter(_RouterBase):
    """``smoe`` (Plugins/RouterSMoE): the Mixtral router (Jiang et al. 2024), Switch weights on request.

        logits = x W^T (+ b)                                        (N,E)
        experts = top-k of logits (ties -> lower expert, descending), weights = softmax over the
        kept logits (weights = "full": their probabilities under the softmax over all E logits,
        Switch / GShard); aux = balance_weight * E * sum_e f_e P_e.

    Buffers: "weight" (E,d) PARAM, with bias "bias" (E) PARAM. Nothing depends on the step."""

    plugin_name = "smoe"

    def __init__(self, hp: dict, d_model: int, n_experts: int):
        super().__init__()
        _check_dims(d_model, n_experts)
        self.d, self.e, self.k = d_model, n_experts, hp["k"]
        if self.k > self.e:
            raise ValueError(f"hyperparameter k = {self.k} is larger than n_experts = {self.e}: "
                             "top-k routing needs k <= n_experts")
        self.balance_weight, self.has_bias = hp["balance_weight"], hp["bias"]
        self.full_softmax = hp["weights"] == "full"
        self._declare("weight", (self.e, self.d), param=True, init=_normal((self.e, self.d), hp["init_std"]))
        if self.has_bias:
            self._declare("bias", (self.e,), param=True)

    def route(self, x: Tensor, token_ids: Tensor | None, n_groups: int) -> RouterOutput:
        logits = x @ self.weight.t()  # (N,E)
        if self.has_bias:
            logits = logits + self.bias  # added after the GEMM, as the Swift loop
        _check_finite(logits, "router logit")
        experts, weights, aux = topk_routing(
            logits, self.k, balance_weight=self.balance_weight, full_softmax=self.full_softmax)
        return RouterOutput("topk", experts=experts, weights=weights, aux_loss=aux)


class XMoERouter(_RouterBase):
    """``xmoe`` (Plugins/RouterXMoE): X-MoE (Chi et al. 2022, "On the Representation Collapse of
    Sparse Mixture of Experts", eq. 6-8): routing in a low-dimensional space by cosine similarity.

        h = x W_p^T (d -> d_r, no bias)                              (N,d_r)
        s_te = (h_t / max(||h_t||, 1e-4)) . (e_e / max(||e_e||, 1e-4)) * (1 / tau)   (N,E)
        tau = exp(log_temperature) (learnable) or the `temperature` hyperparameter (fixed)
        experts = top-k of s (ties -> lower), weights = softmax over the kept scores,
        aux = balance_weight * E * sum_e f_e P_e (P only when balance_weight != 0).

    Row norms: float32, sequential sums of squares (Normalize.swift). Eval: the temperature is
    the buffer's, never the hyperparameter's when learnable; begin_step's embedding_norm rescale
    happens only before training steps (the scores do not depend on the embeddings' norms).
    Buffers: "proj.weight" (d_r,d), "expert_embeddings" (E,d_r), learnable: "log_temperature" (1),
    all PARAM."""

    plugin_name = "xmoe"
    norm_eps = 1e-4

    def __init__(self, hp: dict, d_model: int, n_experts: int):
        super().__init__()
        _check_dims(d_model, n_experts)
        self.d, self.e, self.k, self.dr = d_model, n_experts, hp["k"], hp["router_dim"]
        if self.k > self.e:
            raise ValueError(f"hyperparameter k = {self.k} is larger than n_experts = {self.e}: "
                             "top-k routing needs k <= n_experts")
        self.temperature = _f32(hp["temperature"])
        if not self.temperature > 0:
            raise ValueError(f"temperature = {self.temperature} must be finite and > 0 (scores are divided by it)")
        self.learnable = hp["temperature_mode"] == "learnable"
        self.balance_weight = hp["balance_weight"]
        self._declare("proj.weight", (self.dr, self.d), param=True, init=_normal((self.dr, self.d), hp["init_std"]))
        self._declare("expert_embeddings", (self.e, self.dr), param=True, init=_normal((self.e, self.dr), 1.0))
        if self.learnable:
            self._declare("log_temperature", (1,), param=True,
                          init=torch.tensor([math.log(self.temperature)]))

    def tau(self) -> Tensor:
        """tau (0-d float32): expf(log_temperature[0]) or the fixed temperature."""
        if not self.learnable:
            return torch.tensor(self.temperature, dtype=torch.float32, device=self.expert_embeddings.device)
        tau = _expf(self.log_temperature[0])
        if CHECK_FINITE and not (bool(torch.isfinite(tau)) and float(tau.detach()) > 0):
            raise ValueError(f"temperature exp(log_temperature = {float(self.log_temperature[0].detach())}) = "
                             f"{float(tau.detach())} is not a finite positive number")
        return tau

    def route(self, x: Tensor, token_ids: Tensor | None, n_groups: int) -> RouterOutput:
        h = x @ self.proj.weight.t()  # (N,d_r)
        u = _normalize_rows_clamped_f32(h, self.norm_eps)  # (N,d_r)
        e_hat = _normalize_rows_clamped_f32(self.expert_embeddings, self.norm_eps)  # (E,d_r)
        scores = (u @ e_hat.t()) * (1.0 / self.tau())  # sgemm alpha = 1/tau
        _check_finite(scores, "router score")
        experts, weights, aux = topk_routing(
            scores, self.k, balance_weight=self.balance_weight, need_probs=self.balance_weight != 0)
        return RouterOutput("topk", experts=experts, weights=weights, aux_loss=aux)


def smoe_dropout_k(step: int, total_steps: int, k_min: int, k_max: int, train: bool) -> int:
    """SMoE-Dropout's k (Chen et al. 2023, "Sparse MoE as the New Dropout", §3.2 progressive
    activation): k = clamp(round((k_max - k_min) step / total_steps) + k_min, k_min, k_max), round
    half to even (the reference code's ``linear_increase``); k_max in evaluation and when
    total_steps <= 0 (SMoEDropout.swift ``shape``)."""
    if not train or total_steps <= 0:
        return k_max
    grown = (k_max - k_min) * step / total_steps
    if math.isnan(grown):
        return k_max
    return int(min(max(round(grown) + k_min, k_min), k_max))


class SMoEDropoutRouter(_RouterBase):
    """``smoe_dropout`` (Plugins/RouterSMoEDropout): SMoE-Dropout (Chen et al. 2023): a randomly
    initialised router that is never trained.

        logits = x W^T (W frozen, a STATE buffer)                    (N,E)
        experts = top-k (ties -> lower), weights = softmax over the kept logits
        k = smoe_dropout_k(step, total_steps, k_min, k_max, train): in EVALUATION always k_max
            (k_max = 0 means n_experts) -- the paper evaluates at full capacity.
        aux = balance_weight * E * sum_e f_e P_e (0 when balance_weight = 0).

    Buffers: "weight" (E,d) STATE."""

    plugin_name = "smoe_dropout"

    def __init__(self, hp: dict, d_model: int, n_experts: int):
        super().__init__()
        _check_dims(d_model, n_experts)
        self.d, self.e = d_model, n_experts
        raw = hp["k_max"]
        self.k_min, self.k_max = hp["k_min"], (self.e if raw == 0 else raw)
        if self.k_max > self.e:
            raise ValueError(f"hyperparameter k_max = {self.k_max} is larger than n_experts = {self.e}")
        if self.k_min > self.k_max:
            raise ValueError(f"hyperparameter k_min = {self.k_min} is larger than k_max = {self.k_max}"
                             + (" (k_max = 0 means n_experts)" if raw == 0 else ""))
        self.balance_weight = hp["balance_weight"]
        self.k = self.k_max  # the eval k
        self._declare("weight", (self.e, self.d), param=False, init=_normal((self.e, self.d), hp["init_std"]))

    def route(self, x: Tensor, token_ids: Tensor | None, n_groups: int) -> RouterOutput:
        logits = x @ self.weight.t()  # (N,E)
        _check_finite(logits, "router logit")
        experts, weights, aux = topk_routing(
            logits, self.k, balance_weight=self.balance_weight, need_probs=self.balance_weight != 0)
        return RouterOutput("topk", experts=experts, weights=weights, aux_loss=aux)


def stablemoe_stage(step: int, total_steps: int, stage2_step: int, distill: bool, train: bool) -> int:
    """StableMoE's stage (StableMoE.swift ``stage``): 1 while TRAINING before the switch
    (stage2_step, or round(0.1 * total_steps) half away from zero when stage2_step = 0), else 2 --
    so every evaluation forward is stage 2; always 1 with distill = false."""
    if not distill:
        return 1
    switch = stage2_step if stage2_step > 0 else int(math.floor(0.1 * max(total_steps, 0) + 0.5))
    return 1 if train and step < switch else 2


class StableMoERouter(_RouterBase):
    """``stablemoe`` (Plugins/RouterStableMoE): StableMoE (Dai et al. 2022, "StableMoE: Stable
    Routing Strategy for Mixture of Experts", §2.1-2.2): top-1 routing on l2-normalised expert
    centroids with a sigmoid gate, and a distilled token-id router that decides in stage 2.

        s = x ê^T, ê_e = e_e / sqrt(||e_e||^2 + 1e-12)  (double, rounded to float32)   (N,E)
        z = emb[id] C^T (distilled logits)                                               (N,E)
        eval with distill (always stage 2): a_t = stage2_assignment[id_t] once the table is
            frozen (its entry 0 >= 0), else the LIVE argmax_e z_te (ties -> lower); aux = 0
        distill = false (stage 1 forever): a_t = argmax_e s_te; aux = balance_weight * E *
            sum_e f_e P_e, f_e = #{a_t = e} / N, P_e = mean_t softmax(s_t)_e
        weights = sigmoid(s_{t,a_t}) = 1 / (1 + exp(-s))                                 (N,1)

    The step never changes an eval forward (stage2_step / total_steps only place the switch
    during training, see ``stablemoe_stage``). Needs token ids with distill. Buffers:
    "expert_embeddings" (E,d) PARAM; with distill "distilled_embedding" (V,D) and
    "distilled_centroids" (E,D) PARAM, "stage2_assignment" (V) int32 STATE (-1 until frozen)."""

    plugin_name = "stablemoe"

    def __init__(self, hp: dict, d_model: int, n_experts: int, vocab_size: int | None):
        super().__init__()
        _check_dims(d_model, n_experts)
        self.d, self.e, self.dd = d_model, n_experts, hp["distill_dim"]
        self.distill, self.stage2_step = hp["distill"], hp["stage2_step"]
        self.balance_weight = hp["balance_weight"]
        if self.distill and not (vocab_size and vocab_size >= 1):
            raise ValueError(
                "stablemoe's distilled router maps token ids to experts and needs vocab_size >= 1 "
                f"(create_info.vocab_size, the token-id range), got {vocab_size}; pass build_router(..., "
                "vocab_size=V) or set distill = false")
        self.v = vocab_size if self.distill else 0
        self._declare("expert_embeddings", (self.e, self.d), param=True,
                      init=_normal((self.e, self.d), 1 / math.sqrt(self.d)))
        if self.distill:
            self._declare("distilled_embedding", (self.v, self.dd), param=True,
                          init=_normal((self.v, self.dd), hp["init_std"]))
            self._declare("distilled_centroids", (self.e, self.dd), param=True,
                          init=_normal((self.e, self.dd), hp["init_std"]))
            self._declare("stage2_assignment", (self.v,), param=False, dtype=torch.int32,
                          init=torch.full((self.v,), -1, dtype=torch.int32))

    def stage2_frozen(self) -> bool:
        """The table is filled all at once at the first stage-2 training forward; the plugin
        tests its entry 0 (StableMoE.swift ``stage2Frozen``)."""
        return self.distill and self.v > 0 and int(self.stage2_assignment[0]) >= 0

    def route(self, x: Tensor, token_ids: Tensor | None, n_groups: int) -> RouterOutput:
        n = x.shape[0]
        e_hat = _normalize_rows_div(self.expert_embeddings)  # (E,d)
        s = x @ e_hat.t()  # (N,E)
        _check_finite(s, "routing score")
        aux = torch.zeros((), dtype=torch.float32, device=x.device)
        if self.distill:  # eval: stage 2
            if token_ids is None:
                raise ValueError("stablemoe's distilled router routes by token id, but token_ids is absent "
                                 "(use it in a token model, or set distill = false)")
            ids = token_ids.reshape(-1).long()
            if CHECK_FINITE and n > 0 and bool(((ids < 0) | (ids >= self.v)).any()):
                bad = ids[(ids < 0) | (ids >= self.v)][0].item()
                raise ValueError(f"token id {bad} is outside the distilled router's range [0, vocab_size = {self.v})")
            if self.stage2_frozen():
                a = self.stage2_assignment.long()[ids]
            else:
                z = self.distilled_embedding[ids] @ self.distilled_centroids.t()  # (N,E)
                _check_finite(z, "distilled logit")
                a = z.argmax(dim=1)  # first maximum: lower expert on ties
        else:  # stage 1 forever
            a = s.argmax(dim=1)
            if n > 0:
                probs = _softmax_rows_f32(s, 1)
                load = torch.bincount(a, minlength=self.e).double()
                balance = (load / n * (probs.double().sum(0) / n)).sum()
                aux = (balance * (_f32(self.balance_weight) * self.e)).float()
        s_a = s.gather(1, a.unsqueeze(1))  # (N,1)
        gate = 1.0 / (1.0 + _expf(-s_a))
        return RouterOutput("topk", experts=a.unsqueeze(1), weights=gate, aux_loss=aux)


class DenseRouter(_RouterBase):
    """``dense`` (Plugins/RouterDense): no routing, every token to expert 0 with weight 1 (k = 1,
    aux 0). With n_experts = 1 the MoE layer is the dense FFN baseline. No buffers."""

    plugin_name = "dense"

    def __init__(self, hp: dict, d_model: int, n_experts: int):
        super().__init__()
        _check_dims(d_model, n_experts)
        self.e = n_experts

    def route(self, x: Tensor, token_ids: Tensor | None, n_groups: int) -> RouterOutput:
        n = x.shape[0]
        return RouterOutput(
            "topk", experts=torch.zeros(n, 1, dtype=torch.long, device=x.device),
            weights=torch.ones(n, 1, dtype=torch.float32, device=x.device),
            aux_loss=torch.zeros((), dtype=torch.float32, device=x.device))


class SoftMoERouter(_RouterBase):
    """``softmoe`` (Plugins/RouterSoftMoE): Soft MoE (Puigcerver et al. 2024, "From Sparse to Soft
    Mixtures of Experts", §2.1 and the normalisation of §2.3):

        normalize: L = scale * (x̂ Φ̂), x̂_t = x_t / sqrt(||x_t||^2 + 1e-12),
                   Φ̂_j = Φ_j / sqrt(||Φ_j||^2 + 1e-12) (columns; double, rounded to float32)
        plain:     L = x Φ                                                  (N,E*S)
        dispatch D[t,j] = softmax over the tokens t of t's group of L[.,j]  (N,E*S)
        combine  C[t,j] = softmax over the slots j of L[t,.]                (N,E*S)

    Groups are contiguous: tokens [g*T_g, (g+1)*T_g) with T_g = N / n_groups. aux = 0.
    Buffers: "phi" (d,E*S) PARAM, with normalize "scale" (1) PARAM."""

    plugin_name = "softmoe"

    def __init__(self, hp: dict, d_model: int, n_experts: int):
        super().__init__()
        _check_dims(d_model, n_experts)
        self.d, self.e, self.slots, self.normalize = d_model, n_experts, hp["slots_per_expert"], hp["normalize"]
        self.es = self.e * self.slots
        self._declare("phi", (self.d, self.es), param=True, init=_normal((self.d, self.es), 1 / math.sqrt(self.d)))
        if self.normalize:
            self._declare("scale", (1,), param=True, init=torch.ones(1))

    def route(self, x: Tensor, token_ids: Tensor | None, n_groups: int) -> RouterOutput:
        n = x.shape[0]
        if n_groups < 0 or (n_groups == 0 and n != 0) or (n_groups > 0 and n % n_groups != 0):
            raise ValueError(f"n_groups = {n_groups} must divide the {n} tokens of x "
                             "(dispatch normalises within a group)")
        if self.normalize:
            s = self.scale[0]
            if CHECK_FINITE and not bool(torch.isfinite(s)):
                raise ValueError(f"the logit scale is {float(s)}")
            x_hat = _normalize_rows_div(x)  # (N,d)
            phi_hat = _normalize_rows_div(self.phi.t()).t()  # (d,E*S), columns normalised
            logits = s * (x_hat @ phi_hat)  # (N,E*S)
        else:
            logits = x @ self.phi
        _check_finite(logits, "slot logit")
        g = max(n_groups, 1)
        lg = logits.reshape(g, n // g if n else 0, self.es)  # (G,T_g,E*S)
        dispatch = _softmax_rows_f32(lg, 1).reshape(n, self.es)  # over the group's tokens, per slot
        combine = _softmax_rows_f32(logits, 1)  # over the slots, per token
        return RouterOutput("dense", dispatch=dispatch, combine=combine, slots=self.slots,
                            aux_loss=torch.zeros((), dtype=torch.float32, device=x.device))


# ----------------------------------------------------------------------------- FFI routers

_MASK64 = (1 << 64) - 1


def mix64(z: int) -> int:
    """SplitMix64's finaliser (Plugins/FFIHashRouter/hash_router.c ``mix64``), on Python ints."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _i64(u: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return u - (1 << 64) if u >= 1 << 63 else u


def _lshr(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 tensors holding uint64 bit patterns."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64_tensor(z: Tensor) -> Tensor:
    """mix64 on an int64 tensor of uint64 bit patterns (int64 add / multiply wrap mod 2^64)."""
    z = z + _i64(0x9E3779B97F4A7C15)
    z = (z ^ _lshr(z, 30)) * _i64(0xBF58476D1CE4E5B9)
    z = (z ^ _lshr(z, 27)) * _i64(0x94D049BB133111EB)
    return z ^ _lshr(z, 31)


def _umod(z: Tensor, n: int) -> Tensor:
    """(uint64 bits of z) mod n."""
    r = torch.remainder(z, n)
    return torch.where(z < 0, torch.remainder(r + ((1 << 64) % n), n), r)


def hash_experts(token_ids: Tensor, n_experts: int) -> Tensor:
    """vqmoe_hash_route: expert = mix64((uint64)(uint32)id) mod E (Roller et al. 2021, "Hash
    Layers For Large Sparse Models"). (N,) long."""
    z = token_ids.reshape(-1).long() & 0xFFFFFFFF
    return _umod(_mix64_tensor(z), n_experts)


_LSH_SIGNS: dict[tuple[int, int], Tensor] = {}


def _lsh_signs(d: int, bits: int) -> Tensor:
    """(d,bits) float32: +1 where bit 0 of mix64(i*64 + b) is set, else -1 (the fixed hyperplanes)."""
    key = (d, bits)
    if key not in _LSH_SIGNS:
        _LSH_SIGNS[key] = torch.tensor(
            [[1.0 if mix64(i * 64 + b) & 1 else -1.0 for b in range(bits)] for i in range(d)],
            dtype=torch.float32).reshape(d, bits)
    return _LSH_SIGNS[key]


def lsh_buckets(x: Tensor, n: int) -> Tensor:
    """vqmoe_lsh_route / vqmoe_lsh_code: the signs of x against ceil(log2 n) fixed +-1
    hyperplanes form a bucket, taken mod n (random-hyperplane LSH, Charikar 2002). The dot
    products are float32 sums over i in order, as the C loop. (N,) long."""
    bits = 0
    while (1 << bits) < n:
        bits += 1
    num, d = x.shape
    signs = _lsh_signs(d, bits).to(x.device)
    xs = x.detach().float()
    if SEQUENTIAL_SUMS:
        dot = torch.zeros(num, bits, dtype=torch.float32, device=x.device)
        for i in range(d):  # dot += (h & 1) ? row[i] : -row[i]
            dot = dot + xs[:, i : i + 1] * signs[i]
    else:
        dot = xs @ signs
    weights = torch.tensor([1 << b for b in range(bits)], dtype=torch.long, device=x.device)
    bucket = ((dot > 0).long() * weights).sum(1) if bits else torch.zeros(num, dtype=torch.long, device=x.device)
    return bucket % n


class _FFIRouter(_RouterBase):
    """The host's wrapper of an ``ffi`` router (Sources/VQMoE/PluginHost/FFIComponent.swift):
    c = f(...) per token, experts (c + j) mod E for j < k, each with weight 1/k; aux 0; no
    buffers, not trainable."""

    def __init__(self, hp: dict, d_model: int, n_experts: int):
        super().__init__()
        _check_dims(d_model, n_experts)
        self.e, self.k = n_experts, hp["k"]
        if self.k > self.e:
            raise ValueError(f"ffi router '{self.plugin_name}': k = {self.k} exceeds the {self.e} experts")

    def choice(self, x: Tensor, token_ids: Tensor | None) -> Tensor:
        raise NotImplementedError

    def route(self, x: Tensor, token_ids: Tensor | None, n_groups: int) -> RouterOutput:
        c = self.choice(x, token_ids).to(x.device)  # (N,)
        experts = (c.unsqueeze(1) + torch.arange(self.k, device=x.device)) % self.e  # (N,k)
        weights = torch.full(experts.shape, _f32(1.0 / self.k), dtype=torch.float32, device=x.device)
        return RouterOutput("topk", experts=experts, weights=weights,
                            aux_loss=torch.zeros((), dtype=torch.float32, device=x.device))


class HashRouter(_FFIRouter):
    """``hash`` (registry ffi entry, Plugins/FFIHashRouter ``vqmoe_hash_route``): Hash Layers
    (Roller et al. 2021): expert = mix64(token id) mod E, then the next k-1. Needs token ids."""

    plugin_name = "hash"

    def choice(self, x, token_ids):
        if token_ids is None:
            raise ValueError("ffi router 'hash' routes by token id, but this layer has no token ids "
                             "(use it in a token model)")
        return hash_experts(token_ids, self.e)


class LSHRouter(_FFIRouter):
    """``lsh`` (registry ffi entry, ``vqmoe_lsh_route``): random-hyperplane LSH of x, bucket mod E."""

    plugin_name = "lsh"

    def choice(self, x, token_ids):
        return lsh_buckets(x, self.e)


# ============================================================================= quantizers


class _QuantizerBase(PluginModule):
    """Quantizer conventions: forward(x (N,d)) -> (quantized (N,d) float32, codes (N,L) long);
    ``codebook_size`` (K) and ``levels`` (L). ``quantized`` has the plugin's VALUE with the
    straight-through gradient of the plugin's backward (``q.detach() + (x - x.detach())``, which
    adds an exact 0). A forward also keeps the plugin's UNWEIGHTED loss value in ``loss`` (0-d
    float32: the double value rounded, as the plugin returns it; detached; the host multiplies it
    by beta) unless ``compute_loss`` is False (lfq's entropy terms cost O(N K log2 K))."""

    codebook_size: int
    levels: int = 1
    compute_loss = True
    loss: Tensor | None = None


def _codebook_k(plugin: str, requested: int, n_codes: int) -> int:
    k = requested if requested > 0 else n_codes
    if k < 1:
        raise ValueError(f"codebook size K = {k}: set hyperparameter codebook_size >= 1 or give the model n_codes "
                         f">= 1 (got codebook_size = {requested}, n_codes = {n_codes})")
    return k


def _straight_through(value: Tensor, x: Tensor) -> Tensor:
    """value, with d value / d x = identity (x - x.detach() is exactly 0 for finite x)."""
    return value.detach() + (x - x.detach())


class VQVAEQuantizer(_QuantizerBase):
    """``vqvae`` (Plugins/QuantizerVQVAE): VQ-VAE (van den Oord et al. 2017, "Neural Discrete
    Representation Learning", eq. 1-3):

        c(x) = argmin_j ||x - e_j||^2 (exact, ties -> lowest j),  q = e_c,
        quantized = x + sg(q - x)                                          (N,d), codes (N,1)
        loss = mse(sg(x), q) + commitment mse(x, sg(q))      (ema: commitment mse(x, sg(q)))

    Eval changes no state (EMA updates, k-means init and dead-code restart are training-only).
    K = codebook_size, or the model's n_codes when 0. Buffers: "codebook" (K,d) (PARAM, or STATE
    with ema), ema: "ema_count" (K), "ema_sum" (K,d) STATE; kmeans_init: "initialized" (1) int32 STATE."""

    plugin_name = "vqvae"

    def __init__(self, hp: dict, d_model: int, n_codes: int):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model = {d_model}: the quantizer needs d_model >= 1")
        _check_upkeep(hp)
        self.d, self.codebook_size = d_model, _codebook_k(self.plugin_name, hp["codebook_size"], n_codes)
        self.commitment, self.ema = hp["commitment"], hp["ema"]
        k, d = self.codebook_size, self.d
        init = _normal((k, d), hp["init_scale"])
        self._declare("codebook", (k, d), param=not self.ema, init=init)
        if self.ema:
            self._declare("ema_count", (k,), param=False, init=torch.ones(k))
            self._declare("ema_sum", (k, d), param=False, init=init.clone())
        if hp["kmeans_init"]:
            self._declare("initialized", (1,), param=False, dtype=torch.int32)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_finite(x, "input x")
        _check_finite(self.codebook, "codebook entry")
        codes, err = _nearest_codes(x, self.codebook)
        quantized = _straight_through(self.codebook.detach()[codes], x)
        if self.compute_loss:
            # With gradients (training in PyTorch): the codebook term moves e_c toward sg(x), the
            # commitment term x toward sg(e_c); the same value as (1 + commitment) mse.
            q = self.codebook[codes]
            commit = F.mse_loss(x, q.detach()) if x.shape[0] else x.new_zeros(())
            codebook = F.mse_loss(q, x.detach()) if x.shape[0] and not self.ema else x.new_zeros(())
            self.loss = (codebook + self.commitment * commit).float()
        return quantized, codes.unsqueeze(1)


class VQGANCosQuantizer(_QuantizerBase):
    """``vqgan_cos`` (Plugins/QuantizerVQGANCos): ViT-VQGAN's factorised, l2-normalised codes (Yu
    et al. 2022, "Vector-quantized Image Modeling with Improved VQGAN", §3.2):

        z = x W_in^T + b_in (d -> d_c),  ẑ = z / max(||z||, 1e-12),  ê_j = e_j / max(||e_j||, 1e-12)
        c = argmax_j ẑ . ê_j (exact double dot, ties -> lowest j)
        quantized = (ẑ + sg(ê_c - ẑ)) W_out^T + b_out                       (N,d), codes (N,1)
        loss = (ema ? commitment : 1 + commitment) sum_t ||ẑ_t - ê_c||^2 / (N d_c)

    Normalisations in double (x * (1/norm)), rounded to float32. Eval changes no state.
    Buffers: "proj_in.weight" (d_c,d), "proj_in.bias" (d_c), "proj_out.weight" (d,d_c),
    "proj_out.bias" (d) PARAM; "codebook" (K,d_c) (STATE with ema, else PARAM); ema:
    "ema_count" (K), "ema_sum" (K,d_c) STATE; kmeans_init: "initialized" (1) int32 STATE."""

    plugin_name = "vqgan_cos"

    def __init__(self, hp: dict, d_model: int, n_codes: int):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model = {d_model}: the quantizer needs d_model >= 1")
        _check_upkeep(hp)
        self.d, self.dc = d_model, hp["code_dim"]
        self.codebook_size = _codebook_k(self.plugin_name, hp["codebook_size"], n_codes)
        self.commitment, self.ema = hp["commitment"], hp["ema"]
        k, d, dc = self.codebook_size, self.d, self.dc
        self._declare("proj_in.weight", (dc, d), param=True, init=_normal((dc, d), 1 / math.sqrt(d)))
        self._declare("proj_in.bias", (dc,), param=True)
        self._declare("proj_out.weight", (d, dc), param=True, init=_normal((d, dc), 1 / math.sqrt(dc)))
        self._declare("proj_out.bias", (d,), param=True)
        init = _normal((k, dc), 1.0)
        self._declare("codebook", (k, dc), param=not self.ema, init=init)
        if self.ema:
            self._declare("ema_count", (k,), param=False, init=torch.ones(k))
            self._declare("ema_sum", (k, dc), param=False, init=init.clone())
        if hp["kmeans_init"]:
            self._declare("initialized", (1,), param=False, dtype=torch.int32)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_finite(x, "input x")
        _check_finite(self.codebook, "codebook entry")
        z = x @ self.proj_in.weight.t()  # (N,d_c)
        z = z + self.proj_in.bias
        _check_finite(z, "projection z")
        z_hat = _normalize_rows_invmul_f64(z)  # (N,d_c)
        e_hat = _normalize_rows_invmul_f64(self.codebook.detach())  # (K,d_c)
        n, k = z.shape[0], self.codebook_size
        codes = torch.empty(n, dtype=torch.long, device=x.device)
        e64 = e_hat.double()
        step = _chunk_rows(n, k * self.dc)
        for s in range(0, n, step):  # exact dots, one reduction per (t, j): equal codes tie exactly
            dots = (z_hat[s : s + step].detach().double().unsqueeze(1) * e64.unsqueeze(0)).sum(-1)  # (n_s,K)
            codes[s : s + step] = dots.argmax(dim=1)
        e_c = e_hat[codes]  # (N,d_c)
        z_q = _straight_through(e_c, z_hat)
        quantized = z_q @ self.proj_out.weight.t()  # (N,d)
        quantized = quantized + self.proj_out.bias
        if self.compute_loss:
            diff = z_hat.detach().double() - e_c.double()
            sse = (diff * diff).sum()
            mse = sse / (n * self.dc) if n else sse
            self.loss = ((self.commitment if self.ema else 1 + self.commitment) * mse).float()
        return quantized, codes.unsqueeze(1)


class LFQQuantizer(_QuantizerBase):
    """``lfq`` (Plugins/QuantizerLFQ): lookup-free quantization (Yu et al. 2023, "Language Model
    Beats Diffusion -- Tokenizer is Key to Visual Generation", §3.1, MAGVIT-v2):

        z = x W_in^T + b_in (d -> b = log2 K),  q_i = +scale if z_i > 0 else -scale (z_i = 0 -> -)
        code = sum_i [z_i > 0] 2^i,  quantized = (z + sg(q - z)) W_out^T + b_out    (N,d), (N,1)
        loss = entropy_weight (mean_t H(p(.|z_t)) - diversity_gamma H(mean_t p(.|z_t)))
               + commitment mse(z, sg(q)),   p(c|z) = softmax_c(2 z . code_c / temperature)

    The entropies factorise over the bits with a_i = (4 scale / tau) z_i (Entropy.swift), in
    double. K = codebook_size or the model's n_codes: a power of two in [2, 2^16]. Buffers:
    "proj_in.weight" (b,d), "proj_in.bias" (b), "proj_out.weight" (d,b), "proj_out.bias" (d) PARAM."""

    plugin_name = "lfq"
    max_codebook_size = 1 << 16

    def __init__(self, hp: dict, d_model: int, n_codes: int):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model = {d_model}: the quantizer needs d_model >= 1")
        requested = hp["codebook_size"]
        k = requested if requested > 0 else n_codes
        source = "hyperparameter codebook_size" if requested > 0 else "the model's n_codes"
        if k < 2 or k & (k - 1):
            raise ValueError(f"codebook size K = {k} (from {source}) must be a power of two >= 2: lfq codes are "
                             "b = log2(K) sign bits")
        if k > self.max_codebook_size:
            raise ValueError(f"codebook size K = {k} (from {source}) is larger than lfq's maximum 65536 (2^16)")
        self.d, self.codebook_size, self.bits = d_model, k, k.bit_length() - 1
        self.scale = _f32(hp["scale"])
        self.entropy_weight, self.diversity_gamma = hp["entropy_weight"], hp["diversity_gamma"]
        self.temperature, self.commitment = hp["temperature"], hp["commitment"]
        b, d = self.bits, self.d
        self._declare("proj_in.weight", (b, d), param=True, init=_normal((b, d), 1 / math.sqrt(d)))
        self._declare("proj_in.bias", (b,), param=True)
        self._declare("proj_out.weight", (d, b), param=True, init=_normal((d, b), 1 / math.sqrt(b)))
        self._declare("proj_out.bias", (d,), param=True)
        self.last_entropies: tuple[float, float] | None = None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_finite(x, "input x")
        z = x @ self.proj_in.weight.t()  # (N,b)
        z = z + self.proj_in.bias
        _check_finite(z, "projection z")
        pos = z > 0
        codes = (pos.long() * (1 << torch.arange(self.bits, device=x.device))).sum(1)  # (N,)
        scale = torch.tensor(self.scale, dtype=torch.float32, device=x.device)
        q = torch.where(pos, scale, -scale)  # (N,b)
        z_q = q + (z - z.detach())  # value q, straight-through gradient to z
        quantized = z_q @ self.proj_out.weight.t()
        quantized = quantized + self.proj_out.bias
        if self.compute_loss:
            self.loss = self._loss(z.detach(), q).float()
        return quantized, codes.unsqueeze(1)

    def _loss(self, z: Tensor, q: Tensor) -> Tensor:
        """The plugin's loss value (LFQ.swift forward + Entropy.swift entropyForward), in double."""
        n, b, k = z.shape[0], self.bits, self.codebook_size
        if n == 0:
            self.last_entropies = (0.0, 0.0)
            return torch.zeros((), dtype=torch.float64, device=z.device)
        z64 = z.double()
        sse = ((z64 - q.double()) ** 2).sum()
        a = (4 * self.scale / self.temperature) * z64  # (N,b) bit logit gaps
        softplus = torch.where(a > 0, a + torch.log1p(torch.exp(-a.abs())), torch.log1p(torch.exp(-a.abs())))
        sig = torch.where(a >= 0, 1 / (1 + torch.exp(-a.abs())), torch.exp(-a.abs()) / (1 + torch.exp(-a.abs())))
        per_sample = (softplus - a * sig).sum() / n  # mean_t H(p(.|z_t))
        l0 = -softplus.sum(1, keepdim=True)  # (N,1) log p(code 0 | z)
        bits_of = ((torch.arange(k, device=z.device).unsqueeze(1) >> torch.arange(b, device=z.device)) & 1).double()
        p_sum = torch.zeros(k, dtype=torch.float64, device=z.device)
        step = _chunk_rows(n, k)
        for s in range(0, n, step):  # sum_t p(c|z_t), log p(c|z_t) = l0_t + sum of a_ti over c's set bits
            p_sum += torch.exp(l0[s : s + step] + a[s : s + step] @ bits_of.t()).sum(0)
        p_bar = p_sum / n
        nz = p_bar > 0
        codebook = -(p_bar[nz] * torch.log(p_bar[nz])).sum()
        self.last_entropies = (float(per_sample), float(codebook))
        return self.entropy_weight * (per_sample - self.diversity_gamma * codebook) + self.commitment * sse / (n * b)


class RVQQuantizer(_QuantizerBase):
    """``rvq`` (Plugins/QuantizerRVQ): residual VQ (Zeghidour et al. 2021, "SoundStream", Alg. 1;
    Lee et al. 2022, RQ-VAE):

        r_0 = x,  c_l = argmin_j ||r_{l-1} - e^l_j||^2 (exact, ties -> lowest j),  q_l = e^l_{c_l},
        r_l = r_{l-1} - q_l (float32),  quantized = x + sg(sum_l q_l - x)    (N,d), codes (N,L)
        loss = (ema ? commitment : 1 + commitment) sum_l sum_t ||r_{l-1,t} - q_{l,t}||^2 / (N d)

    codes[:, l] picks the token's l-th expert (top-L routing). Eval changes no state. Buffers:
    "codebook" (L,K,d) (STATE with ema, else PARAM); ema: "ema_count" (L,K), "ema_sum" (L,K,d)
    STATE; kmeans_init: "initialized" (1) int32 STATE."""

    plugin_name = "rvq"

    def __init__(self, hp: dict, d_model: int, n_codes: int):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model = {d_model}: the quantizer needs d_model >= 1")
        _check_upkeep(hp)
        self.d, self.levels = d_model, hp["levels"]
        self.codebook_size = _codebook_k(self.plugin_name, hp["codebook_size"], n_codes)
        self.commitment, self.ema = hp["commitment"], hp["ema"]
        lv, k, d = self.levels, self.codebook_size, self.d
        init = _normal((lv, k, d), hp["init_scale"])
        self._declare("codebook", (lv, k, d), param=not self.ema, init=init)
        if self.ema:
            self._declare("ema_count", (lv, k), param=False, init=torch.ones(lv, k))
            self._declare("ema_sum", (lv, k, d), param=False, init=init.clone())
        if hp["kmeans_init"]:
            self._declare("initialized", (1,), param=False, dtype=torch.int32)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        _check_finite(x, "input x")
        cb = self.codebook.detach()
        _check_finite(cb, "codebook entry")
        r = x.detach().clone()  # (N,d) r_{l-1}
        q_sum = torch.zeros_like(r)
        codes, sse = [], torch.zeros((), dtype=torch.float64, device=x.device)
        for level in range(self.levels):
            c, err = _nearest_codes(r, cb[level])
            e = cb[level][c]  # (N,d)
            r = r - e
            q_sum = q_sum + e
            codes.append(c)
            sse = sse + err.sum()
        if self.compute_loss:
            n = x.shape[0]
            mse = sse / (n * self.d) if n else sse
            self.loss = ((self.commitment if self.ema else 1 + self.commitment) * mse).float()
        codes_t = torch.stack(codes, 1) if codes else torch.zeros(x.shape[0], 0, dtype=torch.long, device=x.device)
        return _straight_through(q_sum, x), codes_t


class LSHCodeQuantizer(_QuantizerBase):
    """``lsh_code`` (registry ffi entry, ``vqmoe_lsh_code``): the LSH bucket of x as a
    non-trainable quantizer: code = lsh_buckets(x, K) with K = the model's n_codes, quantized = x
    (straight-through exact), loss 0. No buffers, no hyperparameters."""

    plugin_name = "lsh_code"

    def __init__(self, hp: dict, d_model: int, n_codes: int):
        super().__init__()
        if n_codes < 1:
            raise ValueError(f"ffi quantizer 'lsh_code' needs the model's n_codes (K) >= 1, got {n_codes}")
        self.d, self.codebook_size = d_model, n_codes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        codes = lsh_buckets(x, self.codebook_size)
        if self.compute_loss:
            self.loss = torch.zeros((), dtype=torch.float32, device=x.device)
        return x.clone(), codes.unsqueeze(1)


# ============================================================================= heads


def _lengths(lengths: Tensor | None, b: int, t: int, device) -> Tensor:
    if lengths is None:
        return torch.full((b,), t, dtype=torch.long, device=device)
    lengths = lengths.reshape(-1).long().to(device)
    if lengths.numel() != b:
        raise ValueError(f"lengths must have shape ({b},), got {tuple(lengths.shape)}")
    if b and bool(((lengths < 1) | (lengths > t)).any()):
        i = int(((lengths < 1) | (lengths > t)).nonzero()[0])
        raise ValueError(f"lengths[{i}] = {int(lengths[i])} is outside [1, {t}] (T = the sequence length of h)")
    return lengths


def _pool_mean(h: Tensor, lengths: Tensor) -> Tensor:
    """p_b = (sum_{t < len_b} h_bt, summed in order from t = 0) * (1 / len_b) in float32 (Pooling.swift)."""
    b, t, d = h.shape
    if SEQUENTIAL_SUMS:
        p = h[:, 0]
        for i in range(1, t):
            p = torch.where((i < lengths).unsqueeze(1), p + h[:, i], p)
    else:
        mask = (torch.arange(t, device=h.device).unsqueeze(0) < lengths.unsqueeze(1)).to(h.dtype)
        p = (h * mask.unsqueeze(2)).sum(1)
    return p * (1.0 / lengths.to(h.dtype)).unsqueeze(1)


def _pool_max(h: Tensor, lengths: Tensor) -> Tensor:
    """p_bk = max_{t < len_b} h_btk (the first position reaching it)."""
    p = h[:, 0]
    for i in range(1, h.shape[1]):
        take = (i < lengths).unsqueeze(1) & (h[:, i] > p)
        p = torch.where(take, h[:, i], p)
    return p


class LMHead(PluginModule):
    """``lm`` (Plugins/HeadLM): logits (B*T, V) = h W^T + b, one row per token (softmax
    cross-entropy in nats on top, not ported here). Buffers: "weight" (V,d), with bias "bias" (V), PARAM."""

    plugin_name = "lm"
    per_token = True

    def __init__(self, hp: dict, d_model: int, n_out: int):
        super().__init__()
        if n_out < 1:
            raise ValueError(f"vocab_size is {n_out}; an LM head needs the dataset's vocabulary (>= 1)")
        if d_model < 1:
            raise ValueError(f"d_model is {d_model}; it must be >= 1")
        self.d, self.n_out, self.has_bias = d_model, n_out, hp["bias"]
        self._declare("weight", (n_out, d_model), param=True, init=_normal((n_out, d_model), hp["init_std"]))
        if self.has_bias:
            self._declare("bias", (n_out,), param=True)

    def forward(self, h: Tensor, lengths: Tensor | None = None) -> Tensor:
        logits = h.reshape(-1, self.d) @ self.weight.t()  # (B*T,V)
        return logits + self.bias if self.has_bias else logits


class ClassifierHead(PluginModule):
    """``classifier`` (Plugins/HeadClassifier), the VQMoE fine-tuning head (two fully connected
    layers replacing the last layer; tanh as BERT's pooler, Devlin et al. 2019):

        p_b = pool(h_b) over the real tokens t < len_b: mean / first / last / max      (B,d)
        logits = act(p W1^T + b1) W2^T + b2                                              (B,C)

    act: relu, exact gelu 0.5 u (1 + erf(u / sqrt 2)), or tanh. Dropout acts only in training
    forwards. Buffers: "fc1.weight" (H,d), "fc1.bias" (H), "fc2.weight" (C,H), "fc2.bias" (C) PARAM
    (H = hidden, or d_model when 0)."""

    plugin_name = "classifier"
    per_token = False

    def __init__(self, hp: dict, d_model: int, n_out: int):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model = {d_model} must be >= 1")
        if n_out < 2:
            raise ValueError(f"n_classes = {n_out}; a classifier needs the dataset's classes (>= 2)")
        self.d, self.n_out = d_model, n_out
        self.hidden = hp["hidden"] or d_model
        self.pooling, self.activation = hp["pooling"], hp["activation"]
        hd, std = self.hidden, hp["init_std"]
        self._declare("fc1.weight", (hd, d_model), param=True, init=_normal((hd, d_model), std))
        self._declare("fc1.bias", (hd,), param=True)
        self._declare("fc2.weight", (n_out, hd), param=True, init=_normal((n_out, hd), std))
        self._declare("fc2.bias", (n_out,), param=True)

    def pool(self, h: Tensor, lengths: Tensor | None) -> Tensor:
        b, t, _ = h.shape
        if t < 1:
            raise ValueError("h must be (B, T, d) with T >= 1 for a pooled head")
        n = _lengths(lengths, b, t, h.device)
        if self.pooling == "mean":
            return _pool_mean(h, n)
        if self.pooling == "first":
            return h[:, 0]
        if self.pooling == "last":
            return h[torch.arange(b, device=h.device), n - 1]
        return _pool_max(h, n)

    def forward(self, h: Tensor, lengths: Tensor | None = None) -> Tensor:
        p = self.pool(h, lengths)  # (B,d)
        u = p @ self.fc1.weight.t() + self.fc1.bias  # (B,H)
        if self.activation == "relu":
            a = torch.clamp(u, min=0)
        elif self.activation == "gelu":
            inv_sqrt2 = torch.tensor(_f32(0.70710678118654752), dtype=u.dtype, device=u.device)
            a = (0.5 * u) * (1 + torch.erf((u * inv_sqrt2).double()).to(u.dtype))  # erff through double
        else:
            a = torch.tanh(u.double()).to(u.dtype)  # tanhf through double
        return a @ self.fc2.weight.t() + self.fc2.bias  # (B,C)


class ImageClassifierHead(PluginModule):
    """``image_classifier`` (Plugins/HeadImageClassifier): the ViT head (Dosovitskiy et al. 2021,
    eq. 4; timm's fc_norm variant for mean pooling):

        p_b = h_b0 (cls) or mean_{t < len_b} h_bt (mean)                              (B,d)
        y_b = (p_b - mu_b) * rstd_b * gamma + beta,  mu, var in double, rstd = 1/sqrt(var + 1e-5)
        logits = y W^T + c                                                            (B,C)

    Buffers: "norm.weight" (d), "norm.bias" (d), "head.weight" (C,d), "head.bias" (C) PARAM."""

    plugin_name = "image_classifier"
    per_token = False
    layer_norm_eps = _f32(1e-5)  # Double(Float(1e-5)), as the Swift code adds it

    def __init__(self, hp: dict, d_model: int, n_out: int):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model = {d_model} must be >= 1")
        if n_out < 2:
            raise ValueError(f"n_classes = {n_out}; an image classifier needs the dataset's classes (>= 2)")
        self.d, self.n_out, self.pooling = d_model, n_out, hp["pooling"]
        self._declare("norm.weight", (d_model,), param=True, init=torch.ones(d_model))
        self._declare("norm.bias", (d_model,), param=True)
        self._declare("head.weight", (n_out, d_model), param=True, init=_normal((n_out, d_model), hp["init_std"]))
        self._declare("head.bias", (n_out,), param=True)

    def forward(self, h: Tensor, lengths: Tensor | None = None) -> Tensor:
        b, t, d = h.shape
        if t < 1:
            raise ValueError("h must be (B, T, d) with T >= 1 for a pooled head")
        n = _lengths(lengths, b, t, h.device)
        p = h[:, 0] if self.pooling == "cls" else _pool_mean(h, n)  # (B,d)
        p64 = p.double()
        mean = p64.sum(1, keepdim=True) / d
        var = ((p64 - mean) ** 2).sum(1, keepdim=True) / d
        rstd = (1 / torch.sqrt(var + self.layer_norm_eps)).to(p.dtype)
        x_hat = (p - mean.to(p.dtype)) * rstd
        y = x_hat * self.norm.weight + self.norm.bias
        return y @ self.head.weight.t() + self.head.bias  # (B,C)


# ============================================================================= builders


def _check_dims(d_model: int, n_experts: int) -> None:
    if d_model < 1:
        raise ValueError(f"d_model = {d_model}: the router needs d_model >= 1")
    if n_experts < 1:
        raise ValueError(f"n_experts = {n_experts}: the router needs n_experts >= 1")


def _check_upkeep(hp: dict) -> None:
    if not hp["ema_decay"] < 1:
        raise ValueError(f"ema_decay = {hp['ema_decay']} must be in [0, 1)")
    if hp["dead_code_threshold"] != 0 and not hp["ema"]:
        raise ValueError(f"dead_code_threshold = {hp['dead_code_threshold']} needs ema = true")


ROUTERS: dict[str, Callable[..., PluginModule]] = {
    "smoe": SMoERouter,
    "xmoe": XMoERouter,
    "stablemoe": StableMoERouter,
    "smoe_dropout": SMoEDropoutRouter,
    "dense": DenseRouter,
    "softmoe": SoftMoERouter,
    "hash": HashRouter,
    "lsh": LSHRouter,
}
QUANTIZERS: dict[str, Callable[..., _QuantizerBase]] = {
    "vqvae": VQVAEQuantizer,
    "vqgan_cos": VQGANCosQuantizer,
    "lfq": LFQQuantizer,
    "rvq": RVQQuantizer,
    "lsh_code": LSHCodeQuantizer,
}
HEADS: dict[str, Callable[..., PluginModule]] = {
    "lm": LMHead,
    "classifier": ClassifierHead,
    "image_classifier": ImageClassifierHead,
}


def build_router(
    name: str, hp: dict, d_model: int, n_experts: int, step: int, total_steps: int, *,
    vocab_size: int | None = None, create_info: dict | None = None,
) -> nn.Module:
    """The router plugin ``name`` for an evaluation forward.

    hp: its hyperparameters (missing ones get the schema defaults; see ``resolve_hparams``).
    step, total_steps: the step info of the forward and create_info.total_steps. No eval forward
    of a built-in router depends on them (smoe_dropout evaluates at k_max, stablemoe is in stage 2
    whenever it distils); they are kept as ``module.step`` / ``module.total_steps``.
    vocab_size: create_info.vocab_size, the token-id range; ``stablemoe`` with distill = true
    needs it (its distilled router has one embedding and one frozen assignment per token id).
    create_info: other vqmoe_create_info fields by name; its "vocab_size" is used when the
    keyword is not given (no built-in router reads another field).
    forward(x (N,d) float32, token_ids (N,) long or None, n_groups) -> RouterOutput; the module
    keeps the last forward's aux loss as ``aux_loss``.
    """
    if name not in ROUTERS:
        raise KeyError(f"unknown router '{name}'; known: {', '.join(ROUTERS)}")
    hp = resolve_hparams(name, hp)
    if vocab_size is None and create_info:
        vocab_size = create_info.get("vocab_size") or None
    if name == "stablemoe":
        module = StableMoERouter(hp, d_model, n_experts, vocab_size)
    else:
        module = ROUTERS[name](hp, d_model, n_experts)
    module.hparams, module.step, module.total_steps = hp, step, total_steps
    return module.eval()


def build_quantizer(
    name: str, hp: dict, d_model: int, n_experts: int, step: int, total_steps: int, *,
    n_codes: int | None = None, create_info: dict | None = None,
) -> nn.Module:
    """The quantizer plugin ``name`` for an evaluation forward.

    n_codes: create_info.n_codes, the model's K (model.ffn.n_codes; the host's default is
    n_experts, used when None). K = the hyperparameter codebook_size when > 0, else n_codes;
    ``lsh_code`` always takes n_codes. step / total_steps do not change an eval forward (EMA,
    k-means init and dead-code restart run only in training forwards).
    create_info: other vqmoe_create_info fields by name; its "n_codes" is used when the keyword
    is not given (no built-in quantizer reads another field).
    forward(x (N,d) float32) -> (quantized (N,d) float32, codes (N,L) long); attributes
    ``codebook_size`` (K), ``levels`` (L) and ``loss`` (the last forward's unweighted loss).
    """
    if name not in QUANTIZERS:
        raise KeyError(f"unknown quantizer '{name}'; known: {', '.join(QUANTIZERS)}")
    hp = resolve_hparams(name, hp)
    if n_codes is None and create_info:
        n_codes = create_info.get("n_codes") or None
    module = QUANTIZERS[name](hp, d_model, n_experts if n_codes is None else n_codes)
    module.hparams, module.step, module.total_steps = hp, step, total_steps
    return module.eval()


def build_head(name: str, hp: dict, d_model: int, n_out: int, *, create_info: dict | None = None) -> nn.Module:
    """The head plugin ``name``. n_out: create_info.vocab_size for ``lm``, create_info.n_classes
    for ``classifier`` / ``image_classifier``. create_info: accepted for symmetry and unused (the
    heads read only d_model and their n_out; seq_len comes with h). forward(h (B,T,d), lengths
    (B,) or None) -> logits (B*T, n_out) when ``per_token`` (lm), else (B, n_out)."""
    if name not in HEADS:
        raise KeyError(f"unknown head '{name}'; known: {', '.join(HEADS)}")
    hp = resolve_hparams(name, hp)
    module = HEADS[name](hp, d_model, n_out)
    module.hparams = hp
    return module.eval()


# ============================================================================= self-check


def _set(module: PluginModule, **tensors) -> None:
    """Overwrite declared buffers (by plugin name; "__" stands for ".")."""
    with torch.no_grad():
        for key, value in tensors.items():
            name = key.replace("__", ".")
            dst = module.plugin_tensor(name)
            dst.copy_(torch.as_tensor(value, dtype=dst.dtype).reshape(dst.shape))


def _self_check() -> None:
    with torch.no_grad():
        _check_values()
    _check_autograd()
    print("vqmoe_torch.plugins self-check: every plugin builds and runs; Swift test values reproduced")


def _check_values() -> None:  # noqa: C901 (a list of independent checks)
    torch.manual_seed(0)
    T = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    d, E, N = 12, 6, 20
    x = torch.randn(N, d)
    ids = torch.randint(0, 50, (N,))

    # ---- every plugin at its defaults: shapes
    for name in ROUTERS:
        r = build_router(name, {}, d, E, 0, 100, vocab_size=50)
        out = r(x, ids, 4)
        if out.kind == "topk":
            k = out.experts.shape[1]
            assert out.experts.shape == (N, k) and out.experts.dtype == torch.long, name
            assert out.weights.shape == (N, k) and out.weights.dtype == torch.float32, name
            assert bool(((out.experts >= 0) & (out.experts < E)).all()), name
        else:
            assert out.dispatch.shape == out.combine.shape == (N, E * out.slots), name
        assert set(r.state_dict()) == set(r.buffer_specs), name
    for name in QUANTIZERS:
        q = build_quantizer(name, {}, d, E, 0, 100, n_codes=8)
        quantized, codes = q(x)
        assert quantized.shape == (N, d) and quantized.dtype == torch.float32, name
        assert codes.shape == (N, q.levels) and codes.dtype == torch.long, name
        assert bool(((codes >= 0) & (codes < q.codebook_size)).all()), name
        assert set(q.state_dict()) == set(q.buffer_specs), name
    h = torch.randn(3, 5, d)
    for name in HEADS:
        hd = build_head(name, {}, d, 7)
        logits = hd(h, torch.tensor([5, 2, 1]) if not hd.per_token else None)
        assert logits.shape == ((15, 7) if hd.per_token else (3, 7)), name
        assert set(hd.state_dict()) == set(hd.buffer_specs), name
    xmoe_buffers = build_router("xmoe", {}, d, E, 0, 1).buffer_specs
    assert set(xmoe_buffers) == {"proj.weight", "expert_embeddings", "log_temperature"}
    assert build_router("smoe_dropout", {}, d, E, 0, 1).buffer_specs["weight"]["role"] == "state"
    assert build_quantizer("vqvae", {}, d, E, 0, 1).buffer_specs["codebook"]["role"] == "state"  # ema default
    plain_vq = build_quantizer("vqvae", {"ema": False, "dead_code_threshold": 0.0}, d, E, 0, 1)
    assert plain_vq.buffer_specs["codebook"]["role"] == "param"

    # ---- loading checkpoint tensors: names and shapes are checked
    r = build_router("smoe", {"bias": True}, d, E, 0, 1)
    r.load_plugin_tensors({"weight": torch.ones(E, d), "bias": torch.arange(E)}, {})
    assert float(r.bias[3].detach()) == 3
    for params, what in (({"weight": torch.ones(E, d + 1), "bias": torch.zeros(E)}, "shape"),
                         ({"weight": torch.ones(E, d)}, "missing")):
        try:
            r.load_plugin_tensors(params, {})
            raise AssertionError("no error for a bad " + what)
        except (KeyError, ValueError) as err:
            assert ("weight" in str(err)) if what == "shape" else ("bias" in str(err)), err

    # ---- create_info fields reach the plugins; the last losses are kept on the modules
    r = build_router("stablemoe", {}, d, E, 0, 1, create_info={"vocab_size": 77, "seq_len": 8})
    assert r.buffer_specs["stage2_assignment"]["shape"] == (77,)
    q = build_quantizer("vqvae", {}, d, E, 0, 1, create_info={"n_codes": 5})
    assert q.codebook_size == 5 and q.buffer_specs["codebook"]["shape"] == (5, d)
    r = build_router("smoe", {}, d, E, 0, 1)
    assert r.aux_loss is None and r(x).aux_loss is r.aux_loss and r.aux_loss.shape == ()
    q(x)
    assert q.loss is not None and q.loss.shape == ()

    # ---- RouterSMoETests.testTiesGoToLowerIndexInDescendingOrder
    r = build_router("smoe", {"k": 3}, 2, 5, 0, 10)
    _set(r, weight=[0.1, 0.1, 0.5, 0.5, 0.2, 0.2, 0.5, 0.5, 0.9, 0.9])
    out = r(T([[1, 1], [2, 0.5]]))
    assert out.experts.tolist() == [[4, 1, 3], [4, 1, 3]], out.experts
    assert out.weights[0, 1] == out.weights[0, 2] and out.weights[0, 0] > out.weights[0, 1]
    # ---- RouterSMoETests.testBalanceLossValueOnHandExample: W = 0 -> experts 0, 1 with 1/2; aux = 0.3
    r = build_router("smoe", {"k": 2, "balance_weight": 0.3}, 3, 4, 0, 10)
    _set(r, weight=torch.zeros(12))
    out = r(torch.randn(10, 3))
    assert out.experts.tolist() == [[0, 1]] * 10 and bool((out.weights == 0.5).all())
    assert abs(float(out.aux_loss) - 0.3) < 1e-6
    # ---- smoe against a double-precision brute force (RouterSMoETests.reference), kept and full
    for weights in ("kept", "full"):
        r = build_router("smoe", {"k": 3, "bias": True, "weights": weights, "balance_weight": 0.1}, d, E, 0, 1)
        _set(r, bias=torch.randn(E))
        out = r(x)
        lg = x.double() @ r.weight.double().t() + r.bias.double()
        p = torch.softmax(lg, 1)
        order = sorted(range(E), key=lambda j: -lg[0, j].item())[:3]
        assert out.experts[0].tolist() == order
        ref_w = p[0, order] if weights == "full" else torch.softmax(lg[0, order], 0)
        assert torch.allclose(out.weights[0].double(), ref_w, atol=1e-6)
        load = torch.bincount(out.experts.reshape(-1), minlength=E).double()
        assert abs(float(out.aux_loss) - 0.1 * E * float((load / (N * 3) * p.mean(0)).sum())) < 1e-6

    # ---- RouterXMoETests.testScoresAreCosinesOverTemperatureOnHandExample
    r = build_router("xmoe", {"router_dim": 2, "temperature_mode": "fixed", "temperature": 0.5,
                              "balance_weight": 1.0, "k": 2}, 2, 3, 0, 10)
    _set(r, proj__weight=[1, 0, 0, 1], expert_embeddings=[3, 0, 0, 0.5, -1, -1])
    out = r(T([[1, 1], [4, 0]]))
    assert out.experts.tolist() == [[0, 1], [0, 1]], out.experts
    assert abs(float(out.weights[0, 0]) - 0.5) < 1e-6
    assert abs(float(out.weights[1, 0]) - 1 / (1 + math.exp(-2.0))) < 1e-6
    r2 = math.sqrt(2)
    sm = lambda v: [math.exp(a) / sum(math.exp(b) for b in v) for a in v]  # noqa: E731
    p1, p2 = sm([r2, r2, -2.0]), sm([2.0, 0, -r2])
    assert abs(float(out.aux_loss) - 3 * (0.5 * (p1[0] + p2[0]) / 2 + 0.5 * (p1[1] + p2[1]) / 2)) < 1e-6
    # learnable: tau = exp(log_temperature), the buffer's value, not the hyperparameter's
    r = build_router("xmoe", {"router_dim": 3, "k": 2, "balance_weight": 0.0}, d, E, 0, 1)
    _set(r, log_temperature=[math.log(0.3) + 0.2])
    out = r(x)
    u = x.double() @ r.proj.weight.double().t()
    u = u / u.norm(dim=1, keepdim=True)
    eh = r.expert_embeddings.double() / r.expert_embeddings.double().norm(dim=1, keepdim=True)
    s = u @ eh.t() / math.exp(float(r.log_temperature[0]))
    top = s.topk(2, dim=1)
    assert torch.equal(out.experts, top.indices)
    assert torch.allclose(out.weights.double(), torch.softmax(top.values, 1), atol=1e-5)
    assert float(out.aux_loss) == 0

    # ---- RouterSMoEDropoutTests.testScheduleValuesAtChosenSteps, and eval = k_max
    for step, k in [(0, 1), (7, 1), (8, 2), (21, 2), (22, 3), (50, 5), (64, 5), (65, 6), (93, 8), (100, 8),
                    (150, 8), (-5, 1)]:
        assert smoe_dropout_k(step, 100, 1, 8, train=True) == k, (step, k)
    for step, k in [(1, 2), (3, 4), (5, 4), (7, 6), (8, 6)]:
        assert smoe_dropout_k(step, 8, 2, 6, train=True) == k, (step, k)
    assert smoe_dropout_k(0, 0, 1, 8, train=True) == 8 and smoe_dropout_k(0, 100, 1, 8, train=False) == 8
    assert build_router("smoe_dropout", {"k_max": 0}, d, 5, 0, 100)(x).experts.shape == (N, 5)
    r = build_router("smoe_dropout", {"k_max": 4}, d, 5, 0, 100)
    out = r(x)
    lg = x.double() @ r.weight.double().t()
    assert out.experts.tolist() == lg.topk(4, dim=1).indices.tolist() and float(out.aux_loss) == 0

    # ---- stablemoe: RouterStableMoETests.testEvalUsesTheLiveDistilledRouterBeforeTheSwitch,
    #      testStage2DistilledRouterIsFrozen (eval reads the table), testDistillFalseStaysInStage1...
    V, D = 6, 3
    r = build_router("stablemoe", {"distill_dim": D, "stage2_step": 50}, 5, 4, 3, 100, vocab_size=V)
    _set(r, expert_embeddings=torch.randn(20) * 0.7, distilled_embedding=torch.randn(V * D) * 1.1,
         distilled_centroids=torch.randn(4 * D) * 0.9)
    xs, tok = torch.randn(10, 5), torch.tensor([(i * 5) % V for i in range(10)])
    eh = r.expert_embeddings.double() / torch.sqrt((r.expert_embeddings.double() ** 2).sum(1, keepdim=True) + 1e-12)
    s = xs.double() @ eh.t()
    z = r.distilled_embedding.double()[tok] @ r.distilled_centroids.double().t()
    out = r(xs, tok)
    assert out.experts.squeeze(1).tolist() == z.argmax(1).tolist(), "eval routes with the live distilled router"
    gate = torch.sigmoid(s.gather(1, z.argmax(1, keepdim=True)))
    assert torch.allclose(out.weights.double(), gate, atol=1e-6)
    assert float(out.aux_loss) == 0
    table = torch.tensor([3, 0, 2, 1, 1, 0], dtype=torch.int32)
    _set(r, stage2_assignment=table)
    assert r(xs, tok).experts.squeeze(1).tolist() == table[tok].tolist(), "a frozen table decides"
    scaled = build_router("stablemoe", {"distill": False, "balance_weight": 0.3}, 5, 4, 0, 100)
    _set(scaled, expert_embeddings=r.expert_embeddings)
    out = scaled(xs, None)
    assert out.experts.squeeze(1).tolist() == s.argmax(1).tolist()
    load = torch.bincount(s.argmax(1), minlength=4).double()
    assert abs(float(out.aux_loss) - 0.3 * 4 * float((load / 10 * torch.softmax(s, 1).mean(0)).sum())) < 1e-6
    _set(scaled, expert_embeddings=r.expert_embeddings * torch.tensor([[3.0], [6], [9], [12]]))
    out2 = scaled(xs, None)  # testScoresUseOnlyTheDirectionOfTheCentroids
    assert torch.equal(out.experts, out2.experts) and torch.allclose(out.weights, out2.weights, atol=1e-6)
    assert [stablemoe_stage(s_, 100, 7, True, True) for s_ in (0, 6, 7, 50)] == [1, 1, 2, 2]
    assert [stablemoe_stage(sw - 1, t_, 0, True, True) for t_, sw in ((100, 10), (45, 5), (44, 4))] == [1, 1, 1]
    assert [stablemoe_stage(sw, t_, 0, True, True) for t_, sw in ((100, 10), (45, 5), (44, 4))] == [2, 2, 2]
    assert stablemoe_stage(3, 100, 0, True, train=False) == 2 and stablemoe_stage(3, 100, 0, False, False) == 1

    # ---- softmoe: against a double reference; one-token groups; groups independent; scale invariance
    for normalize, slots in ((True, 2), (False, 1)):
        r = build_router("softmoe", {"slots_per_expert": slots, "normalize": normalize}, d, E, 0, 1)
        if normalize:
            _set(r, scale=[1.7])
        out = r(x, None, 4)
        x64, phi = x.double(), r.phi.double()
        if normalize:
            lg = 1.7 * (x64 / torch.sqrt((x64 ** 2).sum(1, keepdim=True) + 1e-12)) @ (
                phi / torch.sqrt((phi ** 2).sum(0, keepdim=True) + 1e-12))
        else:
            lg = x64 @ phi
        assert torch.allclose(out.combine.double(), torch.softmax(lg, 1), atol=1e-6)
        assert torch.allclose(out.dispatch.double(), torch.softmax(lg.view(4, 5, -1), 1).view(N, -1), atol=1e-6)
        assert bool((r(x, None, N).dispatch == 1).all()), "one token per group: dispatch = 1"
        both = r(x, None, 2)
        assert torch.allclose(both.dispatch[:10], r(x[:10], None, 1).dispatch, atol=1e-6)
    r = build_router("softmoe", {"slots_per_expert": 2}, d, E, 0, 1)
    a = r(x, None, 2)
    x2 = x.clone()
    x2[2] *= 7
    with torch.no_grad():
        r.phi[:, 3] *= 0.1
    b = r(x2, None, 2)
    assert torch.allclose(a.dispatch, b.dispatch, atol=1e-6) and torch.allclose(a.combine, b.combine, atol=1e-6)

    # ---- ffi routers: hash = mix64(uint32 id) mod E (FFIBridgeTests), k = 2 -> c, c + 1, weights 1/2
    tok = torch.tensor([0, 1, 2, 7, 123456, -1, 2**31 - 1, -(2**31)])
    want = [mix64(int(i) & 0xFFFFFFFF) % 5 for i in tok]
    out = build_router("hash", {"k": 2}, d, 5, 0, 1)(torch.zeros(8, d), tok)
    assert out.experts.tolist() == [[c, (c + 1) % 5] for c in want] and bool((out.weights == 0.5).all())
    big = torch.randint(-(2**31), 2**31, (2000,))
    assert hash_experts(big, 7).tolist() == [mix64(int(i) & 0xFFFFFFFF) % 7 for i in big]
    xs = torch.randn(30, 9)
    for n_e in (1, 2, 5, 8):  # the C loop, float32 sum in order, in plain Python
        want = []
        for row in xs.tolist():
            bucket, bits = 0, 0
            while (1 << bits) < n_e:
                bits += 1
            for b_ in range(bits):
                dot = 0.0
                for i, v in enumerate(row):
                    dot = _f32(dot + (v if mix64(i * 64 + b_) & 1 else -v))
                bucket |= (1 << b_) if dot > 0 else 0
            want.append(bucket % n_e)
        assert lsh_buckets(xs, n_e).tolist() == want, n_e
        assert build_router("lsh", {}, 9, n_e, 0, 1)(xs).experts.squeeze(1).tolist() == want
        q = build_quantizer("lsh_code", {}, 9, 1, 0, 1, n_codes=n_e)
        qv, c = q(xs)
        assert c.squeeze(1).tolist() == want and torch.equal(qv, xs)

    # ---- QuantizerVQVAETests.testTiesGoToLowestIndex
    plain = {"ema": False, "kmeans_init": False, "dead_code_threshold": 0.0}
    q = build_quantizer("vqvae", plain, 3, 5, 0, 1)
    _set(q, codebook=[9, 9, 9, 0.3, -1.7, 2.9, -5, 5, -5, 0.3, -1.7, 2.9, 0.3, -1.7, 2.9])
    qv, c = q(T([[0.3, -1.7, 2.9], [0.31, -1.69, 2.9], [-5, 5, -5.5]]))
    assert c.squeeze(1).tolist() == [1, 1, 2] and torch.equal(qv[1], T([0.3, -1.7, 2.9]))
    _set(q, codebook=torch.zeros(15))
    assert q(T([[1, 2, 3]]))[1].tolist() == [[0]]
    # ---- QuantizerRVQTests.testTiesGoToLowestIndex
    q = build_quantizer("rvq", {**plain, "levels": 2}, 2, 4, 0, 1)
    _set(q, codebook=[9, 9, 0.5, -1.5, -4, 4, 0.5, -1.5] + [0.0] * 8)
    qv, c = q(T([[0.5, -1.5], [0.6, -1.4]]))
    assert c.tolist() == [[1, 0], [1, 0]] and qv.tolist() == [[0.5, -1.5], [0.5, -1.5]]
    # rvq / vqvae against a double brute force, with the loss
    q = build_quantizer("rvq", {**plain, "levels": 3}, d, 8, 0, 1)
    qv, c = q(x)
    r_, tot, sse = x.double(), torch.zeros(N, d, dtype=torch.float64), 0.0
    for lv in range(3):
        cb = q.codebook[lv].double()
        dist = ((r_.unsqueeze(1) - cb.unsqueeze(0)) ** 2).sum(-1)
        cc = dist.argmin(1)
        assert cc.tolist() == c[:, lv].tolist()
        sse += float(dist.gather(1, cc.unsqueeze(1)).sum())
        r_, tot = r_ - cb[cc], tot + cb[cc]
    assert torch.allclose(qv.double(), tot, atol=1e-5) and abs(float(q.loss) / (1.25 * sse / (N * d)) - 1) < 1e-6
    # ---- QuantizerVQGANCosTests.testCosineTiesGoToLowestIndexAndNormIsIgnored
    q = build_quantizer("vqgan_cos", {**plain, "code_dim": 3}, 3, 4, 0, 1)
    _set(q, proj_in__weight=torch.eye(3), proj_in__bias=torch.zeros(3),
         codebook=[40, 40, 0, 0.2, -0.4, 0.8, -1, 0, 0, 0.4, -0.8, 1.6])
    assert q(T([[0.1, -0.2, 0.4], [3, 3.1, 0], [-0.1, 0, 0.01]]))[1].squeeze(1).tolist() == [1, 0, 2]
    _set(q, codebook=torch.ones(12))
    assert q(T([[1, 2, 3]]))[1].tolist() == [[0]]
    # ---- QuantizerLFQTests.testIndexIsSumOfBitsTimesPowersOfTwo
    q = build_quantizer("lfq", {"scale": 0.5}, 3, 8, 0, 1)
    _set(q, proj_in__weight=torch.eye(3), proj_in__bias=torch.zeros(3), proj_out__weight=torch.eye(3),
         proj_out__bias=torch.zeros(3))
    qv, c = q(T([[1, -1, 1], [-1, -1, -1], [0.1, 0.2, 0.3], [-2, 3, 0], [0, 0, 1e-3], [5, 0, -5]]))
    assert c.squeeze(1).tolist() == [5, 0, 7, 2, 4, 1]
    assert qv.reshape(-1).tolist() == [0.5, -0.5, 0.5, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, -0.5, 0.5, -0.5, -0.5,
                                       -0.5, 0.5, 0.5, -0.5, -0.5]
    # ---- QuantizerLFQTests.testEntropyTermsAtKnownPoints
    q = build_quantizer("lfq", {"diversity_gamma": 0.3, "scale": 1.5}, 3, 32, 0, 1)
    _set(q, proj_in__weight=torch.zeros(15), proj_in__bias=torch.zeros(5))
    _, c = q(torch.randn(5, 3))
    log_k = math.log(32)
    assert abs(float(q.loss) - (0.1 * 0.7 * log_k + 0.25 * 1.5 * 1.5)) < 1e-6 and c.squeeze(1).tolist() == [0] * 5
    assert abs(q.last_entropies[0] - log_k) < 1e-9 and abs(q.last_entropies[1] - log_k) < 1e-9
    q = build_quantizer("lfq", {}, 2, 4, 0, 1)
    _set(q, proj_in__weight=torch.eye(2), proj_in__bias=torch.zeros(2))
    q(T([[30, 30], [-30, -30]]))
    assert abs(q.last_entropies[0]) < 1e-9 and abs(q.last_entropies[1] - math.log(2)) < 1e-9

    # ---- heads: lm against a double reference, with huge logits; classifier / image classifier
    hd = build_head("lm", {}, d, 11)
    _set(hd, bias=torch.randn(11))
    hh = torch.randn(2, 4, d) * 300  # HeadLMTests.testStableSoftmaxWithLargeLogits: logits ~ +-400
    ref = hh.reshape(-1, d).double() @ hd.weight.double().t() + hd.bias.double()
    assert torch.allclose(hd(hh).double(), ref, rtol=1e-5, atol=1e-3)
    lengths = torch.tensor([5, 2, 1])
    for pooling in ("mean", "first", "last", "max"):  # testPoolingReadsOnlyRealTokens
        for act in ("relu", "gelu", "tanh"):
            hd = build_head("classifier", {"pooling": pooling, "activation": act}, d, 3)
            _set(hd, fc1__bias=torch.randn(d), fc2__bias=torch.randn(3))
            padded = h.clone()
            for b_ in range(3):
                padded[b_, int(lengths[b_]):] += 5
            base = hd(h, lengths)
            assert torch.equal(base, hd(padded, lengths)), pooling
            assert torch.equal(hd(h, None), hd(h, torch.full((3,), 5))), pooling
            real = [h[b_, : int(lengths[b_])].double() for b_ in range(3)]
            p = torch.stack([{"mean": r_.mean(0), "first": r_[0], "last": r_[-1], "max": r_.max(0).values}[pooling]
                             for r_ in real])
            u = p @ hd.fc1.weight.double().t() + hd.fc1.bias.double()
            a = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}[act](u)
            assert torch.allclose(base.double(), a @ hd.fc2.weight.double().t() + hd.fc2.bias.double(), atol=1e-5)
    rows = [build_head("classifier", {"pooling": p_}, d, 3) for p_ in ("mean", "first", "last", "max")]
    for m in rows[1:]:
        m.load_state_dict(rows[0].state_dict())
    ones = torch.ones(3, dtype=torch.long)
    assert all(torch.equal(m(h, ones), rows[0](h, ones)) for m in rows[1:]), "length 1: every pooling reads t = 0"
    # HeadImageClassifierTests.testClsReadsTheClassTokenAndMeanHonoursLengths / testLayerNormEpsAndConstantVectors
    cls, mean = build_head("image_classifier", {}, d, 3), build_head("image_classifier", {"pooling": "mean"}, d, 3)
    _set(cls, norm__weight=1 + 0.1 * torch.randn(d), norm__bias=0.1 * torch.randn(d), head__bias=torch.randn(3))
    mean.load_state_dict(cls.state_dict())
    others = h.clone()
    others[:, 1:] += 3
    assert torch.equal(cls(h, lengths), cls(others, None))
    assert not torch.equal(mean(h, None), mean(h, lengths)) and torch.equal(mean(h, ones), cls(h, None))
    const = torch.zeros(3, 5, d)
    for b_ in range(3):
        const[b_, 0] = b_ + 0.5
    s_ = math.sqrt(1e-5)
    const[1, 0] = T([1 + (s_ if k % 2 == 0 else -s_) * (0 if k == d - 1 else 1) for k in range(d)])
    z = cls(const, None).double()
    wb = cls.head.bias.double() + cls.head.weight.double() @ cls.norm.bias.double()
    assert torch.allclose(z[0], wb, atol=1e-5) and torch.allclose(z[2], wb, atol=1e-5)
    p1 = const[1, 0].double()
    y1 = (p1 - p1.mean()) / torch.sqrt(p1.var(unbiased=False) + 1e-5)
    y1 = y1 * cls.norm.weight.double() + cls.norm.bias.double()
    assert torch.allclose(z[1], cls.head.weight.double() @ y1 + cls.head.bias.double(), atol=2e-3)



def _check_autograd() -> None:
    """Autograd still works through the routers (aux loss included) and the straight-through quantizers."""
    torch.manual_seed(1)
    d, E = 12, 6
    x = torch.randn(20, d)
    r = build_router("smoe", {"k": 2}, d, E, 0, 1)
    xg = x.clone().requires_grad_(True)
    out = r(xg)
    (out.weights.sum() + out.aux_loss).backward()
    assert r.weight.grad is not None and xg.grad is not None
    q = build_quantizer("vqgan_cos", {}, d, E, 0, 1)
    xg = x.clone().requires_grad_(True)
    q(xg)[0].square().sum().backward()
    assert xg.grad is not None and q.proj_in.weight.grad is not None
    q = build_quantizer("vqvae", {}, d, E, 0, 1)
    xg = x.clone().requires_grad_(True)
    qv, _ = q(xg)
    qv.sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x)) and torch.equal(qv, q.codebook[q(x)[1].squeeze(1)])


if __name__ == "__main__":
    _self_check()
