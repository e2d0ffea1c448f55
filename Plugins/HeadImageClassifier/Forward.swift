// image_classifier forward: pool (class token or mean) -> LayerNorm -> linear -> softmax
// cross-entropy.
import Glibc
import PluginKit
import VQMoEABI

/// What backward needs, copied at forward time (host buffers may change afterwards).
final class ImageClassifierContext {
    let b: Int, t: Int, d: Int, c: Int
    /// Non-pad targets (the loss is their mean); 0 = nothing flows back.
    let count: Int
    /// VQMOE_STEP_FROZEN: no parameter gradients.
    let frozen: Bool
    let lengths: UnsafeMutablePointer<Int32>  // (B) positions mean pooling averages
    let xhat: UnsafeMutablePointer<Float>  // (B,d) (p - mu) * rstd
    let rstd: UnsafeMutablePointer<Float>  // (B) 1 / sqrt(var + eps)
    let normed: UnsafeMutablePointer<Float>  // (B,d) y = xhat ⊙ gamma + beta
    let probs: UnsafeMutablePointer<Float>  // (B,C) softmax(z)
    let targets: UnsafeMutablePointer<Int32>  // (B)
    let gamma: UnsafeMutablePointer<Float>  // (d)
    let w: UnsafeMutablePointer<Float>  // (C,d)

    init(b: Int, t: Int, d: Int, c: Int, count: Int, frozen: Bool) {
        self.b = b; self.t = t; self.d = d; self.c = c; self.count = count; self.frozen = frozen
        lengths = .allocate(capacity: max(b, 1))
        xhat = .allocate(capacity: max(b * d, 1))
        rstd = .allocate(capacity: max(b, 1))
        normed = .allocate(capacity: max(b * d, 1))
        probs = .allocate(capacity: max(b * c, 1))
        targets = .allocate(capacity: max(b, 1))
        gamma = .allocate(capacity: d)
        w = .allocate(capacity: c * d)
    }

    deinit {
        lengths.deallocate(); xhat.deallocate(); rstd.deallocate(); normed.deallocate()
        probs.deallocate(); targets.deallocate(); gamma.deallocate(); w.deallocate()
    }
}

/// Pointers for the per-image pool + LayerNorm loops (run on the host's pool).
struct NormJob {
    var h: UnsafePointer<Float>  // (B,T,d) forward input
    var gradH: UnsafeMutablePointer<Float>?  // (B,T,d) backward output, accumulated
    var lengths: UnsafePointer<Int32>  // (B) in [1, T]
    var xhat: UnsafeMutablePointer<Float>  // (B,d)
    var rstd: UnsafeMutablePointer<Float>  // (B)
    var normed: UnsafeMutablePointer<Float>  // (B,d) forward: y; backward: dL/dy
    var gamma: UnsafePointer<Float>  // (d)
    var beta: UnsafePointer<Float>?  // (d) forward only
    var pooling: Pooling
    var t: Int
    var d: Int
}

/// Forward for images [begin, end):
///   p = h_b0 (cls) or (1/len_b) sum_{t < len_b} h_bt (mean)
///   mu = mean_k p_k, var = mean_k (p_k - mu)^2 (in double), rstd = 1/sqrt(var + eps)
///   xhat = (p - mu) rstd, y = xhat ⊙ gamma + beta
func poolAndNormalize(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: NormJob.self).pointee
    let d = job.d, T = job.t
    for b in Int(begin)..<Int(end) {
        let hb = job.h + b * T * d, x = job.xhat + b * d, y = job.normed + b * d
        // Pool into x.
        x.update(from: hb, count: d)
        if job.pooling == .mean {
            let len = Int(job.lengths[b])
            for t in 1..<max(len, 1) { let row = hb + t * d; for k in 0..<d { x[k] += row[k] } }
            let inv = 1 / Float(len)
            for k in 0..<d { x[k] *= inv }
        }
        var mean = 0.0
        for k in 0..<d { mean += Double(x[k]) }
        mean /= Double(d)
        var variance = 0.0
        for k in 0..<d { let c = Double(x[k]) - mean; variance += c * c }
        variance /= Double(d)
        let rstd = Float(1 / (variance + Double(layerNormEps)).squareRoot())
        job.rstd[b] = rstd
        let mu = Float(mean)
        for k in 0..<d {
            let xh = (x[k] - mu) * rstd
            x[k] = xh
            y[k] = xh * job.gamma[k] + job.beta![k]
        }
    }
}

extension ImageClassifierHead {
    func shape(_ out: UnsafeMutablePointer<vqmoe_head_shape>?) throws(PluginFailure) {
        guard let out else { throw .invalid("shape: out is NULL") }
        out.pointee.per_token = 0
        out.pointee.n_out = Int64(nClasses)
        out.pointee.is_lm = 0
    }

