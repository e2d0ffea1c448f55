// lfq forward: project to b = log2 K dims, one sign bit per dim, project back; the entropy
// and commitment loss and code counts.
import PluginKit
import VQMoEABI

/// What backward needs, copied at forward time (the optimizer may change the host's
/// buffers before backward runs).
final class QuantizerContext {
    let n: Int, d: Int, b: Int, k: Int
    /// (N,d) the input x.
    let x: UnsafeMutablePointer<Float>
    /// (N,b) z = W_in x + b_in.
    let z: UnsafeMutablePointer<Float>
    /// (N,b) z_q, the value fed to proj_out: q (SURROGATE: z).
    let zq: UnsafeMutablePointer<Float>
    /// (K) centred log p̄ of the entropy gradient (see `entropyGrads`).
    let weights: UnsafeMutablePointer<Double>
    /// (b,d) W_in and (d,b) W_out the forward used.
    let wIn: UnsafeMutablePointer<Float>
    let wOut: UnsafeMutablePointer<Float>
    /// VQMOE_STEP_FROZEN: no parameter gradients.
    let frozen: Bool

    init(n: Int, d: Int, b: Int, k: Int, frozen: Bool) {
        self.n = n; self.d = d; self.b = b; self.k = k; self.frozen = frozen
        x = .allocate(capacity: n * d)
        z = .allocate(capacity: n * b)
        zq = .allocate(capacity: n * b)
        weights = .allocate(capacity: k)
        wIn = .allocate(capacity: b * d)
        wOut = .allocate(capacity: d * b)
    }

    deinit {
        x.deallocate(); z.deallocate(); zq.deallocate(); weights.deallocate(); wIn.deallocate(); wOut.deallocate()
    }
}

extension LFQQuantizer {
    /// z = x W_inᵀ + b_in (N,b); q_{t,i} = +scale if z_{t,i} > 0 else −scale;
    /// codes_t = Σ_i [z_{t,i} > 0] 2^i; quantized = z_q W_outᵀ + b_out (N,d) with
    /// z_q = z + sg(q − z) (value q; SURROGATE: z); code_counts_j = #{t : c_t = j};
    /// loss = entropy_weight (mean_t H(p(.|z_t)) − gamma_div H(mean_t p(.|z_t)))
    ///        + commitment Σ‖z_t − q_t‖² / (N b).
    func forward(
        _ stepPtr: UnsafePointer<vqmoe_step_info>?, _ inPtr: UnsafePointer<vqmoe_quantizer_input>?,
        _ outPtr: UnsafeMutablePointer<vqmoe_quantizer_output>?,
        _ ctxOut: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
    ) throws(PluginFailure) {
        ctxOut?.pointee = nil
        guard let stepPtr, let inPtr, let outPtr else { throw .invalid("forward: step, input or output is NULL") }
        try requireSize(inPtr.pointee.struct_size, vqmoe_quantizer_input.self, "quantizer input")
        try requireSize(outPtr.pointee.struct_size, vqmoe_quantizer_output.self, "quantizer output")
        let flags = stepPtr.pointee.flags
        let train = flags & VQMOE_STEP_TRAIN != 0
        let saveContext = train && flags & VQMOE_STEP_NO_GRAD == 0
        let surrogate = flags & VQMOE_STEP_SURROGATE != 0
        let p = try bound()
        let d = dModel, b = nBits, k = nCodes
        let n = try rowsOf(inPtr.pointee.x, cols: d, "x")
        let x = try requireF32(inPtr.pointee.x, [n, d], "x")  // (N,d)
        let quantized = try requireF32(outPtr.pointee.quantized, [n, d], "quantized")  // (N,d)
        let codesTensor = outPtr.pointee.codes
        let codes = try requireI32(codesTensor, codesTensor.ndim == 1 ? [n] : [n, 1], "codes")  // (N,1)
        let counts = try requireF32(outPtr.pointee.code_counts, [k], "code_counts")  // (K)
        for i in 0..<(n * d) where !x[i].isFinite {
            throw .numeric("non-finite input x[\(i / d)][\(i % d)] = \(x[i])")
        }

        let ctx = saveContext ? QuantizerContext(n: n, d: d, b: b, k: k, frozen: flags & VQMOE_STEP_FROZEN != 0) : nil
        // z (N,b) = x (N,d) @ W_inᵀ (d,b) + b_in
        let z = try ctxOrScratch(ctx?.z, n * b, "projected inputs")
        host.gemm(
            transA: false, transB: true, m: n, n: b, k: d, alpha: 1, a: x, lda: d, b: p.wIn, ldb: d,
            beta: 0, c: z, ldc: b)
        for t in 0..<n { let row = z + t * b; for i in 0..<b { row[i] += p.bIn[i] } }
        for i in 0..<(n * b) where !z[i].isFinite {
            throw .numeric("non-finite projection z[\(i / b)][\(i % b)] = \(z[i]) (non-finite proj_in?)")
        }

        // codes, z_q and Σ‖z − q‖²
        let zq = try ctxOrScratch(ctx?.zq, n * b, "quantized bits")
        let s = config.scale
        var sse: Double = 0
        counts.update(repeating: 0, count: k)
        for t in 0..<n {
            let zt = z + t * b, qt = zq + t * b
            var index: Int32 = 0
            for i in 0..<b {
                let positive = zt[i] > 0
                if positive { index |= Int32(1) << Int32(i) }
                let q = positive ? s : -s
                let diff = Double(zt[i]) - Double(q)
                sse += diff * diff
                qt[i] = surrogate ? zt[i] : q
            }
            codes[t] = index
            counts[Int(index)] += 1
        }

        // quantized (N,d) = z_q (N,b) @ W_outᵀ (b,d) + b_out
        host.gemm(
            transA: false, transB: true, m: n, n: d, k: b, alpha: 1, a: zq, lda: b, b: p.wOut, ldb: b,
            beta: 0, c: quantized, ldc: d)
        for t in 0..<n { let row = quantized + t * d; for i in 0..<d { row[i] += p.bOut[i] } }

        let weights: UnsafeMutablePointer<Double>  // (K)
        if let ctx { weights = ctx.weights } else { weights = try host.scratchDoubles(k, "entropy weights") }
        let entropy = try entropyForward(z, n: n, weights: weights)
        let commit = n > 0 ? sse / Double(n * b) : 0
        outPtr.pointee.loss = Float(
            config.entropyWeight * (entropy.perSample - config.diversityGamma * entropy.codebook)
                + config.commitment * commit)

        if let ctx {
            ctx.x.update(from: x, count: n * d)
            ctx.wIn.update(from: p.wIn, count: b * d)
            ctx.wOut.update(from: p.wOut, count: d * b)
            ctxOut?.pointee = Handle.context(ctx)
        }
        if train || !(report?.fromTraining ?? false) {
            report = UsageReport(
                usage: CodeUsage(counts: Array(UnsafeBufferPointer(start: counts, count: k)), tokens: n),
                perSampleEntropy: entropy.perSample, codebookEntropy: entropy.codebook, fromTraining: train)
        }
    }

    /// `saved` (memory of the context being filled) when there is one, else host scratch.
    func ctxOrScratch(
        _ saved: UnsafeMutablePointer<Float>?, _ count: Int, _ what: String
    ) throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        if let saved { return saved }
        return try host.scratchFloats(count, what)
    }
}
