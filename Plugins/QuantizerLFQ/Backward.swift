// lfq backward: straight-through in the bit space through both projections, plus the exact
// gradients of the entropy terms and the commitment term.
import PluginKit
import VQMoEABI

extension LFQQuantizer {
    /// With g = grad_loss, M = N b (N: the global batch's tokens), G = grad_quantized (N,d):
    ///   straight-through:  dL/dz_q = G W_out (N,b), and dL/dz = dL/dz_q (z_q = z + sg(q − z));
    ///                      grad_W_out += Gᵀ z_q,  grad_b_out += Σ_t G_t
    ///   entropy terms:     dL/dz += g · d/dz [entropy_weight (mean_t H_t − gamma_div H(p̄))]
    ///                      (no stop-gradient: the exact derivative, see `entropyGrads`)
    ///   commitment:        dL/dz += g commitment 2/M (z − q) -- also the exact derivative of
    ///                      commitment mse(z, q): q is piecewise constant in z
    ///   proj_in:           grad_x += dL/dz W_in,  grad_W_in += dL/dzᵀ x,  grad_b_in += Σ_t dL/dz_t
    /// Parameter gradients are skipped for a FROZEN forward.
    func backward(_ context: Any, _ g: QuantizerBackward) throws(PluginFailure) {
        let s = context as! Saved, n = g.n, b = nBits, params = !g.frozen
        guard n > 0 else { return }
        let gz = try host.scratchFloats(n * b, "grad of the projected inputs")  // dL/dz (N,b)
        if let gq = g.gradQuantized {
            // dL/dz_q (N,b) = G (N,d) @ W_out (d,b)
            host.matmul(n, b, d, gq, s.wOut, gz)
            if params, let gW = wOutGrad {  // grad_W_out (d,b) += Gᵀ (d,N) @ z_q (N,b)
                host.matmul(d, b, n, gq, s.zq, gW, ta: true, beta: 1)
            }
            if params, let gb = bOutGrad { for t in 0..<n { for i in 0..<d { gb[i] += gq[t * d + i] } } }
        } else {
            gz.update(repeating: 0, count: n * b)
        }
        let gl = Double(g.gradLoss)
        if gl != 0 && entropyWeight != 0 {
            let ge = try host.scratchDoubles(n * b, "entropy gradient")
            try s.weights.withUnsafeBufferPointer { w throws(PluginFailure) in
                try entropyBackward(s.z, n: n, globalN: s.globalN, weights: w.baseAddress!, grad: ge)
            }
            for i in 0..<(n * b) { gz[i] += Float(gl * ge[i]) }
        }
        let commit = Float(gl * commitment * 2 / Double(s.globalN * b))
        if commit != 0 { for i in 0..<(n * b) { gz[i] += commit * (s.z[i] - (s.z[i] > 0 ? scale : -scale)) } }
        // grad_x (N,d) += dL/dz (N,b) @ W_in (b,d)
        host.matmul(n, d, b, gz, s.wIn, g.gradX, beta: 1)
        guard params else { return }
        if let gW = wInGrad {  // grad_W_in (b,d) += dL/dzᵀ (b,N) @ x (N,d)
            host.matmul(b, d, n, gz, s.x, gW, ta: true, beta: 1)
        }
        if let gb = bInGrad { for t in 0..<n { for i in 0..<b { gb[i] += gz[t * b + i] } } }
    }
}
