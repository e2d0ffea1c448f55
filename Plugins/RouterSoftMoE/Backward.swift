// softmoe backward: through the column softmax (dispatch) and the row softmax (combine) to
// the logits, then through the scale and both normalisations to x, Phi and the scale.
import PluginKit
import VQMoEABI

/// Pointers for the per-group dispatch-softmax backward.
struct DispatchGradJob {
    var dlogits: UnsafeMutablePointer<Float>  // (N,ES), accumulated
    var dispatch: UnsafeMutablePointer<Float>  // (N,ES)
    var gradDispatch: UnsafeMutablePointer<Float>  // (N,ES)
    var dots: UnsafeMutablePointer<Float>  // (G,ES) work
    var groupSize: Int
    var es: Int
}

/// For groups [begin, end): dL[t,j] += D[t,j] (gD[t,j] - sum_{t' in g} D[t',j] gD[t',j]).
func dispatchGrads(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: DispatchGradJob.self).pointee
    let es = job.es, tg = job.groupSize
    for g in Int(begin)..<Int(end) {
        let dot = job.dots + g * es
        dot.update(repeating: 0, count: es)
        for t in (g * tg)..<((g + 1) * tg) {
            let dr = job.dispatch + t * es, gr = job.gradDispatch + t * es
            for j in 0..<es { dot[j] += dr[j] * gr[j] }
        }
        for t in (g * tg)..<((g + 1) * tg) {
            let dr = job.dispatch + t * es, gr = job.gradDispatch + t * es, out = job.dlogits + t * es
            for j in 0..<es { out[j] += dr[j] * (gr[j] - dot[j]) }
        }
    }
}

/// Pointers for the per-token combine-softmax backward.
struct CombineGradJob {
    var dlogits: UnsafeMutablePointer<Float>  // (N,ES), accumulated
    var combine: UnsafeMutablePointer<Float>  // (N,ES)
    var gradCombine: UnsafeMutablePointer<Float>  // (N,ES)
    var es: Int
}

/// For tokens [begin, end): dL[t,j] += C[t,j] (gC[t,j] - sum_j' C[t,j'] gC[t,j']).
func combineGrads(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: CombineGradJob.self).pointee
    let es = job.es
    for t in Int(begin)..<Int(end) {
        let c = job.combine + t * es, g = job.gradCombine + t * es, out = job.dlogits + t * es
        var dot: Float = 0
        for j in 0..<es { dot += c[j] * g[j] }
        for j in 0..<es { out[j] += c[j] * (g[j] - dot) }
    }
}

extension SoftMoERouter {
    /// normalize: dx̂ = scale dL Φ̂^T, grad_x_t += (dx̂_t - x̂_t (x̂_t·dx̂_t)) / r_t;
    ///            dΦ̂ = scale x̂^T dL, grad_Φ_j += (dΦ̂_j - Φ̂_j (Φ̂_j·dΦ̂_j)) / ρ_j;
    ///            grad_scale += sum dL ⊙ (x̂ Φ̂)
    /// plain:     grad_x += dL Φ^T, grad_Φ += x^T dL
    /// (no parameter gradients when frozen). aux_loss is 0, so grad_aux_loss is unused.
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
        let n = ctx.n, d = ctx.d, es = ctx.es
        let gin = ginPtr.pointee
        // absent = zero
        var gradDispatch: UnsafeMutablePointer<Float>? = nil, gradCombine: UnsafeMutablePointer<Float>? = nil
        if gin.grad_dispatch.data != nil { gradDispatch = try requireF32(gin.grad_dispatch, [n, es], "grad_dispatch") }
        if gin.grad_combine.data != nil { gradCombine = try requireF32(gin.grad_combine, [n, es], "grad_combine") }
        let gradX = try requireF32(goutPtr.pointee.grad_x, [n, d], "grad_x")
        guard n > 0, gradDispatch != nil || gradCombine != nil else { return }  // nothing flows back

        let dl = try host.scratchFloats(n * es, "slot logit gradients")  // (N,ES)
        dl.update(repeating: 0, count: n * es)
        if let gradDispatch {
            let dots = try host.scratchFloats(ctx.groups * es, "dispatch gradient column sums")
            host.parallelFor(
                ctx.groups, grain: max(1, 4096 / max(1, ctx.groupSize * es)),
                DispatchGradJob(
                    dlogits: dl, dispatch: ctx.dispatch, gradDispatch: gradDispatch, dots: dots,
                    groupSize: ctx.groupSize, es: es), dispatchGrads)
        }
        if let gradCombine {
            host.parallelFor(
                n, grain: max(1, 4096 / (es + 1)),
                CombineGradJob(dlogits: dl, combine: ctx.combine, gradCombine: gradCombine, es: es), combineGrads)
        }

        guard ctx.normalize else {
            // grad_x (N,d) += dL (N,ES) @ Φ^T (ES,d);  grad_Φ (d,ES) += x^T (d,N) @ dL (N,ES)
            host.gemm(
                transA: false, transB: true, m: n, n: d, k: es, alpha: 1, a: dl, lda: es, b: ctx.phiHat, ldb: es,
                beta: 1, c: gradX, ldc: d)
            if !ctx.frozen, let gPhi = phiGrad {
                host.gemm(
                    transA: true, transB: false, m: d, n: es, k: n, alpha: 1, a: ctx.xHat, lda: d, b: dl, ldb: es,
                    beta: 1, c: gPhi, ldc: es)
            }
            return
        }
        // dx̂ (N,d) = scale * dL (N,ES) @ Φ̂^T (ES,d), then back through x̂ = x / r.
        let dxHat = try host.scratchFloats(n * d, "normalised x gradients")
        host.gemm(
            transA: false, transB: true, m: n, n: d, k: es, alpha: ctx.scale, a: dl, lda: es, b: ctx.phiHat, ldb: es,
            beta: 0, c: dxHat, ldc: d)
        for t in 0..<n {
            let h = ctx.xHat + t * d, g = dxHat + t * d, out = gradX + t * d
            var dot: Float = 0
            for i in 0..<d { dot += h[i] * g[i] }
            let inv = 1 / ctx.xNorm[t]
            for i in 0..<d { out[i] += (g[i] - h[i] * dot) * inv }
        }
        guard !ctx.frozen else { return }
        if let gPhi = phiGrad {
            // dΦ̂ (d,ES) = scale * x̂^T (d,N) @ dL (N,ES), then back through Φ̂_j = Φ_j / ρ_j.
            let dPhiHat = try host.scratchFloats(d * es, "normalised phi gradients")
            host.gemm(
                transA: true, transB: false, m: d, n: es, k: n, alpha: ctx.scale, a: ctx.xHat, lda: d, b: dl, ldb: es,
                beta: 0, c: dPhiHat, ldc: es)
            var dots = [Float](repeating: 0, count: es)
            for i in 0..<d {
                let h = ctx.phiHat + i * es, g = dPhiHat + i * es
                for j in 0..<es { dots[j] += h[j] * g[j] }
            }
            for i in 0..<d {
                let h = ctx.phiHat + i * es, g = dPhiHat + i * es, out = gPhi + i * es
                for j in 0..<es { out[j] += (g[j] - h[j] * dots[j]) / ctx.phiNorm[j] }
            }
        }
        if let gScale = scaleGrad {
            var sum: Double = 0
            for i in 0..<(n * es) { sum += Double(dl[i]) * Double(ctx.cosine[i]) }
            gScale.pointee += Float(sum)
        }
    }
}
