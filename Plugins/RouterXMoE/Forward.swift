// xmoe forward: project, L2-normalise tokens and expert embeddings, cosine scores / tau,
// top-k, softmax over the kept scores, Switch balance loss.
import Glibc
import PluginKit
import VQMoEABI

/// Norms below this are clamped (as F.normalize's eps): u = h / max(||h||, eps).
let normEps: Float = 1e-4

/// What backward needs, copied at forward time (host buffers may change afterwards).
final class RouterContext {
    let n: Int, d: Int, e: Int, k: Int, dr: Int
    /// (N,d) the input x.
    let x: UnsafeMutablePointer<Float>
    /// (d_r,d) the projection W_p the scores were computed with.
    let proj: UnsafeMutablePointer<Float>
    /// (N,d_r) u_t = h_t / max(||h_t||, eps) and (N) ||h_t||.
    let unitH: UnsafeMutablePointer<Float>
    let normH: UnsafeMutablePointer<Float>
    /// (E,d_r) e^_e = e_e / max(||e_e||, eps) and (E) ||e_e||.
    let unitE: UnsafeMutablePointer<Float>
    let normE: UnsafeMutablePointer<Float>
    /// (N,E) the scores s_te = u_t . e^_e / tau (for d/d log tau).
    let scores: UnsafeMutablePointer<Float>
    /// (N,E) full softmax p_te over all scores (with a balance loss only).
    let probs: UnsafeMutablePointer<Float>?
    /// (N,k) kept experts, in descending-score order.
    let index: UnsafeMutablePointer<Int32>
    /// (N,k) routing weights g = softmax over the kept scores.
    let gates: UnsafeMutablePointer<Float>
    /// (E) f_e, the fraction of the N*k assignments that went to e (a constant for gradients).
    let fraction: UnsafeMutablePointer<Float>
    /// tau used by the forward.
    let tau: Float
    /// VQMOE_STEP_FROZEN: no parameter gradients.
    let frozen: Bool

    init(n: Int, d: Int, e: Int, k: Int, dr: Int, balance: Bool, tau: Float, frozen: Bool) {
        self.n = n; self.d = d; self.e = e; self.k = k; self.dr = dr; self.tau = tau; self.frozen = frozen
        x = .allocate(capacity: n * d)
        proj = .allocate(capacity: dr * d)
        unitH = .allocate(capacity: n * dr)
        normH = .allocate(capacity: n)
        unitE = .allocate(capacity: e * dr)
        normE = .allocate(capacity: e)
        scores = .allocate(capacity: n * e)
        probs = balance ? .allocate(capacity: n * e) : nil
        index = .allocate(capacity: n * k)
        gates = .allocate(capacity: n * k)
        fraction = .allocate(capacity: e)
    }

    deinit {
        x.deallocate(); proj.deallocate(); unitH.deallocate(); normH.deallocate()
        unitE.deallocate(); normE.deallocate(); scores.deallocate(); probs?.deallocate()
        index.deallocate(); gates.deallocate(); fraction.deallocate()
    }
}

/// Pointers for the row-normalisation loop.
struct NormalizeJob {
    var src: UnsafeMutablePointer<Float>  // (rows,cols)
    var unit: UnsafeMutablePointer<Float>  // (rows,cols) out
    var norms: UnsafeMutablePointer<Float>  // (rows) out: ||src_r||
    var cols: Int
}

/// For rows [begin, end): norm_r = ||src_r||, unit_r = src_r / max(norm_r, eps).
func normalizeRows(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: NormalizeJob.self).pointee
    let c = job.cols
    for r in Int(begin)..<Int(end) {
        let src = job.src + r * c, unit = job.unit + r * c
        var sq: Float = 0
        for i in 0..<c { sq += src[i] * src[i] }
        let norm = sq.squareRoot()
        job.norms[r] = norm
        let inv = 1 / (norm >= normEps ? norm : normEps)
        for i in 0..<c { unit[i] = src[i] * inv }
    }
}

extension XMoERouter {
    func shape(_ out: UnsafeMutablePointer<vqmoe_router_shape>?) throws(PluginFailure) {
        guard let out else { throw .invalid("shape: out is NULL") }
        out.pointee.mode = VQMOE_ROUTE_TOPK
        out.pointee.k = Int32(config.k)
        out.pointee.slots_per_expert = 0
    }

