// What keeps a learned codebook in use, for any quantizer whose codes are nearest vectors of a
// codebook of K rows of width w (vqvae's inputs, one residual level of rvq, vqgan_cos's
// normalised codes):
//   EMA codebook updates (van den Oord et al. 2017, appendix A.1) with Laplace smoothing,
//   k-means initialisation on the first training batch (lucidrains' vector-quantize-pytorch
//     `kmeans_init`; Zeghidour et al. 2021, SoundStream),
//   dead-code restart from batch rows (Dhariwal et al. 2020, Jukebox; SoundStream).
// Batch statistics are those of the global batch: the EMA sums are all-reduced, and the
// k-means and restart rows are every rank's rows (the caller gathers them).
import VQMoEABI

/// EMA updates, k-means initialisation and dead-code restart of one codebook (K, w).
///
/// ```swift
/// let upkeep = CodebookUpkeep(host: host, k: 8, width: 64, decay: 0.9, epsilon: 1e-5,
///                             kmeansIters: 10, deadCodeThreshold: 4)
/// try upkeep.kmeans(codebook: C, count: n, sum: m, x: rows, n: rows.count / 64, seed: step.seed)
/// try upkeep.emaUpdate(codebook: C, count: n, sum: m, x: x, codes: codes, globalCounts: counts, n: n, globalN: N)
/// let replaced = try upkeep.restartDeadCodes(codebook: C, count: n, sum: m, x: rows, n: N, seed: step.seed)
/// ```
public struct CodebookUpkeep {
    public let host: Host
    public let k: Int, width: Int
    public let decay: Float, epsilon: Float, kmeansIters: Int, deadCodeThreshold: Float
    /// Mixed into the host streams of the k-means and restart rows (e.g. an rvq level), so that
    /// several codebooks of one instance draw different rows.
    public let salt: UInt64

    /// Host stream of the k-means initial rows: rng_init(step seed, kmeansStream ^ salt).
    public static let kmeansStream: UInt64 = 0x6B6D_6561_6E73  // "kmeans"
    /// Host stream of the dead-code restart rows: rng_init(step seed, deadCodeStream ^ salt).
    public static let deadCodeStream: UInt64 = 0x6465_6164_636F_6465  // "deadcode"

    public init(
        host: Host, k: Int, width: Int, decay: Float, epsilon: Float, kmeansIters: Int, deadCodeThreshold: Float,
        salt: UInt64 = 0
    ) {
        (self.host, self.k, self.width, self.decay, self.epsilon) = (host, k, width, decay, epsilon)
        (self.kmeansIters, self.deadCodeThreshold, self.salt) = (kmeansIters, deadCodeThreshold, salt)
    }

    /// With n_j = counts_j and s_j = sum of the x assigned to j in the global batch (this rank's
    /// sums, summed over the ranks):
    ///   N_j = decay * N_j + (1 - decay) * n_j
    ///   m_j = decay * m_j + (1 - decay) * s_j
    ///   N'_j = (N_j + eps) / (sum_i N_i + K eps) * sum_i N_i     (Laplace smoothing)
    ///   e_j = m_j / N'_j
    /// An empty batch changes nothing. x (n,w) and codes (n) are this rank's.
    public func emaUpdate(
        codebook C: UnsafeMutablePointer<Float>, count: UnsafeMutablePointer<Float>, sum: UnsafeMutablePointer<Float>,
        x: UnsafePointer<Float>, codes: UnsafePointer<Int32>, globalCounts counts: [Float], n: Int, globalN: Int
    ) throws(PluginFailure) {
        guard globalN > 0 else { return }
        let d = width, decay = Double(decay), eps = Double(epsilon)
        // s_j (K,w): batch sums of the inputs per code, over every rank's rows.
        let sums = try host.scratchDoubles(k * d, "EMA batch sums")
        sums.update(repeating: 0, count: k * d)
        for t in 0..<n {
            let s = sums + Int(codes[t]) * d, xt = x + t * d
            for i in 0..<d { s[i] += Double(xt[i]) }
        }
        try host.allreduce(sums, count: k * d)
        var totalCount: Double = 0
        for j in 0..<k {
            let nj = decay * Double(count[j]) + (1 - decay) * Double(counts[j])
            count[j] = Float(nj)
            totalCount += Double(count[j])
            let m = sum + j * d, s = sums + j * d
            for i in 0..<d { m[i] = Float(decay * Double(m[i]) + (1 - decay) * s[i]) }
        }
        for j in 0..<k {
            let smoothed = (Double(count[j]) + eps) / (totalCount + Double(k) * eps) * totalCount
            guard smoothed > 0 else { continue }  // an all-zero count keeps its code
            let m = sum + j * d, e = C + j * d
            for i in 0..<d { e[i] = Float(Double(m[i]) / smoothed) }
        }
    }

    /// Dead-code restart (after the EMA update of a training forward): for j = 0..<K in order,
    /// when N_j < dead_code_threshold, draw a row t = next_u64 % N of the (global) batch rows x
    /// (N,w) from the host stream (seed, deadCodeStream ^ salt) and set e_j = x_t, m_j = x_t,
    /// N_j = 1. Returns how many codes were replaced (an empty batch replaces none).
    public func restartDeadCodes(
        codebook C: UnsafeMutablePointer<Float>, count: UnsafeMutablePointer<Float>, sum: UnsafeMutablePointer<Float>,
        x: UnsafePointer<Float>, n: Int, seed: UInt64
    ) throws(PluginFailure) -> Int {
        guard n > 0 else { return 0 }
        let d = width
        var r = host.rng(seed: seed, stream: Self.deadCodeStream ^ salt)
        var replaced = 0
        for j in 0..<k where count[j] < deadCodeThreshold {
            let t = Int(host.next(&r) % UInt64(n))
            (C + j * d).update(from: x + t * d, count: d)
            (sum + j * d).update(from: x + t * d, count: d)
            count[j] = 1
            replaced += 1
        }
        return replaced
    }