    /// y = LayerNorm(pool(h)) (B,d); logits z = y W^T + c (B,C); with targets the mean
    /// cross-entropy over non-pad rows, loss_sum, count and correct.
    func forward(
        _ stepPtr: UnsafePointer<vqmoe_step_info>?, _ inPtr: UnsafePointer<vqmoe_head_input>?,
        _ outPtr: UnsafeMutablePointer<vqmoe_head_output>?,
        _ ctxOut: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
    ) throws(PluginFailure) {
        ctxOut?.pointee = nil
        guard let stepPtr, let inPtr, let outPtr else { throw .invalid("forward: step, input or output is NULL") }
        try requireSize(stepPtr.pointee.struct_size, vqmoe_step_info.self, "step info")
        try requireSize(inPtr.pointee.struct_size, vqmoe_head_input.self, "head input")
        try requireSize(outPtr.pointee.struct_size, vqmoe_head_output.self, "head output")
        let params = try bound()
        let d = dModel, C = nClasses
        let input = inPtr.pointee
        guard input.h.ndim == 3, let hs = input.h.shape, hs[0] >= 0, hs[1] >= 1, hs[2] == Int64(d) else {
            throw .shape("h must be (B, T, \(d)) with T >= 1, got \(shapeText(input.h))")
        }
        let B = Int(hs[0]), T = Int(hs[1])
        let h = try requireF32(input.h, [B, T, d], "h")
        let logits = try requireF32(outPtr.pointee.logits, [B, C], "logits")
        let targets: UnsafeMutablePointer<Int32>? =
            input.targets.data == nil ? nil : try requireI32(input.targets, [B], "targets")
        let given: UnsafeMutablePointer<Int32>? =
            input.lengths.data == nil ? nil : try requireI32(input.lengths, [B], "lengths")
        if let given {
            for i in 0..<B where given[i] < 1 || Int(given[i]) > T {
                throw .invalid("lengths[\(i)] = \(given[i]) is outside [1, \(T)] (T = the sequence length of h)")
            }
        }

        let flags = stepPtr.pointee.flags
        let saves = flags & VQMOE_STEP_TRAIN != 0 && flags & VQMOE_STEP_NO_GRAD == 0
        var count = 0
        if let targets { for i in 0..<B where targets[i] != Int32(VQMOE_PAD_TARGET) { count += 1 } }
        let ctx =
            saves
            ? ImageClassifierContext(b: B, t: T, d: d, c: C, count: count, frozen: flags & VQMOE_STEP_FROZEN != 0) : nil

        let lengths = try host.orScratch(ctx?.lengths, B, "lengths")
        if let given { lengths.update(from: given, count: B) } else { lengths.update(repeating: Int32(T), count: B) }
        let xhat = try host.orScratch(ctx?.xhat, B * d, "normalised vectors")
        let rstd = try host.orScratch(ctx?.rstd, B, "inverse standard deviations")
        let normed = try host.orScratch(ctx?.normed, B * d, "LayerNorm outputs")
        host.parallelFor(
            B, grain: max(1, 16_384 / (T * d)),
            NormJob(
                h: h, gradH: nil, lengths: lengths, xhat: xhat, rstd: rstd, normed: normed,
                gamma: params.gamma, beta: params.beta, pooling: config.pooling, t: T, d: d),
            poolAndNormalize)

        // z (B,C) = c + y (B,d) W^T (d,C).
        for i in 0..<B { (logits + i * C).update(from: params.c, count: C) }
        host.gemm(
            transA: false, transB: true, m: B, n: C, k: d, alpha: 1, a: normed, lda: d, b: params.w, ldb: d,
            beta: 1, c: logits, ldc: C)

        outPtr.pointee.loss = 0
        outPtr.pointee.loss_sum = 0
        outPtr.pointee.count = 0
        outPtr.pointee.correct = 0
        if let targets {
            let r = try crossEntropy(logits: logits, targets: targets, rows: B, classes: C, probs: ctx?.probs)
            outPtr.pointee.loss_sum = r.lossSum
            outPtr.pointee.count = Int64(r.count)
            outPtr.pointee.correct = Int64(r.correct)
            outPtr.pointee.loss = r.count > 0 ? Float(r.lossSum / Double(r.count)) : 0
        }

        if let ctx {
            if let targets { ctx.targets.update(from: targets, count: B) }
            ctx.gamma.update(from: params.gamma, count: d)
            ctx.w.update(from: params.w, count: C * d)
            ctxOut?.pointee = Unmanaged.passRetained(ctx).toOpaque()
        }
    }
}

// MARK: - cross-entropy
