// smoe backward: d(loss)/d(logits) from the routing weights and the balance loss, then
// through the linear map to x, W and b.
import PluginKit
import VQMoEABI

extension SMoERouter {
    /// grad_x (N,d) += dlogits (N,E) @ W (E,d);  grad_W (E,d) += dlogits^T @ x;
    /// grad_b (E) += column sums of dlogits (no parameter gradients when frozen).
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
        let n = ctx.n, d = ctx.d, e = ctx.e, k = ctx.k
        let gin = ginPtr.pointee
        var gradWeights: UnsafeMutablePointer<Float>? = nil  // (N,k), absent = zero
        if gin.grad_weights.data != nil { gradWeights = try requireF32(gin.grad_weights, [n, k], "grad_weights") }
        let gradX = try requireF32(goutPtr.pointee.grad_x, [n, d], "grad_x")
        guard gin.grad_aux_loss.isFinite else { throw .numeric("grad_aux_loss is \(gin.grad_aux_loss)") }

        var balanceCoef: UnsafeMutablePointer<Float>? = nil
        if gin.grad_aux_loss != 0 && config.balanceWeight != 0 && n > 0 {
            let c = try host.scratchFloats(e, "balance-loss coefficients")
            let scale = gin.grad_aux_loss * config.balanceWeight * Float(e) / Float(n)
            for j in 0..<e { c[j] = scale * ctx.fraction[j] }
            balanceCoef = c
        }
        guard gradWeights != nil || balanceCoef != nil else { return }  // nothing flows back

        let dlogits = try host.scratchFloats(n * e, "router logit gradients")  // (N,E)
        dlogits.update(repeating: 0, count: n * e)
        host.parallelFor(
            n, grain: max(1, 4096 / (e + 1)),
            LogitGradJob(
                dlogits: dlogits, gradWeights: gradWeights, gates: ctx.gates, index: ctx.index,
                probs: ctx.probs, balanceCoef: balanceCoef, e: e, k: k, fullSoftmaxGates: config.fullSoftmax),
            logitGrads)

        // grad_x (N,d) += dlogits (N,E) @ W (E,d)
        host.gemm(
            transA: false, transB: false, m: n, n: d, k: e, alpha: 1, a: dlogits, lda: e, b: ctx.w, ldb: d,
            beta: 1, c: gradX, ldc: d)
        guard !ctx.frozen else { return }
        // grad_W (E,d) += dlogits^T (E,N) @ x (N,d)
        if let gW = weightGrad {
            host.gemm(
                transA: true, transB: false, m: e, n: d, k: n, alpha: 1, a: dlogits, lda: e, b: ctx.x, ldb: d,
                beta: 1, c: gW, ldc: d)
        }
        // grad_b (E) += sum_t dlogits_t
        if let gb = biasGrad {
            for t in 0..<n { let row = dlogits + t * e; for j in 0..<e { gb[j] += row[j] } }
        }
    }
}
