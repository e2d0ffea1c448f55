import Foundation

/// The sinusoid encodings of the distances K−1 … 0 (K keys), shared by every relative
/// attention layer of a model and recomputed only when K changes (K = T at a stream's start,
/// then M + T).
public final class RelativePositions: @unchecked Sendable {
    let table = Storage<Float>()
    private(set) var keys = 0
    public init() {}

    /// The table (K, C) for `keys` keys.
    func prepare(keys k: Int, c: Int) -> UnsafePointer<Float> {
        if k != keys {
            RelativeAttention.positions(out: table.reserve(k * c), keys: k, c: c)
            keys = k
        }
        return UnsafePointer(table.pointer)
    }
}

/// Transformer-XL attention sublayer (Dai et al. 2019): pre-LN over [memory; segment], fused
/// qkv, relative positional attention (`RelativeAttention`: learned biases u, v; the sinusoid
/// encodings projected by W_r), output projection. No absolute position embedding.
///
///     cat (B,K,C) = [memory_l; x], K = M + T;  ln = LN1(cat);  qkv = ln W_qkvᵀ + b;  r = table W_rᵀ
///     y = RelativeAttention(qkv, r, u, v);  out = y W_projᵀ + b
///     memory_l ← the last M rows of cat (no gradient flows into the memory)
///
/// Parameters after the projections: `<layer>.attn.r.weight` (C,C), `<layer>.attn.u`, `<layer>.attn.v` (C).
///
/// ```swift
/// let attn = RelativeSelfAttention(projections: p, layer: 0, heads: 4, initStd: 0.02, seeds: s, memory: mem,
///                                  positions: table, scratch: scratch)
/// ```
public final class RelativeSelfAttention: AttentionSublayer {
    public let projections: AttentionProjections
    public let rWeight: Parameter, u: Parameter, v: Parameter
    public let layer: Int, heads: Int
    /// The model's memory (train or eval, chosen per forward) and the shared position table.
    let memory: (train: SegmentMemory?, eval: SegmentMemory?)
    let positions: RelativePositions
    let scratch: AttentionScratch
    /// Saved: [memory; x], LN1 over it, qkv (B,K,3C), r (K,C), y (B,T,C), and the softmax state:
    /// from K = `FlashAttention.minimumLength` keys the row log-sum-exps (B,H,T) of
    /// `FlashRelativeAttention`'s blockwise kernels, below it the probabilities (B,H,T,K).
    let cat = Storage<Float>(), ln1 = LayerNormSaved(), qkv = Storage<Float>(), r = Storage<Float>()
    let probs = Storage<Float>(), lse = Storage<Float>(), y = Storage<Float>()
    /// Memory rows the last forward attended to.
    private var memoryUsed = 0

    public init(
        projections: AttentionProjections, layer: Int, heads: Int, initStd: Float,
        seeds: (r: UInt64, u: UInt64, v: UInt64),
        memory: (train: SegmentMemory?, eval: SegmentMemory?), positions: RelativePositions, scratch: AttentionScratch
    ) {
        self.projections = projections
        self.layer = layer
        self.heads = heads
        self.memory = memory
        self.positions = positions
        self.scratch = scratch
        let c = projections.c, name = "layers.\(layer).attn"
        rWeight = Parameter(name: "\(name).r.weight", shape: [c, c])
        rWeight.fillNormal(std: initStd, seed: seeds.r)
        u = Parameter(name: "\(name).u", shape: [c], noDecay: true)
        u.fillNormal(std: initStd, seed: seeds.u)
        v = Parameter(name: "\(name).v", shape: [c], noDecay: true)
        v.fillNormal(std: initStd, seed: seeds.v)
    }

    public var parameters: [Parameter] { projections.parameters + [rWeight, u, v] }

    public func forward(x: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, _ ctx: ForwardContext) {
        let p = projections, c = p.c, t = ctx.seqLen, b = ctx.batch
        let mem = ctx.train ? memory.train : memory.eval
        memoryUsed = mem?.length ?? 0
        let k = memoryUsed + t, nk = b * k
        let cat = self.cat.reserve(nk * c)
        if let mem {
            mem.concat(layer, x: x, t: t, into: cat)
            mem.store(layer, cat: cat, t: t)
        } else {
            cat.update(from: x, count: nk * c)
        }
        ln1.forward(cat, p.ln1, n: nk, c: c)
        p.qkv(ln1.out.pointer, into: qkv.reserve(nk * 3 * c), n: nk)
        let table = positions.prepare(keys: k, c: c)
        Linear.forward(
            out: r.reserve(k * c), inp: table, weight: rWeight.data, bias: nil, n: k, inFeatures: c, outFeatures: c)
        if FlashRelativeAttention.applies(keys: k) {
            FlashRelativeAttention.forward(
                y: y.reserve(b * t * c), lse: lse.reserve(b * heads * t), qkv: qkv.pointer, r: r.pointer,
                u: u.data, v: v.data, b: b, t: t, mem: memoryUsed, c: c, heads: heads)
        } else {
            RelativeAttention.forward(
                y: y.reserve(b * t * c), att: probs.reserve(b * heads * t * k), qkv: qkv.pointer, r: r.pointer,
                u: u.data, v: v.data, b: b, t: t, mem: memoryUsed, c: c, heads: heads)
        }
        p.project(y.pointer, into: out, n: b * t)
    }

