import Foundation

/// The attention sublayer of a Transformer block: out = proj(attention(LN1(x))) over (B,T,C).
///
/// ```swift
/// let p = AttentionProjections(layer: "layers.0", c: 128, initStd: 0.02, seeds: (1, 2))
/// let attn: AttentionSublayer = SelfAttention(projections: p, heads: 4, mask: .causal, scratch: AttentionScratch())
/// attn.forward(x: x, out: y, ctx)
/// attn.backward(dout: dy, x: x, dx: dx, ctx)     // dx += dL/dx
/// ```
public protocol AttentionSublayer: AnyObject {
    /// Trainable tensors, in checkpoint order (ln1, qkv, proj, then the kind's own).
    var parameters: [Parameter] { get }
    /// out (B,T,C) for x (B,T,C); in training, keeps what the backward needs.
    func forward(x: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, _ ctx: ForwardContext)
    /// dx (B,T,C) += dL/dx, and the parameter gradients, from dout = dL/d out (B,T,C).
    func backward(
        dout: UnsafePointer<Float>, x: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>, _ ctx: ForwardContext)
    /// Inference: out (B,t,C) for the rows x (B,t,C) that follow the `cache.length` cached
    /// positions, whose [Q | K | V] rows go into layer `layer`'s cache (the model advances
    /// `cache.length` after its last layer). Keeps nothing for a backward.
    func decode(
        x: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, batch: Int, t: Int, cache: KVCache, layer: Int)
    /// Analytic forward FLOPs per token (matmuls) for a batch of `batch` sequences.
    func flopsPerToken(seqLen: Int, batch: Int, accounting: AttentionFlops) -> Double
    /// Bytes of saved activations.
    var bytes: Int { get }
}

/// The parameters every attention sublayer has: the pre-LN, the fused qkv projection and the
/// output projection, named `<layer>.ln1.*`, `<layer>.attn.qkv.*`, `<layer>.attn.proj.*`.
public struct AttentionProjections: @unchecked Sendable {
    public let ln1: LayerNormParameters
    public let qkvWeight, qkvBias, projWeight, projBias: Parameter

    /// Weights N(0, initStd²) from `seeds` (qkv, proj); biases 0.
    public init(layer: String, c: Int, initStd: Float, seeds: (qkv: UInt64, proj: UInt64)) {
        ln1 = LayerNormParameters(name: "\(layer).ln1", c: c)
        qkvWeight = Parameter(name: "\(layer).attn.qkv.weight", shape: [3 * c, c])
        qkvWeight.fillNormal(std: initStd, seed: seeds.qkv)
        qkvBias = Parameter(name: "\(layer).attn.qkv.bias", shape: [3 * c], noDecay: true)
        projWeight = Parameter(name: "\(layer).attn.proj.weight", shape: [c, c])
        projWeight.fillNormal(std: initStd, seed: seeds.proj)
        projBias = Parameter(name: "\(layer).attn.proj.bias", shape: [c], noDecay: true)
    }

    public var parameters: [Parameter] { ln1.parameters + [qkvWeight, qkvBias, projWeight, projBias] }
    var c: Int { projWeight.shape[0] }

    /// qkv (N,3C) = ln (N,C) W_qkvᵀ + b.
    func qkv(_ ln: UnsafePointer<Float>, into qkv: UnsafeMutablePointer<Float>, n: Int) {
        Linear.forward(
            out: qkv, inp: ln, weight: qkvWeight.data, bias: qkvBias.data, n: n, inFeatures: c, outFeatures: 3 * c)
    }

    /// out (N,C) = y (N,C) W_projᵀ + b.
    func project(_ y: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>, n: Int) {
        Linear.forward(
            out: out, inp: y, weight: projWeight.data, bias: projBias.data, n: n, inFeatures: c, outFeatures: c)
    }

    /// dy (N,C) = dout W_proj (overwritten), and the projection's gradients.
    func projectBackward(dout: UnsafePointer<Float>, y: UnsafePointer<Float>, dy: UnsafeMutablePointer<Float>, n: Int) {
        dy.update(repeating: 0, count: n * c)
        Linear.backward(
            dinp: dy, dweight: projWeight.grad, dbias: projBias.grad, dout: dout, inp: y, weight: projWeight.data,
            n: n, inFeatures: c, outFeatures: c)
    }

    /// dln (N,C) = dqkv W_qkv (overwritten), and the qkv projection's gradients.
    func qkvBackward(dqkv: UnsafePointer<Float>, ln: UnsafePointer<Float>, dln: UnsafeMutablePointer<Float>, n: Int) {
        dln.update(repeating: 0, count: n * c)
        Linear.backward(
            dinp: dln, dweight: qkvWeight.grad, dbias: qkvBias.grad, dout: dqkv, inp: ln, weight: qkvWeight.data,
            n: n, inFeatures: c, outFeatures: 3 * c)
    }

    /// FLOPs per row of the qkv and output projections.
    var projectionFlops: Double { 2 * 4 * Double(c) * Double(c) }
}

/// Temporaries of the attention backward passes, shared by every layer of a model.
public final class AttentionScratch: @unchecked Sendable {
    /// dL/d(attention output before proj), dL/dqkv, dL/d LN1 output; Transformer-XL: dL/dr,
    /// dL/d [memory; segment] and the relative attention's own scratch.
    let dy = Storage<Float>(), dqkv = Storage<Float>(), dln = Storage<Float>()
    let dr = Storage<Float>(), dcat = Storage<Float>(), relative = Storage<Float>()
    public init() {}
    var bytes: Int { [dy, dqkv, dln, dr, dcat, relative].reduce(0) { $0 + $1.bytes } }
}

