// softmoe forward: logits of every token for every slot, dispatch = softmax over the tokens of
// a group (per slot), combine = softmax over the slots (per token).
import Glibc
import PluginKit
import VQMoEABI

/// What backward needs, copied at forward time (host buffers may change afterwards).
final class RouterContext {
    let n: Int, d: Int, es: Int, groups: Int, groupSize: Int
    let normalize: Bool
    /// VQMOE_STEP_FROZEN: no parameter gradients.
    let frozen: Bool
    /// The scale the logits were computed with (1 without normalize).
    let scale: Float
    /// (N,d) x̂_t = x_t / r_t (normalize) or x; (N) r_t = sqrt(||x_t||^2 + 1e-12).
    let xHat: UnsafeMutablePointer<Float>
    let xNorm: UnsafeMutablePointer<Float>
    /// (d,E*S) Φ̂ (columns normalised) or Φ; (E*S) column norms ρ_j.
    let phiHat: UnsafeMutablePointer<Float>
    let phiNorm: UnsafeMutablePointer<Float>
    /// (N,E*S) P = x̂ Φ̂ (the logits before the scale: L = scale * P).
    let cosine: UnsafeMutablePointer<Float>
    /// (N,E*S) dispatch D and combine C.
    let dispatch: UnsafeMutablePointer<Float>
    let combine: UnsafeMutablePointer<Float>

    init(n: Int, d: Int, es: Int, groups: Int, groupSize: Int, normalize: Bool, frozen: Bool, scale: Float) {
        self.n = n; self.d = d; self.es = es; self.groups = groups; self.groupSize = groupSize
        self.normalize = normalize; self.frozen = frozen; self.scale = scale
        xHat = .allocate(capacity: n * d)
        xNorm = .allocate(capacity: n)
        phiHat = .allocate(capacity: d * es)
        phiNorm = .allocate(capacity: es)
        cosine = .allocate(capacity: n * es)
        dispatch = .allocate(capacity: n * es)
        combine = .allocate(capacity: n * es)
    }

    deinit {
        xHat.deallocate(); xNorm.deallocate(); phiHat.deallocate(); phiNorm.deallocate()
        cosine.deallocate(); dispatch.deallocate(); combine.deallocate()
    }
}

/// Pointers for the per-group dispatch softmax (run on the host's pool).
struct DispatchJob {
    var logits: UnsafeMutablePointer<Float>  // (N,ES)
    var dispatch: UnsafeMutablePointer<Float>  // (N,ES)
    var colMax: UnsafeMutablePointer<Float>  // (G,ES) work
    var colSum: UnsafeMutablePointer<Float>  // (G,ES) work
    var groupSize: Int
    var es: Int
}

/// For groups [begin, end): D[t,j] = exp(L[t,j] - m_j) / sum_{t' in g} exp(L[t',j] - m_j),
/// m_j = max_{t in g} L[t,j] (a softmax down each column, within the group).
func dispatchSoftmax(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: DispatchJob.self).pointee
    let es = job.es, tg = job.groupSize
    for g in Int(begin)..<Int(end) {
        let m = job.colMax + g * es, sum = job.colSum + g * es
        m.update(repeating: -Float.infinity, count: es)
        sum.update(repeating: 0, count: es)
        for t in (g * tg)..<((g + 1) * tg) {
            let row = job.logits + t * es
            for j in 0..<es where row[j] > m[j] { m[j] = row[j] }
        }
        for t in (g * tg)..<((g + 1) * tg) {
            let row = job.logits + t * es, out = job.dispatch + t * es
            for j in 0..<es { let v = expf(row[j] - m[j]); out[j] = v; sum[j] += v }
        }
        for j in 0..<es { sum[j] = 1 / sum[j] }
        for t in (g * tg)..<((g + 1) * tg) {
            let out = job.dispatch + t * es
            for j in 0..<es { out[j] *= sum[j] }
        }
    }
}

/// Pointers for the per-token combine softmax.
struct CombineJob {
    var logits: UnsafeMutablePointer<Float>  // (N,ES)
    var combine: UnsafeMutablePointer<Float>  // (N,ES)
    var es: Int
}

