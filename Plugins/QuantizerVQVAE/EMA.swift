// The EMA codebook update (van den Oord et al. 2017, appendix A.1), with Laplace smoothing.
import PluginKit
import VQMoEABI

extension VQVAEQuantizer {
    /// With n_j = counts_j and s_j = sum of the x assigned to j in this batch:
    ///   N_j = decay * N_j + (1 - decay) * n_j
    ///   m_j = decay * m_j + (1 - decay) * s_j
    ///   N'_j = (N_j + eps) / (sum_i N_i + K eps) * sum_i N_i     (Laplace smoothing)
    ///   e_j = m_j / N'_j
    /// An empty batch changes nothing.
    func emaUpdate(x: UnsafePointer<Float>, codes: UnsafePointer<Int32>, counts: UnsafePointer<Float>,
                   n: Int) throws(PluginFailure) {
        guard n > 0, let emaCount, let emaSum else { return }
        let C = try boundCodebook()
        let d = dModel, k = nCodes
        let decay = Double(config.emaDecay), eps = Double(config.emaEpsilon)
        // s_j (K,d): batch sums of the inputs per code.
        let sums = try host.scratchDoubles(k * d, "EMA batch sums")
        sums.update(repeating: 0, count: k * d)
        for t in 0..<n {
            let s = sums + Int(codes[t]) * d, xt = x + t * d
            for i in 0..<d { s[i] += Double(xt[i]) }
        }
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
