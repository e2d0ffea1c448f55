// classifier backward: softmax cross-entropy -> FC2 -> dropout -> activation -> FC1 -> pooling.
import PluginKit
import VQMoEABI

extension ClassifierHead {
    /// With g = grad_loss / count:
    ///   dz_b = g (softmax(z_b) - onehot(y_b)) on non-pad rows, 0 on pad rows     (B,C)
    ///   grad_W2 += dz^T a;  grad_b2 += sum_b dz_b;  da = dz W2                     (B,H)
    ///   du = da ⊙ mask ⊙ act'(u);  grad_W1 += du^T p;  grad_b1 += sum_b du_b       (B,H)
    ///   dp = du W1 (B,d), routed to h by the pooling (padding positions get 0)
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
        let ctx = Unmanaged<ClassifierContext>.fromOpaque(ctxPtr).takeUnretainedValue()
        let B = ctx.b, T = ctx.t, d = ctx.d, H = ctx.hidden, C = ctx.c
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
        let params = ctx.frozen ? nil : (w1: fc1WeightGrad, b1: fc1BiasGrad, w2: fc2WeightGrad, b2: fc2BiasGrad)

        // grad_W2 (C,H) += dz^T (C,B) a (B,H);  grad_b2 += column sums of dz.
        if let gW2 = params?.w2 {
            host.gemm(
                transA: true, transB: false, m: C, n: H, k: B, alpha: 1, a: dz, lda: C, b: ctx.act, ldb: H,
                beta: 1, c: gW2, ldc: H)
        }
        if let gb2 = params?.b2 { try addColumnSums(dz, rows: B, cols: C, into: gb2) }

        // du (B,H) = (dz (B,C) W2 (C,H)) ⊙ mask ⊙ act'(u).
        let du = try host.scratchFloats(B * H, "FC1 output gradients")
        host.gemm(
            transA: false, transB: false, m: B, n: H, k: C, alpha: 1, a: dz, lda: C, b: ctx.w2, ldb: H,
            beta: 0, c: du, ldc: H)
        if let mask = ctx.mask { for i in 0..<(B * H) { du[i] *= mask[i] } }
        config.activation.backward(ctx.pre, du, B * H)

        // grad_W1 (H,d) += du^T (H,B) p (B,d);  grad_b1 += column sums of du.
        if let gW1 = params?.w1 {
            host.gemm(
                transA: true, transB: false, m: H, n: d, k: B, alpha: 1, a: du, lda: H, b: ctx.pooled, ldb: d,
                beta: 1, c: gW1, ldc: d)
        }
        if let gb1 = params?.b1 { try addColumnSums(du, rows: B, cols: H, into: gb1) }

        // dp (B,d) = du (B,H) W1 (H,d), then back through the pooling into grad_h.
        let dp = try host.scratchFloats(B * d, "pooled-vector gradients")
        host.gemm(
            transA: false, transB: false, m: B, n: d, k: H, alpha: 1, a: du, lda: H, b: ctx.w1, ldb: d,
            beta: 0, c: dp, ldc: d)
        host.parallelFor(
            B, grain: poolGrain(t: T, d: d),
            PoolJob(
                h: gradH, gradH: gradH, pooled: dp, lengths: ctx.lengths, argmax: ctx.argmax,
                pooling: config.pooling, t: T, d: d), unpoolRows)
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
