// rvq backward: straight-through to x, plus the gradients of the per-level VQ losses.
import PluginKit
import VQMoEABI

extension RVQQuantizer {
    /// With g = grad_loss, M = N d (N: the global batch's tokens) and r_l = r_{l-1} - q_l (so q_l - r_{l-1} = -r_l):
    ///   grad_x_t += grad_quantized_t + g * commitment * 2/M * sum_l r_{l,t}
    ///     (straight-through: the surrogate quantized = x has Jacobian I; the residuals are
    ///      built from detached q_m, so d r_{l-1} / d x = I in every commitment term)
    ///   codebook_loss = residual:   grad e^l_{c_l(t)} += g * 2/M * (q_l - r_{l-1})_t = -g * 2/M * r_{l,t}
    ///   codebook_loss = cumulative: grad e^m_{c_m(t)} += -g * 2/M * sum_{l >= m} r_{l,t}
    ///     (level l's term mse(sg(x), q_1 + .. + q_l) = ||r_l||^2 / M reaches every q_m, m <= l)
    /// No codebook gradient when frozen, with ema (state), in the forward that ran the k-means
    /// init, or when the host bound no gradient buffer.
    func backward(_ context: Any, _ g: QuantizerBackward) throws(PluginFailure) {
        let s = context as! Saved, n = g.n, R = s.residuals  // (L,N,d)
        guard n > 0 else { return }
        let scale = 2 / Float(s.globalN * d) * g.gradLoss, commit = scale * commitment
        let acc = try host.scratchFloats(d, "residual sum")  // (d)
        for t in 0..<n {
            let gx = g.gradX + t * d
            if let gq = g.gradQuantized { let gt = gq + t * d; for i in 0..<d { gx[i] += gt[i] } }
            guard commit != 0 else { continue }
            acc.update(repeating: 0, count: d)
            for l in 0..<levels { let rl = (l * n + t) * d; for i in 0..<d { acc[i] += R[rl + i] } }
            for i in 0..<d { gx[i] += commit * acc[i] }
        }
        guard !g.frozen, !ema, !s.kmeansHere, let gC = codebookGrad, scale != 0 else { return }
        for t in 0..<n {
            acc.update(repeating: 0, count: d)  // cumulative: sum_{l >= m} r_l, built from the last level down
            for l in stride(from: levels - 1, through: 0, by: -1) {
                let rl = (l * n + t) * d, ge = gC + (l * k + Int(s.codes[l * n + t])) * d
                switch codebookLoss {
                case .residual: for i in 0..<d { ge[i] -= scale * R[rl + i] }
                case .cumulative: for i in 0..<d { acc[i] += R[rl + i]; ge[i] -= scale * acc[i] }
                }
            }
        }
    }
}
