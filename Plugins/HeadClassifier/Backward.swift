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
    func backward(_ context: Any, _ g: HeadBackward) throws(PluginFailure) {
        let s = context as! Saved, B = g.batch, T = g.seq, H = hidden, C = nClasses
        // No targets, or every target padded: the loss is the constant 0.
        guard s.count > 0, B > 0 else { return }
        let dz = try host.scratchFloats(B * C, "logit gradients")  // (B,C)
        crossEntropyBackward(
            probs: s.probs, targets: s.targets, rows: B, classes: C, scale: g.gradLoss / Float(s.count), into: dz)
        let params = g.frozen ? nil : (w1: w1Grad, b1: b1Grad, w2: w2Grad, b2: b2Grad)
        // grad_W2 (C,H) += dz^T (C,B) a (B,H);  grad_b2 += column sums of dz.
        if let gW2 = params?.w2 { host.matmul(C, H, B, dz, s.act, gW2, ta: true, beta: 1) }
        if let gb2 = params?.b2 { try host.addColumnSums(dz, rows: B, cols: C, into: gb2) }
        // du (B,H) = (dz (B,C) W2 (C,H)) ⊙ mask ⊙ act'(u).
        let du = try host.scratchFloats(B * H, "FC1 output gradients")
        host.matmul(B, H, C, dz, s.w2, du)
        if let mask = s.mask { for i in 0..<(B * H) { du[i] *= mask[i] } }
        activation.backward(s.pre, du, B * H)
        // grad_W1 (H,d) += du^T (H,B) p (B,d);  grad_b1 += column sums of du.
        if let gW1 = params?.w1 { host.matmul(H, d, B, du, s.pooled, gW1, ta: true, beta: 1) }
        if let gb1 = params?.b1 { try host.addColumnSums(du, rows: B, cols: H, into: gb1) }
        // dp (B,d) = du (B,H) W1 (H,d), then back through the pooling into grad_h.
        let dp = try host.scratchFloats(B * d, "pooled-vector gradients")
        host.matmul(B, d, H, du, s.w1, dp)
        host.parallelFor(B, grain: poolGrain(t: T, d: d)) { begin, end in
            pooling.backward(dp, lengths: s.lengths, argmax: s.argmax, t: T, d: d, into: g.gradH, begin..<end)
        }
    }
}
