// classifier forward: pool -> FC1 -> activation -> dropout -> FC2 -> softmax cross-entropy.
import Glibc
import PluginKit
import VQMoEABI

/// What backward needs, copied at forward time (host buffers may change afterwards).
final class ClassifierContext {
    let b: Int, t: Int, d: Int, hidden: Int, c: Int
    /// Non-pad targets (the loss is their mean); 0 = nothing flows back.
    let count: Int
    /// VQMOE_STEP_FROZEN: no parameter gradients.
    let frozen: Bool
    let lengths: UnsafeMutablePointer<Int32>  // (B) real tokens per sequence
    let argmax: UnsafeMutablePointer<Int32>?  // (B,d) max pooling's positions
    let pooled: UnsafeMutablePointer<Float>  // (B,d) p
    let pre: UnsafeMutablePointer<Float>  // (B,H) u = W1 p + b1
    let act: UnsafeMutablePointer<Float>  // (B,H) a = act(u) ⊙ mask
    let mask: UnsafeMutablePointer<Float>?  // (B,H) 0 or 1/(1-dropout); nil = no dropout
    let probs: UnsafeMutablePointer<Float>  // (B,C) softmax(z)
    let targets: UnsafeMutablePointer<Int32>  // (B)
    let w1: UnsafeMutablePointer<Float>  // (H,d)
    let w2: UnsafeMutablePointer<Float>  // (C,H)

    init(b: Int, t: Int, d: Int, hidden: Int, c: Int, count: Int, frozen: Bool, maxPooling: Bool, dropout: Bool) {
        self.b = b; self.t = t; self.d = d; self.hidden = hidden; self.c = c; self.count = count; self.frozen = frozen
        lengths = .allocate(capacity: max(b, 1))
        argmax = maxPooling ? .allocate(capacity: max(b * d, 1)) : nil
        pooled = .allocate(capacity: max(b * d, 1))
        pre = .allocate(capacity: max(b * hidden, 1))
        act = .allocate(capacity: max(b * hidden, 1))
        mask = dropout ? .allocate(capacity: max(b * hidden, 1)) : nil
        probs = .allocate(capacity: max(b * c, 1))
        targets = .allocate(capacity: max(b, 1))
        w1 = .allocate(capacity: hidden * d)
        w2 = .allocate(capacity: c * hidden)
    }

    deinit {
        lengths.deallocate(); argmax?.deallocate(); pooled.deallocate(); pre.deallocate(); act.deallocate()
        mask?.deallocate(); probs.deallocate(); targets.deallocate(); w1.deallocate(); w2.deallocate()
    }
}

// MARK: - activation

/// 1/sqrt(2) and 1/sqrt(2 pi), for the exact GELU.
let invSqrt2: Float = 0.70710678118654752
let invSqrt2Pi: Float = 0.39894228040143268

extension Activation {
    /// a_i = f(u_i) for i in [0, n).
    func apply(_ u: UnsafePointer<Float>, _ a: UnsafeMutablePointer<Float>, _ n: Int) {
        switch self {
        case .relu: for i in 0..<n { a[i] = max(u[i], 0) }
        case .gelu: for i in 0..<n { let x = u[i]; a[i] = 0.5 * x * (1 + erff(x * invSqrt2)) }
        case .tanh: for i in 0..<n { a[i] = tanhf(u[i]) }
        }
    }

    /// g_i *= f'(u_i): relu' = [u > 0]; gelu' = Phi(u) + u phi(u); tanh' = 1 - tanh(u)^2.
    func backward(_ u: UnsafePointer<Float>, _ g: UnsafeMutablePointer<Float>, _ n: Int) {
        switch self {
        case .relu: for i in 0..<n where !(u[i] > 0) { g[i] = 0 }
        case .gelu:
            for i in 0..<n {
                let x = u[i]
                g[i] *= 0.5 * (1 + erff(x * invSqrt2)) + x * invSqrt2Pi * expf(-0.5 * x * x)
            }
        case .tanh: for i in 0..<n { let y = tanhf(u[i]); g[i] *= 1 - y * y }
        }
    }
}

// MARK: - cross-entropy

// MARK: - forward

extension ClassifierHead {
    func shape(_ out: UnsafeMutablePointer<vqmoe_head_shape>?) throws(PluginFailure) {
        guard let out else { throw .invalid("shape: out is NULL") }
        out.pointee.per_token = 0
        out.pointee.n_out = Int64(nClasses)
        out.pointee.is_lm = 0
    }

