// The nearest code of each row under squared L2 distance, shared by the VQ-VAE and residual-VQ
// quantizers (and the VQ-VAE's k-means initialisation).
import Glibc
import VQMoEABI

/// Pointers for the per-token nearest-code loop (run on the host's pool).
struct NearestJob {
    var x: UnsafePointer<Float>  // (N,d)
    var codebook: UnsafePointer<Float>  // (K,d)
    var dots: UnsafeMutablePointer<Float>  // (N,K) x . e_j
    var norms: UnsafeMutablePointer<Float>  // (K) ||e_j||^2
    var maxNorm: Float  // max_j ||e_j||^2
    var codes: UnsafeMutablePointer<Int32>  // (N) out
    var quantized: UnsafeMutablePointer<Float>?  // (N,d) out (nil: codes and errors only)
    var sqError: UnsafeMutablePointer<Double>  // (N) out: ||x_t - e_c||^2
    var d: Int, k: Int
    var surrogate: Bool
}

/// For tokens [begin, end): c = argmin_j ||x||^2 - 2 x.e_j + ||e_j||^2 (ties -> lowest j).
/// The GEMM distances screen the codes (||x||^2 is the same for every j and is left out);
/// every code within float rounding of the best is re-ranked by its exact squared distance
/// in double precision, so equal codes tie exactly and the lowest index wins.
/// quantized = e_c (SURROGATE: x, the straight-through surrogate).
func nearestCodesJob(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
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
@inline(__always) public func squaredDistance(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ d: Int) -> Double
{
    var s: Double = 0
    for i in 0..<d { let diff = Double(a[i]) - Double(b[i]); s += diff * diff }
    return s
}

extension Host {
    /// codes_t = argmin_j ||x_t - e_j||^2 (ties -> lowest j) for a codebook C (K,d), with sqError_t
    /// = ||x_t - e_c||^2 and, when `quantized` is given, quantized_t = e_c (surrogate: x_t).
    /// Distances screened by one GEMM x (N,d) @ C^T (d,K), then re-ranked exactly.
    public func nearestCodes(
        x: UnsafePointer<Float>, n: Int, d: Int, codebook C: UnsafePointer<Float>, k: Int,
        codes: UnsafeMutablePointer<Int32>,
        sqError: UnsafeMutablePointer<Double>, quantized: UnsafeMutablePointer<Float>? = nil, surrogate: Bool = false
    ) throws(PluginFailure) {
        guard n > 0 else { return }
        let norms = try scratchFloats(k, "code norms")  // ||e_j||^2 (K)
        var maxNorm: Float = 0
        for j in 0..<k {
            let ej = C + j * d
            var s: Float = 0
            for i in 0..<d { s += ej[i] * ej[i] }
            norms[j] = s
            maxNorm = max(maxNorm, s)
        }
        let dots = try scratchFloats(n * k, "code distances")  // x . e_j (N,K)
        gemm(
            transA: false, transB: true, m: n, n: k, k: d, alpha: 1, a: x, lda: d, b: C, ldb: d, beta: 0, c: dots,
            ldc: k)
        parallelFor(
            n, grain: max(1, 16384 / (k * d + 1)),
            NearestJob(
                x: x, codebook: C, dots: dots, norms: norms, maxNorm: maxNorm, codes: codes, quantized: quantized,
                sqError: sqError, d: d, k: k, surrogate: surrogate), nearestCodesJob)
    }

    /// `count` int32 of host scratch memory, valid until the current plugin call returns.
    public func scratchInts(_ count: Int, _ what: String) throws(PluginFailure) -> UnsafeMutablePointer<Int32> {
        guard let p = api.pointee.scratch!(max(count, 1) * MemoryLayout<Int32>.stride) else {
            throw .outOfMemory("could not get \(count * 4) bytes of scratch memory for \(what)")
        }
        return p.bindMemory(to: Int32.self, capacity: max(count, 1))
    }

    /// The next raw 64-bit draw of a host stream.
    public func next(_ r: inout vqmoe_rng) -> UInt64 { api.pointee.rng_next_u64!(&r) }
}
