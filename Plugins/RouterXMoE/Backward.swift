// xmoe backward: d(loss)/d(scores) from the routing weights and the balance loss, then
// through the temperature, the two L2 normalisations and the projection to x, W_p, the
// expert embeddings and log tau.
import PluginKit
import VQMoEABI

/// Pointers for the backward of a row normalisation, in place.
struct NormalizeGradJob {
    var grad: UnsafeMutablePointer<Float>  // (rows,cols): d/d unit in, d/d src out
    var unit: UnsafeMutablePointer<Float>  // (rows,cols) unit_r
    var norms: UnsafeMutablePointer<Float>  // (rows) ||src_r||
    var cols: Int
}

/// For rows [begin, end), the backward of unit = src / max(||src||, eps):
///   ||src|| >= eps:  d src = (d unit - unit (unit . d unit)) / ||src||
///   ||src|| <  eps:  d src = d unit / eps   (the clamped norm is a constant)
func normalizeGrads(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: NormalizeGradJob.self).pointee
    let c = job.cols
    for r in Int(begin)..<Int(end) {
        let g = job.grad + r * c, u = job.unit + r * c
        let norm = job.norms[r]
        if norm >= normEps {
            var dot: Float = 0
            for i in 0..<c { dot += u[i] * g[i] }
            let inv = 1 / norm
            for i in 0..<c { g[i] = (g[i] - u[i] * dot) * inv }
        } else {
            let inv = 1 / normEps
            for i in 0..<c { g[i] *= inv }
        }
    }
}

extension XMoERouter {
    /// With ds = dL/ds (N,E) and dc = ds / tau:
    ///   d log tau  += -sum_te ds_te s_te                       (ds/d log tau = -s)
    ///   du (N,d_r)  = dc @ e^,   de^ (E,d_r) = dc^T @ u
    ///   dh, de      = backward of the L2 normalisations
    ///   grad_x (N,d) += dh @ W_p,   grad_W_p (d_r,d) += dh^T @ x,   grad_e += de
    /// (no parameter gradients with VQMOE_STEP_FROZEN; log tau only when learnable).
    func backward(
        _ ctxPtr: UnsafeMutableRawPointer?, _ ginPtr: UnsafePointer<vqmoe_router_grad_in>?,
        _ goutPtr: UnsafePointer<vqmoe_router_grad_out>?
    ) throws(PluginFailure) {
        guard let ctx = Handle.context(ctxPtr, as: RouterContext.self) else {
            throw .state("backward got a NULL context (forward saves one only in train mode without NO_GRAD)")
        }
        guard let ginPtr, let goutPtr else { throw .invalid("backward: grad_in or grad_out is NULL") }
        try requireSize(ginPtr.pointee.struct_size, vqmoe_router_grad_in.self, "router grad_in")
        try requireSize(goutPtr.pointee.struct_size, vqmoe_router_grad_out.self, "router grad_out")
        let n = ctx.n, d = ctx.d, e = ctx.e, k = ctx.k, dr = ctx.dr
        let gin = ginPtr.pointee
        var gradWeights: UnsafeMutablePointer<Float>? = nil  // (N,k), absent = zero
        if gin.grad_weights.data != nil { gradWeights = try requireF32(gin.grad_weights, [n, k], "grad_weights") }
        let gradX = try requireF32(goutPtr.pointee.grad_x, [n, d], "grad_x")
        guard gin.grad_aux_loss.isFinite else { throw .numeric("grad_aux_loss is \(gin.grad_aux_loss)") }

        var balanceCoef: UnsafeMutablePointer<Float>? = nil
        if gin.grad_aux_loss != 0 && ctx.probs != nil && n > 0 {
            let c = try host.scratchFloats(e, "balance-loss coefficients")
            let scale = gin.grad_aux_loss * config.balanceWeight * Float(e) / Float(n)
            for j in 0..<e { c[j] = scale * ctx.fraction[j] }
            balanceCoef = c
        }
        // k = 1 without a balance loss: the weights are the constant 1, nothing flows back.
        guard (gradWeights != nil && k > 1) || balanceCoef != nil else { return }

        let ds = try host.scratchFloats(n * e, "router score gradients")  // (N,E)
        ds.update(repeating: 0, count: n * e)
        host.parallelFor(
            n, grain: max(1, 4096 / (e + 1)),
            LogitGradJob(
                dlogits: ds, gradWeights: gradWeights, gates: ctx.gates, index: ctx.index,
                probs: ctx.probs, balanceCoef: balanceCoef, e: e, k: k), logitGrads)
        let params = !ctx.frozen
        // d log tau = sum_te ds_te * ds_te/d log tau = -sum_te ds_te s_te.
        if params, config.learnableTemperature, let gT = logTemperatureGrad {
            var acc: Double = 0
            for i in 0..<(n * e) { acc -= Double(ds[i]) * Double(ctx.scores[i]) }
            gT[0] += Float(acc)
        }
        // du (N,d_r) = ds (N,E) @ e^ (E,d_r) / tau
        let du = try host.scratchFloats(n * dr, "unit projection gradients")
        host.gemm(
            transA: false, transB: false, m: n, n: dr, k: e, alpha: 1 / ctx.tau, a: ds, lda: e, b: ctx.unitE, ldb: dr,
            beta: 0, c: du, ldc: dr)
        // dh = backward of u = h / ||h|| (in place in du).
        host.parallelFor(
            n, grain: max(1, 4096 / (dr + 1)),
            NormalizeGradJob(grad: du, unit: ctx.unitH, norms: ctx.normH, cols: dr), normalizeGrads)
        // grad_x (N,d) += dh (N,d_r) @ W_p (d_r,d)
        host.gemm(
            transA: false, transB: false, m: n, n: d, k: dr, alpha: 1, a: du, lda: dr, b: ctx.proj, ldb: d,
            beta: 1, c: gradX, ldc: d)
        guard params else { return }
        // grad_W_p (d_r,d) += dh^T (d_r,N) @ x (N,d)
        if let gP = projGrad {
            host.gemm(
                transA: true, transB: false, m: dr, n: d, k: n, alpha: 1, a: du, lda: dr, b: ctx.x, ldb: d,
                beta: 1, c: gP, ldc: d)
        }
        // de^ (E,d_r) = ds^T (E,N) @ u (N,d_r) / tau; de = backward of e^ = e / ||e||.
        if let gE = embeddingsGrad {
            let de = try host.scratchFloats(e * dr, "unit embedding gradients")
            host.gemm(
                transA: true, transB: false, m: e, n: dr, k: n, alpha: 1 / ctx.tau, a: ds, lda: e, b: ctx.unitH,
                ldb: dr,
                beta: 0, c: de, ldc: dr)
            var job = NormalizeGradJob(grad: de, unit: ctx.unitE, norms: ctx.normE, cols: dr)
            withUnsafeMutablePointer(to: &job) { normalizeGrads(UnsafeMutableRawPointer($0), 0, Int64(e)) }
            for i in 0..<(e * dr) { gE[i] += de[i] }
        }
    }
}