/// For tokens [begin, end): C[t,:] = softmax(L[t,:]) over the E*S slots.
func combineSoftmax(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: CombineJob.self).pointee
    let es = job.es
    for t in Int(begin)..<Int(end) {
        let row = job.logits + t * es, out = job.combine + t * es
        var m = row[0]
        for j in 1..<es where row[j] > m { m = row[j] }
        var sum: Float = 0
        for j in 0..<es { let v = expf(row[j] - m); out[j] = v; sum += v }
        let inv = 1 / sum
        for j in 0..<es { out[j] *= inv }
    }
}

/// v̂_i = v_i / r_i, r_i = sqrt(||v_i||^2 + 1e-12), for `count` rows of `width`.
func normalizeRows(
    _ v: UnsafePointer<Float>, count: Int, width: Int,
    _ out: UnsafeMutablePointer<Float>, _ norms: UnsafeMutablePointer<Float>
) {
    for i in 0..<count {
        let row = v + i * width, o = out + i * width
        var ss: Double = 0
        for j in 0..<width { ss += Double(row[j]) * Double(row[j]) }
        let r = (ss + 1e-12).squareRoot()
        norms[i] = Float(r)
        for j in 0..<width { o[j] = Float(Double(row[j]) / r) }
    }
}

/// Φ̂[:,j] = Φ[:,j] / ρ_j, ρ_j = sqrt(||Φ[:,j]||^2 + 1e-12), for the columns of a (rows, cols) matrix.
func normalizeColumns(
    _ v: UnsafePointer<Float>, rows: Int, cols: Int,
    _ out: UnsafeMutablePointer<Float>, _ norms: UnsafeMutablePointer<Float>
) {
    var ss = [Double](repeating: 0, count: cols)
    for i in 0..<rows { let row = v + i * cols; for j in 0..<cols { ss[j] += Double(row[j]) * Double(row[j]) } }
    for j in 0..<cols { norms[j] = Float((ss[j] + 1e-12).squareRoot()) }
    for i in 0..<rows {
        let row = v + i * cols, o = out + i * cols
        for j in 0..<cols { o[j] = Float(Double(row[j]) / (ss[j] + 1e-12).squareRoot()) }
    }
}

