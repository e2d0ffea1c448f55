// vqgan_cos backward: straight-through in the code space, through both projections and the
// l2 normalisations, plus the gradients of the codebook + commitment loss.
import PluginKit
import VQMoEABI

/// d(v/max(‖v‖, eps))/dv applied to an upstream gradient g, for row `row` of v̂ (rows of `cols`):
///   ‖v‖ >= eps: (g − v̂ (v̂·g)) / ‖v‖;   ‖v‖ < eps: g / eps.
/// Accumulated (+=) into `out`.
@inline(__always) func normalizeBackward(
    _ vHat: [Float], row: Int, norm: Float, _ g: UnsafePointer<Float>, _ cols: Int,
    into out: UnsafeMutablePointer<Float>
) {
    if norm < normEpsilon {
        for i in 0..<cols { out[i] += g[i] / normEpsilon }
        return
    }
    let o = row * cols
    var dot: Double = 0
    for i in 0..<cols { dot += Double(vHat[o + i]) * Double(g[i]) }
    let inv = 1 / Double(norm)
    for i in 0..<cols { out[i] += Float((Double(g[i]) - Double(vHat[o + i]) * dot) * inv) }
}

extension VQGANCosQuantizer {
    /// With g = grad_loss, M = N d_c (N: the global batch's tokens), G = grad_quantized (N,d):
    ///   straight-through:  dL/dz_q = G W_out (N,d_c), and dL/dẑ = dL/dz_q (z_q = ẑ + sg(ê_c − ẑ));
    ///                      grad_W_out += Gᵀ z_q,  grad_b_out += Σ_t G_t
    ///   commitment:        dL/dẑ_t += g gamma 2/M (ẑ_t − ê_c)
    ///   codebook:          dL/dê_c += g 2/M (ê_c − ẑ_t), then through ê = e/‖e‖ to grad_e
    ///   normalisation:     dL/dz = (I − ẑẑᵀ)/‖z‖ dL/dẑ
    ///   proj_in:           grad_x += dL/dz W_in,  grad_W_in += dL/dzᵀ x,  grad_b_in += Σ_t dL/dz_t
    /// Parameter gradients are skipped for a FROZEN forward; the codebook gets none with ema (it is
    /// state) or in the forward that ran the k-means init (the parameter had no effect on it).
    func backward(_ context: Any, _ g: QuantizerBackward) throws(PluginFailure) {
        let s = context as! Saved, n = g.n, params = !g.frozen
        guard n > 0 else { return }
        let gzHat = try host.scratchFloats(n * dc, "grad of the normalised inputs")  // dL/dẑ (N,d_c)
        if let gq = g.gradQuantized {
            host.matmul(n, dc, d, gq, s.wOut, gzHat)  // dL/dz_q (N,d_c) = G (N,d) @ W_out (d,d_c)
            if params, let gW = wOutGrad {  // grad_W_out (d,d_c) += Gᵀ (d,N) @ z_q (N,d_c)
                host.matmul(d, dc, n, gq, s.zq, gW, ta: true, beta: 1)
            }
            if params, let gb = bOutGrad { for t in 0..<n { let row = gq + t * d; for i in 0..<d { gb[i] += row[i] } } }
        } else {
            gzHat.update(repeating: 0, count: n * dc)
        }
        let scale = 2 / Float(s.globalN * dc) * g.gradLoss, commit = scale * commitment
        if commit != 0 {
            for t in 0..<n {
                let gt = gzHat + t * dc, z = t * dc, e = Int(s.codes[t]) * dc
                for i in 0..<dc { gt[i] += commit * (s.zHat[z + i] - s.eHat[e + i]) }
            }
        }
        if params, scale != 0, !ema, !s.kmeansHere, let gC = codebookGrad {
            // dL/dê (K,d_c), then through the normalisation of each used code.
            let geHat = try host.scratchFloats(k * dc, "grad of the normalised codes")
            geHat.update(repeating: 0, count: k * dc)
            for t in 0..<n {
                let ge = geHat + Int(s.codes[t]) * dc, z = t * dc, e = Int(s.codes[t]) * dc
                for i in 0..<dc { ge[i] += scale * (s.eHat[e + i] - s.zHat[z + i]) }
            }
            var used = [Bool](repeating: false, count: k)
            for t in 0..<n { used[Int(s.codes[t])] = true }
            for j in 0..<k where used[j] {
                normalizeBackward(s.eHat, row: j, norm: s.eNorm[j], geHat + j * dc, dc, into: gC + j * dc)
            }
        }
        // dL/dz (N,d_c) through ẑ = z/‖z‖
        let gz = try host.scratchFloats(n * dc, "grad of the projected inputs")
        gz.update(repeating: 0, count: n * dc)
        for t in 0..<n { normalizeBackward(s.zHat, row: t, norm: s.zNorm[t], gzHat + t * dc, dc, into: gz + t * dc) }
        host.matmul(n, d, dc, gz, s.wIn, g.gradX, beta: 1)  // grad_x (N,d) += dL/dz (N,d_c) @ W_in (d_c,d)
        guard params else { return }
        if let gW = wInGrad { host.matmul(dc, d, n, gz, s.x, gW, ta: true, beta: 1) }  // grad_W_in += dL/dzᵀ x
        if let gb = bInGrad { for t in 0..<n { let row = gz + t * dc; for i in 0..<dc { gb[i] += row[i] } } }
    }
}
