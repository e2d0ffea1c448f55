// stablemoe backward: d(loss)/d(scores) from the sigmoid gate and the stage-1 balance loss,
// through the normalised centroids to x and e; the stage-1 distillation cross-entropy to the
// distilled embeddings and centroids (the assignment is a stop-gradient target).
import PluginKit
import VQMoEABI

/// Pointers for the per-token dscores loop.
struct ScoreGradJob {
    var dscores: UnsafeMutablePointer<Float>  // (N,E), zeroed
    var gradWeights: UnsafeMutablePointer<Float>?  // (N,1), nil = zero
    var gate: UnsafeMutablePointer<Float>  // (N)
    var index: UnsafeMutablePointer<Int32>  // (N)
    var probs: UnsafeMutablePointer<Float>?  // (N,E), stage 1
    var balanceCoef: UnsafeMutablePointer<Float>?  // (E) c_e, nil = no balance gradient
    var e: Int
}

/// For tokens [begin, end):
///   gate:     ds_{t,a_t} += dg_t * g_t (1 - g_t)
///   balance:  with c_e = d aux / d p_te = grad_aux * balance_weight * E * f_e / N,
///             ds_{t,j} += p_tj (c_j - sum_e p_te c_e)
func scoreGrads(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: ScoreGradJob.self).pointee
    let e = job.e
    for t in Int(begin)..<Int(end) {
        let ds = job.dscores + t * e
        if let gw = job.gradWeights {
            let g = job.gate[t]
            ds[Int(job.index[t])] += gw[t] * g * (1 - g)
        }
        if let c = job.balanceCoef, let probs = job.probs {
            let p = probs + t * e
            var dot: Float = 0
            for j in 0..<e { dot += p[j] * c[j] }
            for j in 0..<e { ds[j] += p[j] * (c[j] - dot) }
        }
    }
}

extension StableMoERouter {
    /// grad_x (N,d) += ds (N,E) @ ê (E,d);  dê = ds^T x (E,d),
    /// grad_e_e += (dê_e - ê_e (ê_e · dê_e)) / r_e;
    /// stage 1 with distill: dz_t = grad_aux * distill_weight / N * (q_t - onehot(a_t)),
    /// grad_C += dz^T emb[id] (E,D), grad_emb[id_t] += dz_t C (scatter-add).
    /// No parameter gradients when frozen; none ever for the distilled router in stage 2.
    func backward(
        _ ctxPtr: UnsafeMutableRawPointer?, _ ginPtr: UnsafePointer<vqmoe_router_grad_in>?,
        _ goutPtr: UnsafePointer<vqmoe_router_grad_out>?
    ) throws(PluginFailure) {
        guard let ctxPtr else {
            throw .state("backward got a NULL context (forward saves one only in train mode without NO_GRAD)")
        }
        guard let ginPtr, let goutPtr else { throw .invalid("backward: grad_in or grad_out is NULL") }
        try requireSize(ginPtr.pointee.struct_size, vqmoe_router_grad_in.self, "router grad_in")
        try requireSize(goutPtr.pointee.struct_size, vqmoe_router_grad_out.self, "router grad_out")
        let ctx = Unmanaged<RouterContext>.fromOpaque(ctxPtr).takeUnretainedValue()
        let n = ctx.n, d = ctx.d, e = ctx.e, dd = ctx.distillDim
        let gin = ginPtr.pointee
        var gradWeights: UnsafeMutablePointer<Float>? = nil  // (N,1), absent = zero
        if gin.grad_weights.data != nil { gradWeights = try requireF32(gin.grad_weights, [n, 1], "grad_weights") }
        let gradX = try requireF32(goutPtr.pointee.grad_x, [n, d], "grad_x")
        guard gin.grad_aux_loss.isFinite else { throw .numeric("grad_aux_loss is \(gin.grad_aux_loss)") }
        guard n > 0 else { return }

        var balanceCoef: UnsafeMutablePointer<Float>? = nil
        if ctx.stage == 1 && gin.grad_aux_loss != 0 && config.balanceWeight != 0, let f = ctx.fraction {
            let c = try host.scratchFloats(e, "balance-loss coefficients")
            let scale = gin.grad_aux_loss * config.balanceWeight * Float(e) / Float(n)
            for j in 0..<e { c[j] = scale * f[j] }
            balanceCoef = c
        }
        if gradWeights != nil || balanceCoef != nil {
            let ds = try host.scratchFloats(n * e, "routing score gradients")  // (N,E)
            ds.update(repeating: 0, count: n * e)
            host.parallelFor(
                n, grain: max(1, 4096 / (e + 1)),
                ScoreGradJob(
                    dscores: ds, gradWeights: gradWeights, gate: ctx.gate, index: ctx.index,
                    probs: ctx.probs, balanceCoef: balanceCoef, e: e), scoreGrads)
            // grad_x (N,d) += ds (N,E) @ ê (E,d)
            host.gemm(
                transA: false, transB: false, m: n, n: d, k: e, alpha: 1, a: ds, lda: e, b: ctx.eHat, ldb: d,
                beta: 1, c: gradX, ldc: d)
            if !ctx.frozen, let gE = expertEmbeddingsGrad {
                // dê (E,d) = ds^T (E,N) @ x (N,d), then back through ê = e / r.
                let dHat = try host.scratchFloats(e * d, "normalised embedding gradients")
                host.gemm(
                    transA: true, transB: false, m: e, n: d, k: n, alpha: 1, a: ds, lda: e, b: ctx.x, ldb: d,
                    beta: 0, c: dHat, ldc: d)
                for j in 0..<e {
                    let h = ctx.eHat + j * d, g = dHat + j * d, out = gE + j * d
                    var dot: Float = 0
                    for i in 0..<d { dot += h[i] * g[i] }
                    let inv = 1 / ctx.eNorm[j]
                    for i in 0..<d { out[i] += (g[i] - h[i] * dot) * inv }
                }
            }
        }

        // Distillation: only stage 1 saved the distilled rows (stage 2: the router is frozen).
        guard !ctx.frozen, gin.grad_aux_loss != 0, config.distillWeight != 0,
            let q = ctx.q, let rows = ctx.rows, let cen = ctx.centroids, let ids = ctx.ids
        else { return }
        let dz = try host.scratchFloats(n * e, "distilled logit gradients")  // (N,E)
        let scale = gin.grad_aux_loss * config.distillWeight / Float(n)
        for t in 0..<n {
            let row = dz + t * e, qt = q + t * e
            for j in 0..<e { row[j] = scale * qt[j] }
            row[Int(ctx.index[t])] -= scale
        }
        // grad_C (E,D) += dz^T (E,N) @ rows (N,D)
        if let gC = distilledCentroidsGrad {
            host.gemm(
                transA: true, transB: false, m: e, n: dd, k: n, alpha: 1, a: dz, lda: e, b: rows, ldb: dd,
                beta: 1, c: gC, ldc: dd)
        }
        // grad_emb[id_t] += (dz (N,E) @ C (E,D))_t
        if let gEmb = distilledEmbeddingGrad {
            let gRows = try host.scratchFloats(n * dd, "distilled embedding row gradients")
            host.gemm(
                transA: false, transB: false, m: n, n: dd, k: e, alpha: 1, a: dz, lda: e, b: cen, ldb: dd,
                beta: 0, c: gRows, ldc: dd)
            for t in 0..<n {
                let src = gRows + t * dd, dst = gEmb + Int(ids[t]) * dd
                for i in 0..<dd { dst[i] += src[i] }
            }
        }
    }
}
