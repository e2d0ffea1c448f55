// image_classifier backward: softmax cross-entropy -> linear -> LayerNorm -> pooling.
import PluginKit
import VQMoEABI

/// Backward for images [begin, end), with `normed` holding dy (B,d), overwritten by dp:
///   dxhat = dy ⊙ gamma
///   dp    = rstd (dxhat - mean_k dxhat - xhat mean_k(dxhat ⊙ xhat))
///   grad_h += dp at position 0 (cls), or dp/len_b at every t < len_b (mean)
func normalizeAndPoolBackward(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: NormJob.self).pointee
    let d = job.d, T = job.t
    let gradH = job.gradH!
    for b in Int(begin)..<Int(end) {
        let dy = job.normed + b * d, xh = UnsafePointer(job.xhat + b * d)
        var m1: Float = 0, m2: Float = 0
        for k in 0..<d { let g = dy[k] * job.gamma[k]; m1 += g; m2 += g * xh[k] }
        m1 /= Float(d); m2 /= Float(d)
        let rstd = job.rstd[b]
        for k in 0..<d { dy[k] = rstd * (dy[k] * job.gamma[k] - m1 - xh[k] * m2) }
        let gb = gradH + b * T * d
        switch job.pooling {
        case .cls:
            for k in 0..<d { gb[k] += dy[k] }
        case .mean:
            let len = Int(job.lengths[b]), inv = 1 / Float(len)
            for t in 0..<len { let row = gb + t * d; for k in 0..<d { row[k] += dy[k] * inv } }
        }
    }
}

extension ImageClassifierHead {
    /// With g = grad_loss / count:
    ///   dz_b = g (softmax(z_b) - onehot(y_b)) on non-pad rows, 0 on pad rows      (B,C)
    ///   grad_W += dz^T y;  grad_c += sum_b dz_b;  dy = dz W                         (B,d)
    ///   grad_gamma += sum_b dy_b ⊙ xhat_b;  grad_beta += sum_b dy_b
    ///   then through the LayerNorm and the pooling into grad_h (see normalizeAndPoolBackward).
    /// Parameter gradients are skipped when the forward was FROZEN.
    func backward(
        _ ctxPtr: UnsafeMutableRawPointer?, _ ginPtr: UnsafePointer<vqmoe_head_grad_in>?,
        _ goutPtr: UnsafePointer<vqmoe_head_grad_out>?
    ) throws(PluginFailure) {
        guard let ctxPtr else {
            throw .state("backward got a NULL context (forward saves one only in train mode without NO_GRAD)")
        }
        guard let ginPtr, let goutPtr else { throw .invalid("backward: grad_in or grad_out is NULL") }
        try requireSize(ginPtr.pointee.struct_size, vqmoe_head_grad_in.self, "head grad_in")
        try requireSize(goutPtr.pointee.struct_size, vqmoe_head_grad_out.self, "head grad_out")
        let ctx = Unmanaged<ImageClassifierContext>.fromOpaque(ctxPtr).takeUnretainedValue()
        let B = ctx.b, T = ctx.t, d = ctx.d, C = ctx.c
        let gradH = try requireF32(goutPtr.pointee.grad_h, [B, T, d], "grad_h")
        let gradLoss = ginPtr.pointee.grad_loss
        guard gradLoss.isFinite else { throw .numeric("grad_loss is \(gradLoss)") }
        // No targets, or every target padded: the loss is the constant 0.
        guard ctx.count > 0, B > 0 else { return }

        // dz (B,C).
        let dz = try host.scratchFloats(B * C, "logit gradients")
        let g = gradLoss / Float(ctx.count)
        for i in 0..<B {
            let row = dz + i * C, y = Int(ctx.targets[i])
            guard y >= 0 else { row.update(repeating: 0, count: C); continue }
            let p = ctx.probs + i * C
            for j in 0..<C { row[j] = g * p[j] }
            row[y] -= g
        }
        // dy (B,d) = dz (B,C) W (C,d).
        let dy = try host.scratchFloats(B * d, "LayerNorm output gradients")
        host.gemm(
            transA: false, transB: false, m: B, n: d, k: C, alpha: 1, a: dz, lda: C, b: ctx.w, ldb: d,
            beta: 0, c: dy, ldc: d)

        if !ctx.frozen {
            // grad_W (C,d) += dz^T (C,B) y (B,d);  grad_c += column sums of dz.
            if let gW = headWeightGrad {
                host.gemm(
                    transA: true, transB: false, m: C, n: d, k: B, alpha: 1, a: dz, lda: C, b: ctx.normed, ldb: d,
                    beta: 1, c: gW, ldc: d)
            }
            if let gc = headBiasGrad { try addColumnSums(dz, rows: B, cols: C, into: gc) }
            // grad_gamma += sum_b dy ⊙ xhat;  grad_beta += sum_b dy (double, rows in order).
            if normWeightGrad != nil || normBiasGrad != nil {
                let acc = try host.scratchDoubles(2 * d, "LayerNorm parameter gradients")
                acc.update(repeating: 0, count: 2 * d)
                for i in 0..<B {
                    let r = dy + i * d, x = ctx.xhat + i * d
                    for k in 0..<d { acc[k] += Double(r[k]) * Double(x[k]); acc[d + k] += Double(r[k]) }
                }
                if let gg = normWeightGrad { for k in 0..<d { gg[k] += Float(acc[k]) } }
                if let gb = normBiasGrad { for k in 0..<d { gb[k] += Float(acc[d + k]) } }
            }
        }

        host.parallelFor(
            B, grain: max(1, 16_384 / (T * d)),
            NormJob(
                h: gradH, gradH: gradH, lengths: ctx.lengths, xhat: ctx.xhat, rstd: ctx.rstd, normed: dy,
                gamma: ctx.gamma, beta: nil, pooling: config.pooling, t: T, d: d),
            normalizeAndPoolBackward)
    }

    /// out[j] += sum_i m[i, j], summed in double in row order (the same for any thread count).
    func addColumnSums(
        _ m: UnsafePointer<Float>, rows: Int, cols: Int, into out: UnsafeMutablePointer<Float>
    ) throws(PluginFailure) {
        let acc = try host.scratchDoubles(cols, "column sums")
        acc.update(repeating: 0, count: cols)
        for i in 0..<rows { let row = m + i * cols; for j in 0..<cols { acc[j] += Double(row[j]) } }
        for j in 0..<cols { out[j] += Float(acc[j]) }
    }
}
