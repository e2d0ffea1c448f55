// smoe_dropout backward: d(loss)/d(logits) from the routing weights and the balance loss,
// then through the frozen linear map to x only (W is state: no parameter gradient).
import PluginKit
import VQMoEABI

extension SMoEDropoutRouter {
    /// grad_x (N,d) += dlogits (N,E) @ W (E,d). W is frozen state, so this is the only
    /// gradient (also without VQMOE_STEP_FROZEN).
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
        let n = ctx.n, d = ctx.d, e = ctx.e, k = ctx.k
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

        let dlogits = try host.scratchFloats(n * e, "router logit gradients")  // (N,E)
        dlogits.update(repeating: 0, count: n * e)
        host.parallelFor(
            n, grain: max(1, 4096 / (e + 1)),
            LogitGradJob(
                dlogits: dlogits, gradWeights: gradWeights, gates: ctx.gates, index: ctx.index,
                probs: ctx.probs, balanceCoef: balanceCoef, e: e, k: k), logitGrads)
        // grad_x (N,d) += dlogits (N,E) @ W (E,d)
        host.gemm(
            transA: false, transB: false, m: n, n: d, k: e, alpha: 1, a: dlogits, lda: e, b: ctx.w, ldb: d,
            beta: 1, c: gradX, ldc: d)
    }
}