extension SoftMoERouter {
    /// The context's array when a context is saved, else host scratch of `count` floats.
    func saved(
        _ p: UnsafeMutablePointer<Float>?, _ count: Int, _ what: String
    ) throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        if let p { return p }
        return try host.scratchFloats(count, what)
    }

    /// normalize: L = scale * (x̂ Φ̂), x̂_t = x_t/||x_t||, Φ̂_j = Φ_j/||Φ_j||  (N,E*S); else L = x Φ
    /// dispatch D[t,j] = softmax over the tokens t of t's group of L[·,j]    (N,E*S)
    /// combine  C[t,j] = softmax over the slots j of L[t,·]                  (N,E*S)
    /// expert_load_e = sum_t sum_s C[t, e*S+s]: the combine mass each expert contributes to
    /// the tokens' outputs (sums to N, like top-k token counts; the dispatch mass would be the
    /// same n_groups for every expert), aux_loss = 0.
    func forward(
        _ stepPtr: UnsafePointer<vqmoe_step_info>?, _ inPtr: UnsafePointer<vqmoe_router_input>?,
        _ outPtr: UnsafeMutablePointer<vqmoe_router_output>?,
        _ ctxOut: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
    ) throws(PluginFailure) {
        ctxOut?.pointee = nil
        guard let stepPtr, let inPtr, let outPtr else { throw .invalid("forward: step, input or output is NULL") }
        try requireSize(stepPtr.pointee.struct_size, vqmoe_step_info.self, "step info")
        try requireSize(inPtr.pointee.struct_size, vqmoe_router_input.self, "router input")
        try requireSize(outPtr.pointee.struct_size, vqmoe_router_output.self, "router output")
        let flags = stepPtr.pointee.flags
        let saveContext = flags & VQMOE_STEP_TRAIN != 0 && flags & VQMOE_STEP_NO_GRAD == 0
        let phi0 = try boundPhi()
        let d = dModel, e = nExperts, es = nSlots, slots = config.slotsPerExpert
        let n = try rowsOf(inPtr.pointee.x, cols: d, "x")
        let x = try requireF32(inPtr.pointee.x, [n, d], "x")
        let groups = Int(inPtr.pointee.n_groups), groupSize = Int(inPtr.pointee.group_size)
        guard groups >= 0, groupSize >= 0, groups * groupSize == n, n == 0 || groups >= 1 else {
            throw .shape(
                "n_groups = \(groups) times group_size = \(groupSize) must equal the \(n) tokens of x (dispatch normalises within a group)"
            )
        }
        let dispatch = try requireF32(outPtr.pointee.dispatch, [n, es], "dispatch")
        let combine = try requireF32(outPtr.pointee.combine, [n, es], "combine")
        let load = try requireF32(outPtr.pointee.expert_load, [e], "expert_load")
        let s: Float = config.normalize ? (scale?.pointee ?? 1) : 1
        guard s.isFinite else { throw .numeric("the logit scale is \(s)") }

        let ctx =
            saveContext
            ? RouterContext(
                n: n, d: d, es: es, groups: groups, groupSize: groupSize, normalize: config.normalize,
                frozen: flags & VQMOE_STEP_FROZEN != 0, scale: s) : nil
        let logits = try host.scratchFloats(n * es, "slot logits")  // (N,ES)
        if config.normalize {
            let xHat = try saved(ctx?.xHat, n * d, "normalised x")
            let xNorm = try saved(ctx?.xNorm, n, "token norms")
            let phiHat = try saved(ctx?.phiHat, d * es, "normalised phi")
            let phiNorm = try saved(ctx?.phiNorm, es, "slot norms")
            normalizeRows(x, count: n, width: d, xHat, xNorm)
            normalizeColumns(phi0, rows: d, cols: es, phiHat, phiNorm)
            // P (N,ES) = x̂ (N,d) @ Φ̂ (d,ES);  L = scale * P
            let cosine = try saved(ctx?.cosine, n * es, "cosine logits")
            host.gemm(
                transA: false, transB: false, m: n, n: es, k: d, alpha: 1, a: xHat, lda: d, b: phiHat, ldb: es,
                beta: 0, c: cosine, ldc: es)
            for i in 0..<(n * es) { logits[i] = s * cosine[i] }
        } else {
            // L (N,ES) = x (N,d) @ Φ (d,ES)
            host.gemm(
                transA: false, transB: false, m: n, n: es, k: d, alpha: 1, a: x, lda: d, b: phi0, ldb: es,
                beta: 0, c: logits, ldc: es)
            if let ctx {
                ctx.xHat.update(from: x, count: n * d)
                ctx.phiHat.update(from: phi0, count: d * es)
                ctx.cosine.update(from: logits, count: n * es)
            }
        }
        for i in 0..<(n * es) where !logits[i].isFinite {
            throw .numeric(
                "non-finite slot logit \(logits[i]) for token \(i / es), slot \(i % es) (non-finite x or phi?)")
        }

        let work = try host.scratchFloats(2 * groups * es, "dispatch column statistics")
        host.parallelFor(
            groups, grain: max(1, 4096 / max(1, groupSize * es)),
            DispatchJob(
                logits: logits, dispatch: dispatch, colMax: work, colSum: work + groups * es,
                groupSize: groupSize, es: es), dispatchSoftmax)
        host.parallelFor(
            n, grain: max(1, 4096 / (es + 1)), CombineJob(logits: logits, combine: combine, es: es), combineSoftmax)

        // expert_load_e = combine mass of e's slots over the tokens.
        load.update(repeating: 0, count: e)
        for t in 0..<n {
            let row = combine + t * es
            for j in 0..<es { load[j / slots] += row[j] }
        }
        outPtr.pointee.aux_loss = 0

        if let ctx {
            ctx.dispatch.update(from: dispatch, count: n * es)
            ctx.combine.update(from: combine, count: n * es)
            ctxOut?.pointee = Unmanaged.passRetained(ctx).toOpaque()
        }
    }
}
