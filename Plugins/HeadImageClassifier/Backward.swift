// image_classifier backward: softmax cross-entropy -> linear -> LayerNorm -> pooling.
import PluginKit
import VQMoEABI

extension ImageClassifierHead {
    /// With g = grad_loss / count:
    ///   dz_b = g (softmax(z_b) - onehot(y_b)) on non-pad rows, 0 on pad rows      (B,C)
    ///   grad_W += dz^T y;  grad_c += sum_b dz_b;  dy = dz W                         (B,d)
    ///   grad_gamma += sum_b dy_b ⊙ xhat_b;  grad_beta += sum_b dy_b
    ///   then through the LayerNorm and the pooling into grad_h (see normalizeAndPoolBackward).
    /// Parameter gradients are skipped when the forward was FROZEN.
    func backward(_ context: Any, _ g: HeadBackward) throws(PluginFailure) {
        let s = context as! Saved, B = g.batch, T = g.seq, C = nClasses
        // No targets, or every target padded: the loss is the constant 0.
        guard s.count > 0, B > 0 else { return }
        let dz = try host.scratchFloats(B * C, "logit gradients")  // (B,C)
        crossEntropyBackward(
            probs: s.probs, targets: s.targets, rows: B, classes: C, scale: g.gradLoss / Float(s.count), into: dz)
        let dy = try host.scratchFloats(B * d, "LayerNorm output gradients")
        host.matmul(B, d, C, dz, s.w, dy)  // dy (B,d) = dz (B,C) W (C,d)
        if !g.frozen {
            // grad_W (C,d) += dz^T (C,B) y (B,d);  grad_c += column sums of dz.
            if let gW = wGrad { host.matmul(C, d, B, dz, s.normed, gW, ta: true, beta: 1) }
            if let gc = cGrad { try host.addColumnSums(dz, rows: B, cols: C, into: gc) }
            // grad_gamma += sum_b dy ⊙ xhat;  grad_beta += sum_b dy (double, rows in order).
            if gammaGrad != nil || betaGrad != nil {
                let acc = try host.scratchDoubles(2 * d, "LayerNorm parameter gradients")
                acc.update(repeating: 0, count: 2 * d)
                for i in 0..<B {
                    let r = dy + i * d, x = i * d
                    for k in 0..<d { acc[k] += Double(r[k]) * Double(s.xhat[x + k]); acc[d + k] += Double(r[k]) }
                }
                if let gg = gammaGrad { for k in 0..<d { gg[k] += Float(acc[k]) } }
                if let gb = betaGrad { for k in 0..<d { gb[k] += Float(acc[d + k]) } }
            }
        }
        host.parallelFor(B, grain: max(1, 16_384 / (T * d))) { begin, end in
            normalizeAndPoolBackward(s, dy: dy, t: T, into: g.gradH, begin..<end)
        }
    }

    /// Backward for images `range`, with `dy` (B,d) overwritten by dp:
    ///   dxhat = dy ⊙ gamma
    ///   dp    = rstd (dxhat - mean_k dxhat - xhat mean_k(dxhat ⊙ xhat))
    ///   grad_h += dp at position 0 (cls), or dp/len_b at every t < len_b (mean)
    func normalizeAndPoolBackward(
        _ s: Saved, dy: UnsafeMutablePointer<Float>, t T: Int, into gradH: UnsafeMutablePointer<Float>,
        _ range: Range<Int>
    ) {
        for b in range {
            let db = dy + b * d, o = b * d
            var m1: Float = 0, m2: Float = 0
            for k in 0..<d { let g = db[k] * s.gamma[k]; m1 += g; m2 += g * s.xhat[o + k] }
            m1 /= Float(d); m2 /= Float(d)
            let rstd = s.rstd[b]
            for k in 0..<d { db[k] = rstd * (db[k] * s.gamma[k] - m1 - s.xhat[o + k] * m2) }
            let gb = gradH + b * T * d
            switch pooling {
            case .cls:
                for k in 0..<d { gb[k] += db[k] }
            case .mean:
                let len = Int(s.lengths[b]), inv = 1 / Float(len)
                for t in 0..<len { let row = gb + t * d; for k in 0..<d { row[k] += db[k] * inv } }
            }
        }
    }
}
