// vqvae backward: straight-through to x, plus the gradients of the VQ loss.
import PluginKit
import VQMoEABI

extension VQVAEQuantizer {
    /// With g = grad_loss and M = N d:
    ///   grad_x_t += grad_quantized_t + g * commitment * 2/M * (x_t - q_t)
    ///     (straight-through: the surrogate quantized = x has Jacobian I)
    ///   grad_e_{c_t} += g * 2/M * (q_t - x_t)   (no ema, not frozen: d mse(sg(x), q) / dq)
    /// except after the forward that ran the k-means initialisation: that forward overwrote
    /// the codebook with centres computed from the batch, so the loss does not depend on the
    /// codebook parameter as it was and its gradient is 0 (at a converged Lloyd fixed point
    /// the gradient at the centres, sum_{t in j} (e_j - x_t), is 0 as well).
    func backward(
        _ ctxPtr: UnsafeMutableRawPointer?, _ ginPtr: UnsafePointer<vqmoe_quantizer_grad_in>?,
        _ goutPtr: UnsafePointer<vqmoe_quantizer_grad_out>?
    ) throws(PluginFailure) {
        guard let ctxPtr else {
            throw .state("backward got a NULL context (forward saves one only in train mode without NO_GRAD)")
        }
        guard let ginPtr, let goutPtr else { throw .invalid("backward: grad_in or grad_out is NULL") }
        try requireSize(ginPtr.pointee.struct_size, vqmoe_quantizer_grad_in.self, "quantizer grad_in")
        try requireSize(goutPtr.pointee.struct_size, vqmoe_quantizer_grad_out.self, "quantizer grad_out")
        let ctx = Unmanaged<QuantizerContext>.fromOpaque(ctxPtr).takeUnretainedValue()
        let n = ctx.n, d = ctx.d
        let gin = ginPtr.pointee
        var gradQ: UnsafeMutablePointer<Float>? = nil  // (N,d), absent = zero
        if gin.grad_quantized.data != nil { gradQ = try requireF32(gin.grad_quantized, [n, d], "grad_quantized") }
        let gradX = try requireF32(goutPtr.pointee.grad_x, [n, d], "grad_x")  // (N,d)
        guard gin.grad_loss.isFinite else { throw .numeric("grad_loss is \(gin.grad_loss)") }
        guard n > 0 else { return }

        let scale = 2 / Float(n * d) * gin.grad_loss
        let commit = scale * config.commitment
        for t in 0..<n {
            let gx = gradX + t * d, xt = ctx.x + t * d, qt = ctx.q + t * d
            if let gq = gradQ.map({ $0 + t * d }) {
                for i in 0..<d { gx[i] += gq[i] + commit * (xt[i] - qt[i]) }
            } else if commit != 0 {
                for i in 0..<d { gx[i] += commit * (xt[i] - qt[i]) }
            }
        }
        guard !config.ema, !ctx.frozen, !ctx.kmeansInitialized, let gC = codebookGrad, scale != 0 else { return }
        for t in 0..<n {
            let ge = gC + Int(ctx.codes[t]) * d, xt = ctx.x + t * d, qt = ctx.q + t * d
            for i in 0..<d { ge[i] += scale * (qt[i] - xt[i]) }
        }
    }
}
