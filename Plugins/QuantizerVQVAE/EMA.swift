// The EMA codebook update (van den Oord et al. 2017, appendix A.1), with Laplace smoothing,
// and the dead-code restart that follows it (Dhariwal et al. 2020, Jukebox; Zeghidour et al.
// 2021, SoundStream: codes whose EMA usage falls below a threshold restart from batch vectors).
import PluginKit
import VQMoEABI

extension VQVAE {
    /// With n_j = counts_j and s_j = sum of the x assigned to j in the global batch (this rank's
    /// sums, summed over the ranks):
    ///   N_j = decay * N_j + (1 - decay) * n_j
    ///   m_j = decay * m_j + (1 - decay) * s_j
    ///   N'_j = (N_j + eps) / (sum_i N_i + K eps) * sum_i N_i     (Laplace smoothing)
    ///   e_j = m_j / N'_j
    /// An empty batch changes nothing.
    func emaUpdate(
        x: UnsafePointer<Float>, codes: UnsafePointer<Int32>, globalCounts counts: [Float], n: Int, globalN: Int
    ) throws(PluginFailure) {
        guard globalN > 0, let emaCount, let emaSum else { return }
        let C = codebook!

        let decay = Double(emaDecay), eps = Double(emaEpsilon)
        // s_j (K,d): batch sums of the inputs per code, over every rank's rows.
        let sums = try host.scratchDoubles(k * d, "EMA batch sums")
        sums.update(repeating: 0, count: k * d)
        for t in 0..<n {
            let s = sums + Int(codes[t]) * d, xt = x + t * d
            for i in 0..<d { s[i] += Double(xt[i]) }
        }
        try host.allreduce(sums, count: k * d)
        var totalCount: Double = 0
        for j in 0..<k {
            let nj = decay * Double(emaCount[j]) + (1 - decay) * Double(counts[j])
            emaCount[j] = Float(nj)
            totalCount += Double(emaCount[j])
            let m = emaSum + j * d, s = sums + j * d
            for i in 0..<d { m[i] = Float(decay * Double(m[i]) + (1 - decay) * s[i]) }
        }
        for j in 0..<k {
            let smoothed = (Double(emaCount[j]) + eps) / (totalCount + Double(k) * eps) * totalCount
            guard smoothed > 0 else { continue }  // an all-zero count keeps its code
            let m = emaSum + j * d, e = C + j * d
            for i in 0..<d { e[i] = Float(Double(m[i]) / smoothed) }
        }
    }
}

extension VQVAE {
    /// Host stream of the dead-code restart rows: rng_init(step seed, deadCodeStream).
    static let deadCodeStream: UInt64 = 0x6465_6164_636F_6465  // "deadcode"

    /// Dead-code restart (after the EMA update of a training forward): for j = 0..<K in order,
    /// when N_j < dead_code_threshold, draw a row t = next_u64 % N of the batch from the host
    /// stream (seed, deadCodeStream) and set e_j = x_t, m_j = x_t, N_j = 1. Returns how many
    /// codes were replaced (an empty batch replaces none).
    func restartDeadCodes(x: UnsafePointer<Float>, n: Int, seed: UInt64) throws(PluginFailure) -> Int {
        guard n > 0, let emaCount, let emaSum else { return 0 }
        let C = codebook!
        var r = host.rng(seed: seed, stream: Self.deadCodeStream)
        var replaced = 0
        for j in 0..<k where emaCount[j] < deadCodeThreshold {
            let t = Int(host.next(&r) % UInt64(n))
            (C + j * d).update(from: x + t * d, count: d)
            (emaSum + j * d).update(from: x + t * d, count: d)
            emaCount[j] = 1
            replaced += 1
        }
        return replaced
    }
}
