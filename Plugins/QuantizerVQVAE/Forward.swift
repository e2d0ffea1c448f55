// vqvae forward: nearest code, quantized vectors, the VQ loss, code counts; in training
// forwards the k-means initialisation (first one only), the EMA codebook update and the
// dead-code restart.
import PluginKit
import VQMoEABI

/// What backward needs, copied at forward time (the codebook may change afterwards, e.g.
/// by the EMA update in this very forward).
final class QuantizerContext {
    let n: Int, d: Int
    /// (N,d) the input x.
    let x: UnsafeMutablePointer<Float>
    /// (N,d) q = e_{c(x)} from the pre-update codebook.
    let q: UnsafeMutablePointer<Float>
    /// (N) c(x).
    let codes: UnsafeMutablePointer<Int32>
    /// VQMOE_STEP_FROZEN: no parameter gradients.
    let frozen: Bool
    /// This forward wrote the codebook by k-means: no codebook gradient (see backward).
    let kmeansInitialized: Bool

    init(n: Int, d: Int, frozen: Bool, kmeansInitialized: Bool) {
        self.n = n; self.d = d; self.frozen = frozen; self.kmeansInitialized = kmeansInitialized
        x = .allocate(capacity: n * d)
        q = .allocate(capacity: n * d)
        codes = .allocate(capacity: n)
    }

    deinit { x.deallocate(); q.deallocate(); codes.deallocate() }
}

/// Pointers for the per-token nearest-code loop (run on the host's pool).
struct NearestJob {
    var x: UnsafeMutablePointer<Float>  // (N,d)
    var codebook: UnsafeMutablePointer<Float>  // (K,d)
    var dots: UnsafeMutablePointer<Float>  // (N,K) x . e_j
    var norms: UnsafeMutablePointer<Float>  // (K) ||e_j||^2
    var maxNorm: Float  // max_j ||e_j||^2
    var codes: UnsafeMutablePointer<Int32>  // (N) out
    var quantized: UnsafeMutablePointer<Float>?  // (N,d) out (nil: codes and errors only)
    var sqError: UnsafeMutablePointer<Double>  // (N) out: ||x_t - e_c||^2
    var d: Int
    var k: Int
    var surrogate: Bool
}

/// For tokens [begin, end): c = argmin_j ||x||^2 - 2 x.e_j + ||e_j||^2 (ties -> lowest j).
/// The GEMM distances screen the codes (||x||^2 is the same for every j and is left out);
/// every code within float rounding of the best is re-ranked by its exact squared distance
/// in double precision, so equal codes tie exactly and the lowest index wins.
/// quantized = e_c (SURROGATE: x, the straight-through surrogate).
func nearestCodes(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: NearestJob.self).pointee
    let d = job.d, k = job.k
    for t in Int(begin)..<Int(end) {
        let xt = job.x + t * d, dots = job.dots + t * k
        var xx: Float = 0
        for i in 0..<d { xx += xt[i] * xt[i] }
        var bestApprox = job.norms[0] - 2 * dots[0]
        for j in 1..<k {
            let a = job.norms[j] - 2 * dots[j]
            if a < bestApprox { bestApprox = a }
        }
        let cutoff = bestApprox + 1e-4 * (xx + job.maxNorm) + Float.leastNormalMagnitude
        var best = -1
        var bestDist = Double.infinity
        for j in 0..<k where job.norms[j] - 2 * dots[j] <= cutoff {
            let dist = squaredDistance(xt, job.codebook + j * d, d)
            if dist < bestDist { bestDist = dist; best = j }
        }
        if best < 0 {  // float overflow in the screen (huge values): rank every code exactly
            for j in 0..<k {
                let dist = squaredDistance(xt, job.codebook + j * d, d)
                if best < 0 || dist < bestDist { bestDist = dist; best = j }
            }
        }
        job.codes[t] = Int32(best)
        job.sqError[t] = bestDist
        job.quantized.map { ($0 + t * d).update(from: job.surrogate ? xt : job.codebook + best * d, count: d) }
    }
}

/// ||a - b||^2 in double precision.
@inline(__always) func squaredDistance(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ d: Int) -> Double {
    var s: Double = 0
    for i in 0..<d { let diff = Double(a[i]) - Double(b[i]); s += diff * diff }
    return s
}

