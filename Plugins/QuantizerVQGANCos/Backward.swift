// vqgan_cos backward: straight-through in the code space, through both projections and the
// l2 normalisations, plus the gradients of the codebook + commitment loss.
import PluginKit
import VQMoEABI

/// d(v/max(‖v‖, eps))/dv applied to an upstream gradient g, for one row:
///   ‖v‖ >= eps: (g − v̂ (v̂·g)) / ‖v‖;   ‖v‖ < eps: g / eps.
/// Accumulated (+=) into `out`.
@inline(__always) func normalizeBackward(
    _ vHat: UnsafePointer<Float>, norm: Float, _ g: UnsafePointer<Float>,
    _ cols: Int, into out: UnsafeMutablePointer<Float>
) {
    if norm < normEpsilon {
        for i in 0..<cols { out[i] += g[i] / normEpsilon }
        return
    }
    var dot: Double = 0
    for i in 0..<cols { dot += Double(vHat[i]) * Double(g[i]) }
    let inv = 1 / Double(norm)
    for i in 0..<cols { out[i] += Float((Double(g[i]) - Double(vHat[i]) * dot) * inv) }
}

extension VQGANCosQuantizer {
    /// With g = grad_loss, M = N d_c, G = grad_quantized (N,d):
    ///   straight-through:  dL/dz_q = G W_out (N,d_c), and dL/dẑ = dL/dz_q (z_q = ẑ + sg(ê_c − ẑ));
    ///                      grad_W_out += Gᵀ z_q,  grad_b_out += Σ_t G_t
    ///   commitment:        dL/dẑ_t += g gamma 2/M (ẑ_t − ê_c)
    ///   codebook:          dL/dê_c += g 2/M (ê_c − ẑ_t), then through ê = e/‖e‖ to grad_e
    ///   normalisation:     dL/dz = (I − ẑẑᵀ)/‖z‖ dL/dẑ
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
        let n = ctx.n, d = ctx.d, dc = ctx.dc, k = ctx.k
        let gin = ginPtr.pointee
        var gradQ: UnsafeMutablePointer<Float>? = nil  // (N,d), absent = zero
        if gin.grad_quantized.data != nil { gradQ = try requireF32(gin.grad_quantized, [n, d], "grad_quantized") }
        let gradX = try requireF32(goutPtr.pointee.grad_x, [n, d], "grad_x")  // (N,d)
        guard gin.grad_loss.isFinite else { throw .numeric("grad_loss is \(gin.grad_loss)") }
        guard n > 0 else { return }
        let params = !ctx.frozen

        // dL/dẑ (N,d_c)
        let gzHat = try host.scratchFloats(n * dc, "grad of the normalised inputs")
        if let gq = gradQ {
            // dL/dz_q (N,d_c) = G (N,d) @ W_out (d,d_c)
            host.gemm(
                transA: false, transB: false, m: n, n: dc, k: d, alpha: 1, a: gq, lda: d, b: ctx.wOut, ldb: dc,
                beta: 0, c: gzHat, ldc: dc)
            if params {
                // grad_W_out (d,d_c) += Gᵀ (d,N) @ z_q (N,d_c)
                if let gW = wOutGrad {
                    host.gemm(
                        transA: true, transB: false, m: d, n: dc, k: n, alpha: 1, a: gq, lda: d, b: ctx.zq, ldb: dc,
                        beta: 1, c: gW, ldc: dc)
                }
                if let gb = bOutGrad { for t in 0..<n { let row = gq + t * d; for i in 0..<d { gb[i] += row[i] } } }
            }
        } else {
            gzHat.update(repeating: 0, count: n * dc)
        }

        let scale = 2 / Float(n * dc) * gin.grad_loss
        let commit = scale * config.commitment
        if commit != 0 {
            for t in 0..<n {
                let g = gzHat + t * dc, zt = ctx.zHat + t * dc, et = ctx.eHat + Int(ctx.codes[t]) * dc
                for i in 0..<dc { g[i] += commit * (zt[i] - et[i]) }
            }
        }
        if params, scale != 0, let gC = codebookGrad {
            // dL/dê (K,d_c), then through the normalisation of each used code.
            let geHat = try host.scratchFloats(k * dc, "grad of the normalised codes")
            geHat.update(repeating: 0, count: k * dc)
            for t in 0..<n {
                let g = geHat + Int(ctx.codes[t]) * dc, zt = ctx.zHat + t * dc, et = ctx.eHat + Int(ctx.codes[t]) * dc
                for i in 0..<dc { g[i] += scale * (et[i] - zt[i]) }
            }
            var used = [Bool](repeating: false, count: k)
            for t in 0..<n { used[Int(ctx.codes[t])] = true }
            for j in 0..<k where used[j] {
                normalizeBackward(ctx.eHat + j * dc, norm: ctx.eNorm[j], geHat + j * dc, dc, into: gC + j * dc)
            }
        }

        // dL/dz (N,d_c) through ẑ = z/‖z‖
        let gz = try host.scratchFloats(n * dc, "grad of the projected inputs")
        gz.update(repeating: 0, count: n * dc)
        for t in 0..<n {
            normalizeBackward(ctx.zHat + t * dc, norm: ctx.zNorm[t], gzHat + t * dc, dc, into: gz + t * dc)
        }

        // grad_x (N,d) += dL/dz (N,d_c) @ W_in (d_c,d)
        host.gemm(
            transA: false, transB: false, m: n, n: d, k: dc, alpha: 1, a: gz, lda: dc, b: ctx.wIn, ldb: d,
            beta: 1, c: gradX, ldc: d)
        guard params else { return }
        // grad_W_in (d_c,d) += dL/dzᵀ (d_c,N) @ x (N,d)
        if let gW = wInGrad {
            host.gemm(
                transA: true, transB: false, m: dc, n: d, k: n, alpha: 1, a: gz, lda: dc, b: ctx.x, ldb: d,
                beta: 1, c: gW, ldc: d)
        }
        if let gb = bInGrad { for t in 0..<n { let row = gz + t * dc; for i in 0..<dc { gb[i] += row[i] } } }
    }
}