    /// h = x W_p^T                                              (N,d_r)
    /// s_te = (h_t / ||h_t||) . (e_e / ||e_e||) / tau            (N,E)
    /// expert_index = top-k of s, weights = softmax over the kept scores   (N,k)
    /// aux_loss = balance_weight * E * sum_e f_e * P_e, f_e = assignments to e / (N*k),
    ///            P_e = mean_t softmax(s_t)_e
    /// expert_load_e = assignments to e                         (E)
    func forward(
        _ stepPtr: UnsafePointer<vqmoe_step_info>?, _ inPtr: UnsafePointer<vqmoe_router_input>?,
        _ outPtr: UnsafeMutablePointer<vqmoe_router_output>?,
        _ ctxOut: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
    ) throws(PluginFailure) {
        ctxOut?.pointee = nil
        guard let stepPtr, let inPtr, let outPtr else { throw .invalid("forward: step, input or output is NULL") }
        try requireSize(inPtr.pointee.struct_size, vqmoe_router_input.self, "router input")
        try requireSize(outPtr.pointee.struct_size, vqmoe_router_output.self, "router output")
        let flags = stepPtr.pointee.flags
        let saveContext = flags & VQMOE_STEP_TRAIN != 0 && flags & VQMOE_STEP_NO_GRAD == 0
        let (P, emb) = try bound()
        let tau = try temperature()
        let d = dModel, e = nExperts, k = config.k, dr = routerDim
        let n = try rowsOf(inPtr.pointee.x, cols: d, "x")
        let x = try requireF32(inPtr.pointee.x, [n, d], "x")
        let index = try requireI32(outPtr.pointee.expert_index, [n, k], "expert_index")
        let gates = try requireF32(outPtr.pointee.weights, [n, k], "weights")
        let load = try requireF32(outPtr.pointee.expert_load, [e], "expert_load")

        let balance = config.balanceWeight != 0
        let ctx =
            saveContext
            ? RouterContext(
                n: n, d: d, e: e, k: k, dr: dr, balance: balance, tau: tau, frozen: flags & VQMOE_STEP_FROZEN != 0)
            : nil
        // Unit vectors, norms, scores and probabilities live in the context when one is saved.
        let unitH: UnsafeMutablePointer<Float>, normH: UnsafeMutablePointer<Float>
        let unitE: UnsafeMutablePointer<Float>, normE: UnsafeMutablePointer<Float>
        let scores: UnsafeMutablePointer<Float>
        var probs: UnsafeMutablePointer<Float>? = nil
        if let ctx {
            unitH = ctx.unitH; normH = ctx.normH; unitE = ctx.unitE; normE = ctx.normE
            scores = ctx.scores; probs = ctx.probs
        } else {
            unitH = try host.scratchFloats(n * dr, "unit token projections")
            normH = try host.scratchFloats(n, "token projection norms")
            unitE = try host.scratchFloats(e * dr, "unit expert embeddings")
            normE = try host.scratchFloats(e, "expert embedding norms")
            scores = try host.scratchFloats(n * e, "router scores")
            if balance { probs = try host.scratchFloats(n * e, "router probabilities") }
        }

        // h (N,d_r) = x (N,d) @ W_p^T (d,d_r); u = h / max(||h||, eps).
        let h = try host.scratchFloats(n * dr, "token projections")
        host.gemm(
            transA: false, transB: true, m: n, n: dr, k: d, alpha: 1, a: x, lda: d, b: P, ldb: d,
            beta: 0, c: h, ldc: dr)
        host.parallelFor(
            n, grain: max(1, 4096 / (dr + 1)), NormalizeJob(src: h, unit: unitH, norms: normH, cols: dr), normalizeRows)
        // e^ = e / max(||e||, eps) (E rows; serial: E is small).
        var ej = NormalizeJob(src: emb, unit: unitE, norms: normE, cols: dr)
        withUnsafeMutablePointer(to: &ej) { normalizeRows(UnsafeMutableRawPointer($0), 0, Int64(e)) }
        // s (N,E) = u (N,d_r) @ e^T (d_r,E) / tau.
        host.gemm(
            transA: false, transB: true, m: n, n: e, k: dr, alpha: 1 / tau, a: unitH, lda: dr, b: unitE, ldb: dr,
            beta: 0, c: scores, ldc: e)
        for i in 0..<(n * e) where !scores[i].isFinite {
            throw .numeric(
                "non-finite router score \(scores[i]) for token \(i / e), expert \(i % e) (non-finite x, weights or temperature?)"
            )
        }

        host.parallelFor(
            n, grain: max(1, 4096 / (e + 1)),
            RouteJob(logits: scores, probs: probs, index: index, gates: gates, e: e, k: k), routeTokens)

        // expert_load_e = #assignments; f_e = load_e / (N k); P_e = mean_t p_te.
        load.update(repeating: 0, count: e)
        for i in 0..<(n * k) { load[Int(index[i])] += 1 }
        var aux: Double = 0
        if let probs, n > 0 {
            var meanP = [Double](repeating: 0, count: e)
            for t in 0..<n { let p = probs + t * e; for j in 0..<e { meanP[j] += Double(p[j]) } }
            let assignments = Double(n * k)
            for j in 0..<e { aux += Double(load[j]) / assignments * (meanP[j] / Double(n)) }
            aux *= Double(config.balanceWeight) * Double(e)
        }
        outPtr.pointee.aux_loss = Float(aux)

        if let ctx {
            ctx.x.update(from: x, count: n * d)
            ctx.proj.update(from: P, count: dr * d)
            ctx.index.update(from: index, count: n * k)
            ctx.gates.update(from: gates, count: n * k)
            for j in 0..<e { ctx.fraction[j] = n > 0 ? load[j] / Float(n * k) : 0 }
            ctxOut?.pointee = Handle.context(ctx)
        }
    }
}
