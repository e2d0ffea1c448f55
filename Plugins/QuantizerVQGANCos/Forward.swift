// vqgan_cos forward: project, l2-normalise, nearest code by cosine similarity, project back;
// the codebook + commitment loss and code counts.
import PluginKit
import VQMoEABI

/// ‖v‖ below this is clamped before dividing (as torch.nn.functional.normalize).
let normEpsilon: Float = 1e-12

/// What backward needs, copied at forward time (the optimizer may change the host's
/// buffers before backward runs).
final class QuantizerContext {
    let n: Int, d: Int, dc: Int, k: Int
    /// (N,d) the input x.
    let x: UnsafeMutablePointer<Float>
    /// (N,d_c) ẑ = z/max(‖z‖, eps) and (N) ‖z‖.
    let zHat: UnsafeMutablePointer<Float>
    let zNorm: UnsafeMutablePointer<Float>
    /// (N,d_c) z_q, the value fed to proj_out: ê_c (SURROGATE: ẑ).
    let zq: UnsafeMutablePointer<Float>
    /// (K,d_c) ê = e/max(‖e‖, eps) and (K) ‖e‖.
    let eHat: UnsafeMutablePointer<Float>
    let eNorm: UnsafeMutablePointer<Float>
    /// (N) c(x).
    let codes: UnsafeMutablePointer<Int32>
    /// (d_c,d) W_in and (d,d_c) W_out the forward used.
    let wIn: UnsafeMutablePointer<Float>
    let wOut: UnsafeMutablePointer<Float>
    /// VQMOE_STEP_FROZEN: no parameter gradients.
    let frozen: Bool

    init(n: Int, d: Int, dc: Int, k: Int, frozen: Bool) {
        self.n = n; self.d = d; self.dc = dc; self.k = k; self.frozen = frozen
        x = .allocate(capacity: n * d)
        zHat = .allocate(capacity: n * dc)
        zNorm = .allocate(capacity: n)
        zq = .allocate(capacity: n * dc)
        eHat = .allocate(capacity: k * dc)
        eNorm = .allocate(capacity: k)
        codes = .allocate(capacity: n)
        wIn = .allocate(capacity: dc * d)
        wOut = .allocate(capacity: d * dc)
    }

    deinit {
        x.deallocate(); zHat.deallocate(); zNorm.deallocate(); zq.deallocate(); eHat.deallocate()
        eNorm.deallocate(); codes.deallocate(); wIn.deallocate(); wOut.deallocate()
    }
}

/// Row-wise l2 normalisation: out_r = v_r / max(‖v_r‖, eps), norms_r = ‖v_r‖ (in double).
func normalizeRows(
    _ v: UnsafePointer<Float>, rows: Int, cols: Int, out: UnsafeMutablePointer<Float>,
    norms: UnsafeMutablePointer<Float>
) {
    for r in 0..<rows {
        let src = v + r * cols, dst = out + r * cols
        var s: Double = 0
        for i in 0..<cols { s += Double(src[i]) * Double(src[i]) }
        let norm = s.squareRoot()
        norms[r] = Float(norm)
        let inv = 1 / max(norm, Double(normEpsilon))
        for i in 0..<cols { dst[i] = Float(Double(src[i]) * inv) }
    }
}

/// Pointers for the per-token nearest-code loop (run on the host's pool).
struct CosineJob {
    var zHat: UnsafeMutablePointer<Float>  // (N,d_c)
    var eHat: UnsafeMutablePointer<Float>  // (K,d_c)
    var sims: UnsafeMutablePointer<Float>  // (N,K) ẑ·ê_j
    var codes: UnsafeMutablePointer<Int32>  // (N) out
    var zq: UnsafeMutablePointer<Float>  // (N,d_c) out
    var sqError: UnsafeMutablePointer<Double>  // (N) out: ‖ẑ_t − ê_c‖²
    var dc: Int
    var k: Int
    var surrogate: Bool
}

/// For tokens [begin, end): c = argmax_j ẑ·ê_j (ties -> lowest j). The GEMM similarities
/// screen the codes; every code within float rounding of the best is re-ranked by its exact
/// dot product in double precision, so equal codes tie exactly and the lowest index wins.
/// z_q = ê_c (SURROGATE: ẑ, the straight-through surrogate).
func nearestCodes(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: CosineJob.self).pointee
    let dc = job.dc, k = job.k
    for t in Int(begin)..<Int(end) {
        let zt = job.zHat + t * dc, sims = job.sims + t * k
        var bestApprox = sims[0]
        for j in 1..<k where sims[j] > bestApprox { bestApprox = sims[j] }
        let cutoff = bestApprox - 1e-4  // |ẑ·ê| <= 1: float error is far below this
        var best = 0
        var bestDot = -Double.infinity
        for j in 0..<k where sims[j] >= cutoff {
            let e = job.eHat + j * dc
            var s: Double = 0
            for i in 0..<dc { s += Double(zt[i]) * Double(e[i]) }
            if s > bestDot { bestDot = s; best = j }
        }
        job.codes[t] = Int32(best)
        let e = job.eHat + best * dc
        var sq: Double = 0
        for i in 0..<dc { let diff = Double(zt[i]) - Double(e[i]); sq += diff * diff }
        job.sqError[t] = sq
        (job.zq + t * dc).update(from: job.surrogate ? zt : e, count: dc)
    }
}