extension VQVAEQuantizer {
    /// codes_t = argmin_j ||x_t - e_j||^2 (ties -> lowest j) for a codebook C (K,d), with
    /// sqError_t = ||x_t - e_c||^2 and, when `quantized` is given, quantized_t = e_c
    /// (surrogate: x_t). Distances screened by one GEMM x (N,d) @ C^T (d,K), then re-ranked
    /// exactly (see `nearestCodes`).
    func assignNearest(
        x: UnsafeMutablePointer<Float>, n: Int, codebook C: UnsafeMutablePointer<Float>,
        codes: UnsafeMutablePointer<Int32>, quantized: UnsafeMutablePointer<Float>?,
        sqError: UnsafeMutablePointer<Double>, surrogate: Bool
    ) throws(PluginFailure) {
        let d = dModel, k = nCodes
        guard n > 0 else { return }
        // ||e_j||^2 (K) and x . e_j (N,K) = x (N,d) @ C^T (d,K)
        let norms = try host.scratchFloats(k, "code norms")
        var maxNorm: Float = 0
        for j in 0..<k {
            let ej = C + j * d
            var s: Float = 0
            for i in 0..<d { s += ej[i] * ej[i] }
            norms[j] = s
            maxNorm = max(maxNorm, s)
        }
        let dots = try host.scratchFloats(n * k, "code distances")
        host.gemm(
            transA: false, transB: true, m: n, n: k, k: d, alpha: 1, a: x, lda: d, b: C, ldb: d,
            beta: 0, c: dots, ldc: k)
        host.parallelFor(
            n, grain: max(1, 16384 / (k * d + 1)),
            NearestJob(
                x: x, codebook: C, dots: dots, norms: norms, maxNorm: maxNorm, codes: codes,
                quantized: quantized, sqError: sqError, d: d, k: k, surrogate: surrogate), nearestCodes)
    }

    /// codes_t = c(x_t); quantized_t = e_c (SURROGATE: x_t); code_counts_j = #{t : c_t = j};
    /// loss = mse(sg(x), q) + commitment * mse(x, sg(q))  (ema: commitment * mse(x, sg(q))),
    /// mse = sum ||x_t - q_t||^2 / (N d).
    /// A training forward (TRAIN set, FROZEN not set) first runs the k-means initialisation
    /// when kmeans_init is on and the state "initialized" is 0 (then quantizes with the new
    /// codebook), and, with ema, ends with the EMA update and the dead-code restart.
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
        let frozen = flags & VQMOE_STEP_FROZEN != 0
        let saveContext = train && flags & VQMOE_STEP_NO_GRAD == 0
        let C = try boundCodebook()
        let d = dModel, k = nCodes
        let n = try rowsOf(inPtr.pointee.x, cols: d, "x")
        let x = try requireF32(inPtr.pointee.x, [n, d], "x")
        let quantized = try requireF32(outPtr.pointee.quantized, [n, d], "quantized")
        let codesTensor = outPtr.pointee.codes
        let codes = try requireI32(codesTensor, codesTensor.ndim == 1 ? [n] : [n, 1], "codes")  // (N,1)
        let counts = try requireF32(outPtr.pointee.code_counts, [k], "code_counts")
        for i in 0..<(n * d) where !x[i].isFinite {
            throw .numeric("non-finite input x[\(i / d)][\(i % d)] = \(x[i])")
        }
        // k-means initialisation: once (the state records it), on a non-empty training batch.
        var kmeansHere = false
        if config.kmeansInit && train && !frozen && n > 0, let initialized, initialized.pointee == 0 {
            try kmeansInitialize(x: x, n: n, seed: stepPtr.pointee.seed)
            initialized.pointee = 1
            kmeansHere = true
        }
        for i in 0..<(k * d) where !C[i].isFinite {
            throw .numeric("non-finite codebook entry [\(i / d)][\(i % d)] = \(C[i])")
        }

        let sqError = try host.scratchDoubles(n, "squared errors")
        try assignNearest(
            x: x, n: n, codebook: C, codes: codes, quantized: quantized, sqError: sqError,
            surrogate: flags & VQMOE_STEP_SURROGATE != 0)

        counts.update(repeating: 0, count: k)
        var total: Double = 0
        for t in 0..<n { counts[Int(codes[t])] += 1; total += sqError[t] }
        let mse = n > 0 ? total / Double(n * d) : 0
        outPtr.pointee.loss = Float(
            config.ema ? Double(config.commitment) * mse : (1 + Double(config.commitment)) * mse)

        var ctx: QuantizerContext? = nil
        if saveContext {
            let c = QuantizerContext(n: n, d: d, frozen: frozen, kmeansInitialized: kmeansHere)
            c.x.update(from: x, count: n * d)
            c.codes.update(from: codes, count: n)
            for t in 0..<n { (c.q + t * d).update(from: C + Int(codes[t]) * d, count: d) }  // pre-update q
            ctx = c
        }
        var restarted: Int? = nil
        if config.ema && train && !frozen {
            try emaUpdate(x: x, codes: codes, counts: counts, n: n)
            if config.deadCodeThreshold > 0 { restarted = try restartDeadCodes(x: x, n: n, seed: stepPtr.pointee.seed) }
        }
        // Published last: a failed forward hands the host no context.
        if let ctx { ctxOut?.pointee = Unmanaged.passRetained(ctx).toOpaque() }
        if train || !(stats?.fromTraining ?? false) {
            stats = UsageStats(
                counts: Array(UnsafeBufferPointer(start: counts, count: k)), tokens: n, fromTraining: train,
                restarted: restarted)
        }
    }
}