/// Multi-head self-attention with absolute positions (learned in the input layer), causal
/// (GPT-2 language models) or full (ViT):
///
///     ln = LN1(x);  qkv = ln W_qkvᵀ + b;  y = softmax(QKᵀ/√Dh [+ causal mask]) V;  out = y W_projᵀ + b
///
/// `FlashAttention`'s blockwise kernels run where `FlashAttention.applies` (always on a CPU with
/// AVX2 + FMA and Dh a multiple of 8; else from 512 tokens): they save the log-sum-exp of every
/// score row (B,H,T), memory O(T·C), no T×T matrix, and recompute the scores in the backward.
/// Otherwise `Attention` runs, which saves the probabilities (B,H,T,T) and recomputes nothing.
/// Saved per layer besides: LN1's output and statistics, qkv (B,T,3C), y. Generation (`decode`)
/// uses `Attention.decode`.
///
/// ```swift
/// let attn = SelfAttention(projections: p, heads: 4, mask: .causal, scratch: AttentionScratch())
/// ```
public final class SelfAttention: AttentionSublayer {
    public enum Mask: Sendable { case causal, full }
    public let projections: AttentionProjections
    public let heads: Int
    public let mask: Mask
    let ln1 = LayerNormSaved(), qkv = Storage<Float>(), lse = Storage<Float>(), y = Storage<Float>()
    /// The probabilities of short sequences (B,H,T,T), and `decode`'s over the cache (B·H, t, keys).
    let probs = Storage<Float>()
    let scratch: AttentionScratch

    public init(projections: AttentionProjections, heads: Int, mask: Mask, scratch: AttentionScratch) {
        self.projections = projections
        self.heads = heads
        self.mask = mask
        self.scratch = scratch
    }

    public var parameters: [Parameter] { projections.parameters }
    var causal: Bool { mask == .causal }

    public func forward(x: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, _ ctx: ForwardContext) {
        let p = projections, c = p.c, n = ctx.n, t = ctx.seqLen, b = ctx.batch
        ln1.forward(x, p.ln1, n: n, c: c)
        p.qkv(ln1.out.pointer, into: qkv.reserve(n * 3 * c), n: n)
        if FlashAttention.applies(t: t, dh: c / heads) {
            FlashAttention.forward(
                y: y.reserve(n * c), lse: lse.reserve(b * heads * t), qkv: qkv.pointer, b: b, t: t, c: c,
                heads: heads, causal: causal)
        } else {
            Attention.forward(
                y: y.reserve(n * c), att: probs.reserve(b * heads * t * t), qkv: qkv.pointer, b: b, t: t, c: c,
                heads: heads, causal: causal)
        }
        p.project(y.pointer, into: out, n: n)
    }

    public func backward(
        dout: UnsafePointer<Float>, x: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>, _ ctx: ForwardContext
    ) {
        let p = projections, c = p.c, n = ctx.n, t = ctx.seqLen, b = ctx.batch
        let dy = scratch.dy.reserve(n * c), dqkv = scratch.dqkv.zeros(n * 3 * c), dln = scratch.dln.reserve(n * c)
        p.projectBackward(dout: dout, y: y.pointer, dy: dy, n: n)
        if FlashAttention.applies(t: t, dh: c / heads) {
            FlashAttention.backward(
                dqkv: dqkv, dy: dy, y: y.pointer, lse: lse.pointer, qkv: qkv.pointer, b: b, t: t, c: c, heads: heads,
                causal: causal)
        } else {
            Attention.backward(
                dqkv: dqkv, dy: dy, qkv: qkv.pointer, att: probs.pointer, b: b, t: t, c: c, heads: heads,
                causal: causal)
        }
        p.qkvBackward(dqkv: dqkv, ln: ln1.out.pointer, dln: dln, n: n)
        ln1.backward(dinp: dx, dout: dln, inp: x, p.ln1, n: n, c: c)
    }

    /// Causal only (a ViT's full attention does not generate).
    public func decode(
        x: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, batch: Int, t: Int, cache: KVCache, layer: Int
    ) {
        precondition(causal, "decode needs causal attention")
        let p = projections, c = p.c, n = batch * t, past = cache.length
        ln1.forward(x, p.ln1, n: n, c: c)
        p.qkv(ln1.out.pointer, into: qkv.reserve(n * 3 * c), n: n)
        cache.append(layer, qkv: qkv.pointer, t: t)
        Attention.decode(
            y: y.reserve(n * c), att: probs.reserve(batch * heads * t * (past + t)), cache: cache.layer(layer),
            capacity: cache.capacity, past: past, b: batch, t: t, c: c, heads: heads)
        p.project(y.pointer, into: out, n: n)
    }

    /// Projections 8C², scores and values 4·keys·C with keys = T (full, or `square`) or the
    /// average visible (T+1)/2 ≈ T/2 of a causal mask.
    public func flopsPerToken(seqLen: Int, batch: Int, accounting: AttentionFlops) -> Double {
        let keys = (causal && accounting == .visible) ? Double(seqLen) / 2 : Double(seqLen)
        return projections.projectionFlops + 4 * keys * Double(projections.c)
    }

    public var bytes: Int { ln1.bytes + qkv.bytes + lse.bytes + y.bytes + probs.bytes }
}