extension VQGANCosQuantizer {
    /// `saved` (memory of the context being filled) when there is one, else host scratch.
    func ctxOrScratch(
        _ saved: UnsafeMutablePointer<Float>?, _ count: Int, _ what: String
    ) throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        if let saved { return saved }
        return try host.scratchFloats(count, what)
    }

    /// z = x W_inᵀ + b_in (N,d_c); ẑ, ê l2-normalised; codes_t = argmax_j ẑ_t·ê_j;
    /// quantized = z_q W_outᵀ + b_out (N,d) with z_q = ẑ + sg(ê_c − ẑ) (value ê_c;
    /// SURROGATE: ẑ); code_counts_j = #{t : c_t = j};
    /// loss = mse(sg(ẑ), ê_c) + gamma * mse(ẑ, sg(ê_c)) = (1 + gamma) Σ‖ẑ_t − ê_c‖² / (N d_c).
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
        let p = try bound()
        let d = dModel, dc = codeDim, k = nCodes
        let n = try rowsOf(inPtr.pointee.x, cols: d, "x")
        let x = try requireF32(inPtr.pointee.x, [n, d], "x")  // (N,d)
        let quantized = try requireF32(outPtr.pointee.quantized, [n, d], "quantized")  // (N,d)
        let codesTensor = outPtr.pointee.codes
        let codes = try requireI32(codesTensor, codesTensor.ndim == 1 ? [n] : [n, 1], "codes")  // (N,1)
        let counts = try requireF32(outPtr.pointee.code_counts, [k], "code_counts")  // (K)
        for i in 0..<(n * d) where !x[i].isFinite {
            throw .numeric("non-finite input x[\(i / d)][\(i % d)] = \(x[i])")
        }
        for i in 0..<(k * dc) where !p.codebook[i].isFinite {
            throw .numeric("non-finite codebook entry [\(i / dc)][\(i % dc)] = \(p.codebook[i])")
        }

        let ctx = saveContext ? QuantizerContext(n: n, d: d, dc: dc, k: k, frozen: flags & VQMOE_STEP_FROZEN != 0) : nil
        // z (N,d_c) = x (N,d) @ W_inᵀ (d,d_c) + b_in
        let z = try host.scratchFloats(n * dc, "projected inputs")
        host.gemm(
            transA: false, transB: true, m: n, n: dc, k: d, alpha: 1, a: x, lda: d, b: p.wIn, ldb: d,
            beta: 0, c: z, ldc: dc)
        for t in 0..<n { let row = z + t * dc; for i in 0..<dc { row[i] += p.bIn[i] } }
        for i in 0..<(n * dc) where !z[i].isFinite {
            throw .numeric("non-finite projection z[\(i / dc)][\(i % dc)] = \(z[i]) (non-finite proj_in?)")
        }
        // ẑ (N,d_c), ‖z‖ (N); ê (K,d_c), ‖e‖ (K)
        let zHat = try ctxOrScratch(ctx?.zHat, n * dc, "normalised inputs")
        let zNorm = try ctxOrScratch(ctx?.zNorm, n, "input norms")
        normalizeRows(z, rows: n, cols: dc, out: zHat, norms: zNorm)
        let eHat = try ctxOrScratch(ctx?.eHat, k * dc, "normalised codes")
        let eNorm = try ctxOrScratch(ctx?.eNorm, k, "code norms")
        normalizeRows(p.codebook, rows: k, cols: dc, out: eHat, norms: eNorm)

        // sims (N,K) = ẑ (N,d_c) @ êᵀ (d_c,K); codes, z_q, ‖ẑ − ê_c‖²
        let sims = try host.scratchFloats(n * k, "cosine similarities")
        host.gemm(
            transA: false, transB: true, m: n, n: k, k: dc, alpha: 1, a: zHat, lda: dc, b: eHat, ldb: dc,
            beta: 0, c: sims, ldc: k)
        let zq = try ctxOrScratch(ctx?.zq, n * dc, "quantized codes")
        let sqError = try host.scratchDoubles(n, "squared errors")
        host.parallelFor(
            n, grain: max(1, 16384 / (k * dc + 1)),
            CosineJob(
                zHat: zHat, eHat: eHat, sims: sims, codes: codes, zq: zq, sqError: sqError,
                dc: dc, k: k, surrogate: flags & VQMOE_STEP_SURROGATE != 0), nearestCodes)

        // quantized (N,d) = z_q (N,d_c) @ W_outᵀ (d_c,d) + b_out
        host.gemm(
            transA: false, transB: true, m: n, n: d, k: dc, alpha: 1, a: zq, lda: dc, b: p.wOut, ldb: dc,
            beta: 0, c: quantized, ldc: d)
        for t in 0..<n { let row = quantized + t * d; for i in 0..<d { row[i] += p.bOut[i] } }

        counts.update(repeating: 0, count: k)
        var total: Double = 0
        for t in 0..<n { counts[Int(codes[t])] += 1; total += sqError[t] }
        let mse = n > 0 ? total / Double(n * dc) : 0
        outPtr.pointee.loss = Float((1 + Double(config.commitment)) * mse)

        if let ctx {
            ctx.x.update(from: x, count: n * d)
            ctx.codes.update(from: codes, count: n)
            ctx.wIn.update(from: p.wIn, count: dc * d)
            ctx.wOut.update(from: p.wOut, count: d * dc)
            ctxOut?.pointee = Handle.context(ctx)
        }
        if train || !usageFromTraining {
            usage = CodeUsage(counts: Array(UnsafeBufferPointer(start: counts, count: k)), tokens: n)
            usageFromTraining = train
        }
    }
}
