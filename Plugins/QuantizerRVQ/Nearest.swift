// The nearest code of each residual within one level's codebook.
import PluginKit
import VQMoEABI

/// Pointers for the per-token nearest-code loop of one level (run on the host's pool).
struct NearestJob {
    var r: UnsafeMutablePointer<Float>  // (N,d) residuals r_{l-1}
    var codebook: UnsafeMutablePointer<Float>  // (K,d) this level's codes
    var dots: UnsafeMutablePointer<Float>  // (N,K) r . e_j
    var norms: UnsafeMutablePointer<Float>  // (K) ||e_j||^2
    var maxNorm: Float  // max_j ||e_j||^2
    var codes: UnsafeMutablePointer<Int32>  // (N) out: c_l
    var sqError: UnsafeMutablePointer<Double>  // (N) out: ||r_{l-1} - e_c||^2
    var d: Int
    var k: Int
}

/// For tokens [begin, end): c = argmin_j ||r||^2 - 2 r.e_j + ||e_j||^2 (ties -> lowest j).
/// The GEMM distances screen the codes (||r||^2 is the same for every j and is left out);
/// every code within float rounding of the best is re-ranked by its exact squared distance
/// in double precision, so equal codes tie exactly and the lowest index wins.
func nearestCodes(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: NearestJob.self).pointee
    let d = job.d, k = job.k
    for t in Int(begin)..<Int(end) {
        let rt = job.r + t * d, dots = job.dots + t * k
        var rr: Float = 0
        for i in 0..<d { rr += rt[i] * rt[i] }
        var bestApprox = job.norms[0] - 2 * dots[0]
        for j in 1..<k {
            let a = job.norms[j] - 2 * dots[j]
            if a < bestApprox { bestApprox = a }
        }
        let cutoff = bestApprox + 1e-4 * (rr + job.maxNorm) + Float.leastNormalMagnitude
        var best = -1
        var bestDist = Double.infinity
        for j in 0..<k where job.norms[j] - 2 * dots[j] <= cutoff {
            let dist = squaredDistance(rt, job.codebook + j * d, d)
            if dist < bestDist { bestDist = dist; best = j }
        }
        if best < 0 {  // float overflow in the screen (huge values): rank every code exactly
            for j in 0..<k {
                let dist = squaredDistance(rt, job.codebook + j * d, d)
                if best < 0 || dist < bestDist { bestDist = dist; best = j }
            }
        }
        job.codes[t] = Int32(best)
        job.sqError[t] = bestDist
    }
}

/// ||a - b||^2 in double precision.
@inline(__always) func squaredDistance(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ d: Int) -> Double {
    var s: Double = 0
    for i in 0..<d { let diff = Double(a[i]) - Double(b[i]); s += diff * diff }
    return s
}

extension RVQQuantizer {
    /// codes_t = argmin_j ||r_t - e_j||^2 over one level's codebook C (K,d), with
    /// sqError_t = ||r_t - e_c||^2: one GEMM r (N,d) @ C^T (d,K) screens, `nearestCodes` decides.
    func assignNearest(
        r: UnsafeMutablePointer<Float>, n: Int, codebook C: UnsafeMutablePointer<Float>,
        codes: UnsafeMutablePointer<Int32>, sqError: UnsafeMutablePointer<Double>
    ) throws(PluginFailure) {
        let d = dModel, k = nCodes
        guard n > 0 else { return }
        let norms = try host.scratchFloats(k, "code norms")  // (K)
        var maxNorm: Float = 0
        for j in 0..<k {
            let ej = C + j * d
            var s: Float = 0
            for i in 0..<d { s += ej[i] * ej[i] }
            norms[j] = s
            maxNorm = max(maxNorm, s)
        }
        let dots = try host.scratchFloats(n * k, "code distances")  // (N,K)
        host.gemm(
            transA: false, transB: true, m: n, n: k, k: d, alpha: 1, a: r, lda: d, b: C, ldb: d,
            beta: 0, c: dots, ldc: k)
        host.parallelFor(
            n, grain: max(1, 16384 / (k * d + 1)),
            NearestJob(
                r: r, codebook: C, dots: dots, norms: norms, maxNorm: maxNorm, codes: codes,
                sqError: sqError, d: d, k: k), nearestCodes)
    }
}