    /// p = pool(h) (B,d); u = p W1^T + b1 (B,H); a = act(u) ⊙ m/(1-dropout) in training
    /// forwards (m ~ Bernoulli(1-dropout) from host stream (step seed, 0), row-major over
    /// (B,H)); logits z = a W2^T + b2 (B,C); with targets the mean cross-entropy over
    /// non-pad rows, loss_sum, count and correct.
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
        let d = dModel, H = hidden, C = nClasses
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
        let train = flags & VQMOE_STEP_TRAIN != 0
        let saves = train && flags & VQMOE_STEP_NO_GRAD == 0
        let dropout = train && config.dropout > 0
        var count = 0
        if let targets { for i in 0..<B where targets[i] != Int32(VQMOE_PAD_TARGET) { count += 1 } }
        let ctx =
            saves
            ? ClassifierContext(
                b: B, t: T, d: d, hidden: H, c: C, count: count,
                frozen: flags & VQMOE_STEP_FROZEN != 0,
                maxPooling: config.pooling == .max, dropout: dropout) : nil

        // Resolved lengths: given, or T for every row.
        let lengths = try host.orScratch(ctx?.lengths, B, "lengths")
        if let given { lengths.update(from: given, count: B) } else { lengths.update(repeating: Int32(T), count: B) }

        // p (B,d) = pool(h).
        let pooled = try host.orScratch(ctx?.pooled, B * d, "pooled vectors")
        let argmax: UnsafeMutablePointer<Int32>? =
            config.pooling != .max ? nil : try host.orScratch(ctx?.argmax, B * d, "max positions")
        host.parallelFor(
            B, grain: poolGrain(t: T, d: d),
            PoolJob(
                h: h, gradH: nil, pooled: pooled, lengths: lengths, argmax: argmax,
                pooling: config.pooling, t: T, d: d), poolRows)

        // u (B,H) = b1 + p (B,d) W1^T (d,H).
        let pre = try host.orScratch(ctx?.pre, B * H, "FC1 outputs")
        for i in 0..<B { (pre + i * H).update(from: params.b1, count: H) }
        host.gemm(
            transA: false, transB: true, m: B, n: H, k: d, alpha: 1, a: pooled, lda: d, b: params.w1, ldb: d,
            beta: 1, c: pre, ldc: H)

        // a (B,H) = act(u), then inverted dropout.
        let act = try host.orScratch(ctx?.act, B * H, "activations")
        config.activation.apply(pre, act, B * H)
        if dropout {
            let mask = try host.orScratch(ctx?.mask, B * H, "dropout mask")
            try fillDropoutMask(mask, B * H, seed: stepPtr.pointee.seed)
            for i in 0..<(B * H) { act[i] *= mask[i] }
        }

        // z (B,C) = b2 + a (B,H) W2^T (H,C).
        for i in 0..<B { (logits + i * C).update(from: params.b2, count: C) }
        host.gemm(
            transA: false, transB: true, m: B, n: C, k: H, alpha: 1, a: act, lda: H, b: params.w2, ldb: H,
            beta: 1, c: logits, ldc: C)

        var out = outPtr.pointee
        out.loss = 0; out.loss_sum = 0; out.count = 0; out.correct = 0
        if let targets {
            let r = try crossEntropy(logits: logits, targets: targets, rows: B, classes: C, probs: ctx?.probs)
            out.loss_sum = r.lossSum
            out.count = Int64(r.count)
            out.correct = Int64(r.correct)
            out.loss = r.count > 0 ? Float(r.lossSum / Double(r.count)) : 0
        }
        outPtr.pointee = out

        if let ctx {
            if let targets { ctx.targets.update(from: targets, count: B) }
            ctx.w1.update(from: params.w1, count: H * d)
            ctx.w2.update(from: params.w2, count: C * H)
            ctxOut?.pointee = Unmanaged.passRetained(ctx).toOpaque()
        }
    }

    /// mask_i = 1/(1-p) with probability 1-p, else 0: u_i ~ U[0,1) from the host stream
    /// (step seed, 0), kept when u_i >= p. A pure function of the step seed, so a forward
    /// repeated with the same step (gradcheck, resume) drops the same units.
    func fillDropoutMask(_ mask: UnsafeMutablePointer<Float>, _ n: Int, seed: UInt64) throws(PluginFailure) {
        guard let uniform = host.api.pointee.rng_uniform else { throw .invalid("dropout needs host->rng_uniform") }
        let p = config.dropout, keep = 1 / (1 - config.dropout)
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<n { mask[i] = uniform(&r) >= p ? keep : 0 }
    }
}
