// lfq backward: straight-through in the bit space through both projections, plus the exact
// gradients of the entropy terms and the commitment term.
import PluginKit
import VQMoEABI

extension LFQQuantizer {
    /// With g = grad_loss, M = N b, G = grad_quantized (N,d):
    ///   straight-through:  dL/dz_q = G W_out (N,b), and dL/dz = dL/dz_q (z_q = z + sg(q − z));
    ///                      grad_W_out += Gᵀ z_q,  grad_b_out += Σ_t G_t
    ///   entropy terms:     dL/dz += g · d/dz [entropy_weight (mean_t H_t − gamma_div H(p̄))]
    ///                      (no stop-gradient: the exact derivative, see `entropyGrads`)
    ///   commitment:        dL/dz += g commitment 2/M (z − q) -- also the exact derivative of
    ///                      commitment mse(z, q): q is piecewise constant in z
    ///   proj_in:           grad_x += dL/dz W_in,  grad_W_in += dL/dzᵀ x,  grad_b_in += Σ_t dL/dz_t
    /// Parameter gradients are skipped for a FROZEN forward.
    func backward(
        _ ctxPtr: UnsafeMutableRawPointer?, _ ginPtr: UnsafePointer<vqmoe_quantizer_grad_in>?,
        _ goutPtr: UnsafePointer<vqmoe_quantizer_grad_out>?
    ) throws(PluginFailure) {
        guard let ctx = Handle.context(ctxPtr, as: QuantizerContext.self) else {
            throw .state("backward got a NULL context (forward saves one only in train mode without NO_GRAD)")
        }
        guard let ginPtr, let goutPtr else { throw .invalid("backward: grad_in or grad_out is NULL") }
        try requireSize(ginPtr.pointee.struct_size, vqmoe_quantizer_grad_in.self, "quantizer grad_in")
        try requireSize(goutPtr.pointee.struct_size, vqmoe_quantizer_grad_out.self, "quantizer grad_out")
        let n = ctx.n, d = ctx.d, b = ctx.b
        let gin = ginPtr.pointee
        var gradQ: UnsafeMutablePointer<Float>? = nil  // (N,d), absent = zero
        if gin.grad_quantized.data != nil { gradQ = try requireF32(gin.grad_quantized, [n, d], "grad_quantized") }
        let gradX = try requireF32(goutPtr.pointee.grad_x, [n, d], "grad_x")  // (N,d)
        guard gin.grad_loss.isFinite else { throw .numeric("grad_loss is \(gin.grad_loss)") }
        guard n > 0 else { return }
        let params = !ctx.frozen

        // dL/dz (N,b)
        let gz = try host.scratchFloats(n * b, "grad of the projected inputs")
        if let gq = gradQ {
            // dL/dz_q (N,b) = G (N,d) @ W_out (d,b)
            host.gemm(
                transA: false, transB: false, m: n, n: b, k: d, alpha: 1, a: gq, lda: d, b: ctx.wOut, ldb: b,
                beta: 0, c: gz, ldc: b)
            if params {
                // grad_W_out (d,b) += Gᵀ (d,N) @ z_q (N,b)
                if let gW = wOutGrad {
                    host.gemm(
                        transA: true, transB: false, m: d, n: b, k: n, alpha: 1, a: gq, lda: d, b: ctx.zq, ldb: b,
                        beta: 1, c: gW, ldc: b)
                }
                if let gb = bOutGrad { for t in 0..<n { let row = gq + t * d; for i in 0..<d { gb[i] += row[i] } } }
            }
        } else {
            gz.update(repeating: 0, count: n * b)
        }

        let g = Double(gin.grad_loss)
        if g != 0 && config.entropyWeight != 0 {
            let ge = try host.scratchDoubles(n * b, "entropy gradient")
            try entropyBackward(ctx.z, n: n, weights: ctx.weights, grad: ge)
            for i in 0..<(n * b) { gz[i] += Float(g * ge[i]) }
        }
        let commit = Float(g * config.commitment * 2 / Double(n * b))
        if commit != 0 {
            let s = config.scale
            for i in 0..<(n * b) { let z = ctx.z[i]; gz[i] += commit * (z - (z > 0 ? s : -s)) }
        }

        // grad_x (N,d) += dL/dz (N,b) @ W_in (b,d)
        host.gemm(
            transA: false, transB: false, m: n, n: d, k: b, alpha: 1, a: gz, lda: b, b: ctx.wIn, ldb: d,
            beta: 1, c: gradX, ldc: d)
        guard params else { return }
        // grad_W_in (b,d) += dL/dzᵀ (b,N) @ x (N,d)
        if let gW = wInGrad {
            host.gemm(
                transA: true, transB: false, m: b, n: d, k: n, alpha: 1, a: gz, lda: b, b: ctx.x, ldb: d,
                beta: 1, c: gW, ldc: d)
        }
        if let gb = bInGrad { for t in 0..<n { let row = gz + t * b; for i in 0..<b { gb[i] += row[i] } } }
    }
}