    /// The memory rows get no gradient: only the segment's rows of dL/d cat reach dx.
    public func backward(
        dout: UnsafePointer<Float>, x: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>, _ ctx: ForwardContext
    ) {
        let p = projections, c = p.c, t = ctx.seqLen, b = ctx.batch, m = memoryUsed, k = m + t, nk = b * k
        let dy = scratch.dy.reserve(b * t * c)
        p.projectBackward(dout: dout, y: y.pointer, dy: dy, n: b * t)
        let dqkv = scratch.dqkv.zeros(nk * 3 * c), dr = scratch.dr.zeros(k * c)
        if FlashRelativeAttention.applies(keys: k) {
            let work = scratch.relative.reserve(
                FlashRelativeAttention.scratchCount(b: b, t: t, mem: m, c: c, heads: heads))
            FlashRelativeAttention.backward(
                dqkv: dqkv, dr: dr, du: u.grad, dv: v.grad, dy: dy, y: y.pointer, lse: lse.pointer, qkv: qkv.pointer,
                r: r.pointer, u: u.data, v: v.data, b: b, t: t, mem: m, c: c, heads: heads, scratch: work)
        } else {
            let work = scratch.relative.reserve(
                RelativeAttention.scratchCount(b: b, t: t, mem: m, c: c, heads: heads))
            RelativeAttention.backward(
                dqkv: dqkv, dr: dr, du: u.grad, dv: v.grad, dy: dy, qkv: qkv.pointer, r: r.pointer, u: u.data,
                v: v.data, att: probs.pointer, b: b, t: t, mem: m, c: c, heads: heads, scratch: work)
        }
        Linear.backward(
            dinp: nil, dweight: rWeight.grad, dbias: nil, dout: dr, inp: positions.table.pointer, weight: rWeight.data,
            n: k, inFeatures: c, outFeatures: c)
        let dln = scratch.dln.reserve(nk * c)
        p.qkvBackward(dqkv: dqkv, ln: ln1.out.pointer, dln: dln, n: nk)
        let dcat = scratch.dcat.zeros(nk * c)
        ln1.backward(dinp: dcat, dout: dln, inp: cat.pointer, p.ln1, n: nk, c: c)
        for bi in 0..<b { Vec.add(dx + bi * t * c, dcat + (bi * k + m) * c, t * c) }  // the segment rows only
    }

    /// The cached keys are the memory and the segment so far: a query at key position past + i
    /// sees keys 0...past + i at distances past + i − j, as in `forward` with M = past.
    public func decode(
        x: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, batch: Int, t: Int, cache: KVCache, layer: Int
    ) {
        let p = projections, c = p.c, n = batch * t, past = cache.length, k = past + t, ld = 3 * c
        ln1.forward(x, p.ln1, n: n, c: c)
        p.qkv(ln1.out.pointer, into: qkv.reserve(n * 3 * c), n: n)
        cache.append(layer, qkv: qkv.pointer, t: t)
        let table =
            cache.relative[layer]
            ?? {
                // r for every distance the cache can hold (capacity − 1 … 0), once per cache.
                let s = Storage<Float>(), cap = cache.capacity
                let sinusoids = positions.prepare(keys: cap, c: c)
                Linear.forward(
                    out: s.reserve(cap * c), inp: sinusoids, weight: rWeight.data, bias: nil, n: cap, inFeatures: c,
                    outFeatures: c)
                cache.relative[layer] = s
                return s
            }()
        let r = table.pointer + (cache.capacity - k) * c  // distances k − 1 … 0
        let y = self.y.reserve(n * c), att = probs.reserve(heads * t * k)
        for bi in 0..<batch {
            RelativeAttention.forward(
                y: y + bi * t * c, att: att, qkv: cache.layer(layer) + bi * cache.capacity * ld, r: r, u: u.data,
                v: v.data, b: 1, t: t, mem: past, c: c, heads: heads)
        }
        p.project(y, into: out, n: n)
    }

    /// Projections, (Q+u)Kᵀ, (Q+v)rᵀ and PV over the average visible length M + (T+1)/2
    /// (`square`: M + T), and W_r over the K position rows shared by the batch's streams.
    public func flopsPerToken(seqLen: Int, batch: Int, accounting: AttentionFlops) -> Double {
        let c = Double(projections.c), t = Double(seqLen), m = Double(memory.train?.capacity ?? 0)
        let visible = accounting == .visible ? m + (t + 1) / 2 : m + t
        return projections.projectionFlops + 3 * 2 * visible * c + 2 * (m + t) * c * c / (Double(batch) * t)
    }

    public var bytes: Int { cat.bytes + ln1.bytes + qkv.bytes + r.bytes + probs.bytes + lse.bytes + y.bytes }
}