    /// Lloyd's k-means on the (global) batch rows x (N,w), written into the codebook.
    ///
    /// Initial centres: K distinct rows of x, chosen by a partial Fisher-Yates shuffle of the
    /// row indices with the host stream (seed, kmeansStream ^ salt): for j = 0..<min(K, N),
    /// p = j + next_u64 % (N - j), swap rows[j] and rows[p], c_j = x[rows[j]]. When N < K the
    /// codes j >= N start from their current codebook value.
    /// Then `kmeansIters` times: a_t = argmin_j ||x_t - c_j||^2 (ties -> lowest j);
    /// c_j = mean{x_t : a_t = j} (sums in double; an empty cluster keeps its centre). The loop
    /// stops early once an assignment repeats the previous one (the centres are then fixed).
    /// Finally e_j = c_j and, with EMA state (count, sum given), m_j = c_j, N_j = 1.
    /// `spherical` (rows of unit length, cosine codes): each new centre is the normalised mean,
    /// c_j = mean/‖mean‖, so the nearest centre by L2 is the nearest by cosine (spherical k-means).
    public func kmeans(
        codebook C: UnsafeMutablePointer<Float>, count: UnsafeMutablePointer<Float>?, sum: UnsafeMutablePointer<Float>?,
        x: UnsafePointer<Float>, n: Int, seed: UInt64, spherical: Bool = false
    ) throws(PluginFailure) {
        guard n > 0 else { return }
        let d = width
        let centres = try host.scratchFloats(k * d, "k-means centres")  // (K,w)
        centres.update(from: C, count: k * d)
        var r = host.rng(seed: seed, stream: Self.kmeansStream ^ salt)
        var rows = Array(0..<n)
        for j in 0..<min(k, n) {
            let p = j + Int(host.next(&r) % UInt64(n - j))
            rows.swapAt(j, p)
            (centres + j * d).update(from: x + rows[j] * d, count: d)
        }
        let assign = try host.scratchInts(n, "k-means assignment")  // (N)
        let previous = try host.scratchInts(n, "k-means assignment")  // (N)
        let sqError = try host.scratchDoubles(n, "k-means distances")
        let sums = try host.scratchDoubles(k * d, "k-means sums")  // (K,w)
        let counts = try host.scratchDoubles(k, "k-means counts")  // (K)
        for iter in 0..<kmeansIters {
            try host.nearestCodes(x: x, n: n, d: d, codebook: centres, k: k, codes: assign, sqError: sqError)
            if iter > 0 && (0..<n).allSatisfy({ assign[$0] == previous[$0] }) { break }
            previous.update(from: assign, count: n)
            sums.update(repeating: 0, count: k * d)
            counts.update(repeating: 0, count: k)
            for t in 0..<n {
                let j = Int(assign[t])
                let s = sums + j * d, xt = x + t * d
                for i in 0..<d { s[i] += Double(xt[i]) }
                counts[j] += 1
            }
            for j in 0..<k where counts[j] > 0 {
                let c = centres + j * d, s = sums + j * d
                var norm = 1.0
                if spherical {
                    norm = 0
                    for i in 0..<d { norm += s[i] * s[i] }
                    norm = norm.squareRoot() / counts[j]
                    guard norm > 0 else { continue }
                }
                for i in 0..<d { c[i] = Float(s[i] / counts[j] / norm) }
            }
        }
        C.update(from: centres, count: k * d)
        if let sum, let count {
            sum.update(from: centres, count: k * d)
            count.update(repeating: 1, count: k)
        }
    }
}

extension CodebookUpkeep {
    /// The upkeep hyperparameters a quantizer declares (ema, ema_decay, ema_epsilon, kmeans_init,
    /// kmeans_iters, dead_code_threshold), read and checked once for every quantizer that has them.
    public struct Settings {
        public let ema: Bool, decay: Float, epsilon: Float, kmeansInit: Bool, kmeansIters: Int, deadCodeThreshold: Float

        public init(_ hp: HyperValues, host: Host) throws(PluginFailure) {
            (ema, decay, epsilon) = (hp.bool("ema"), hp.float("ema_decay"), hp.float("ema_epsilon"))
            (kmeansInit, kmeansIters, deadCodeThreshold) = (
                hp.bool("kmeans_init"), hp.int("kmeans_iters"), hp.float("dead_code_threshold")
            )
            guard decay < 1 else { throw .invalid("ema_decay = \(decay) must be in [0, 1)") }
            guard deadCodeThreshold == 0 || ema else {
                throw .invalid(
                    "dead_code_threshold = \(deadCodeThreshold) needs ema = true: dead codes are found by their EMA "
                        + "counts (set ema = true, or dead_code_threshold = 0 to turn the restart off)")
            }
            if (kmeansInit || deadCodeThreshold > 0) && host.api.pointee.rng_next_u64 == nil {
                throw .invalid("host API table lacks rng_next_u64 (needed by kmeans_init / dead_code_threshold)")
            }
        }
    }
}
