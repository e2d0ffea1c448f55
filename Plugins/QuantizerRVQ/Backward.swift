// rvq backward: straight-through to x, plus the gradients of the per-level VQ losses.
import PluginKit
import VQMoEABI

extension RVQQuantizer {
    /// With g = grad_loss, M = N d and r_l = r_{l-1} - q_l (so q_l - r_{l-1} = -r_l):
    ///   grad_x_t += grad_quantized_t + g * commitment * 2/M * sum_l r_{l,t}
    ///     (straight-through: the surrogate quantized = x has Jacobian I; the residuals are
    ///      built from detached q_m, so d r_{l-1} / d x = I in every commitment term)
    ///   codebook_loss = residual:   grad e^l_{c_l(t)} += g * 2/M * (q_l - r_{l-1})_t = -g * 2/M * r_{l,t}
    ///   codebook_loss = cumulative: grad e^m_{c_m(t)} += -g * 2/M * sum_{l >= m} r_{l,t}
    ///     (level l's term mse(sg(x), q_1 + .. + q_l) = ||r_l||^2 / M reaches every q_m, m <= l)
    /// No codebook gradient when frozen or when the host bound no gradient buffer.
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
        let ctx = Unmanaged<RVQContext>.fromOpaque(ctxPtr).takeUnretainedValue()
        let n = ctx.n, d = ctx.d, levels = ctx.levels, k = nCodes
        let gin = ginPtr.pointee
        var gradQ: UnsafeMutablePointer<Float>? = nil  // (N,d), absent = zero
        if gin.grad_quantized.data != nil { gradQ = try requireF32(gin.grad_quantized, [n, d], "grad_quantized") }
        let gradX = try requireF32(goutPtr.pointee.grad_x, [n, d], "grad_x")  // (N,d)
        guard gin.grad_loss.isFinite else { throw .numeric("grad_loss is \(gin.grad_loss)") }
        guard n > 0 else { return }

        let scale = 2 / Float(n * d) * gin.grad_loss
        let commit = scale * config.commitment
        let R = ctx.residuals  // (L,N,d)
        let acc = try host.scratchFloats(d, "residual sum")  // (d)
        for t in 0..<n {
            let gx = gradX + t * d
            if let gq = gradQ { let g = gq + t * d; for i in 0..<d { gx[i] += g[i] } }
            guard commit != 0 else { continue }
            acc.update(repeating: 0, count: d)
            for l in 0..<levels { let rl = R + (l * n + t) * d; for i in 0..<d { acc[i] += rl[i] } }
            for i in 0..<d { gx[i] += commit * acc[i] }
        }
        guard !ctx.frozen, let gC = codebookGrad, scale != 0 else { return }
        for t in 0..<n {
            acc.update(repeating: 0, count: d)  // cumulative: sum_{l >= m} r_l, built from the last level down
            for l in stride(from: levels - 1, through: 0, by: -1) {
                let rl = R + (l * n + t) * d
                let ge = gC + (l * k + Int(ctx.codes[l * n + t])) * d
                switch config.codebookLoss {
                case .residual:
                    for i in 0..<d { ge[i] -= scale * rl[i] }
                case .cumulative:
                    for i in 0..<d { acc[i] += rl[i]; ge[i] -= scale * acc[i] }
                }
            }
        }
    }
}
