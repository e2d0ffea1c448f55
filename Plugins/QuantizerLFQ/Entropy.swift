// The entropy terms of the LFQ loss (MAGVIT-v2 §3.1), exact, in double precision.
//
// p(c|z) = softmax_c(2 z·code_c / tau) over all K = 2^b codes, code_c = scale·(2 bit(c) − 1).
// It factorises over the bits: with the bit logit gap a_i = (4 scale / tau) z_i,
//   log p(c|z) = l0 + Σ_{i : bit i of c} a_i,   l0 = −Σ_i softplus(a_i)  (= log p(code 0|z)),
// so p(bit i = 1|z) = σ(a_i) and the per-sample entropy is a sum over bits,
//   H(p(.|z)) = Σ_i h(σ(a_i)),   h(σ(a)) = softplus(a) − a σ(a).
// The codebook entropy H(p̄), p̄ = mean_t p(.|z_t), does not factorise: it sums over the K codes.
import Glibc
import PluginKit
import VQMoEABI

/// log(1 + e^a) without overflow.
@inline(__always) func softplus(_ a: Double) -> Double { a > 0 ? a + log1p(exp(-a)) : log1p(exp(a)) }

/// 1 / (1 + e^−a) without overflow.
@inline(__always) func sigmoid(_ a: Double) -> Double { a >= 0 ? 1 / (1 + exp(-a)) : exp(a) / (1 + exp(a)) }

/// log p(c|z_t) = l0_t + Σ_{i : bit i of c} a_{t,i}.
@inline(__always) func codeLogProb(_ c: Int, _ at: UnsafePointer<Double>, _ l0: Double) -> Double {
    var lp = l0, m = c
    while m != 0 { lp += at[m.trailingZeroBitCount]; m &= m - 1 }
    return lp
}

extension LFQQuantizer {
    /// a (N,b) = (4 scale / tau) z and l0 (N) = −Σ_i softplus(a_{t,i}), in host scratch; and Σ_t H(p(.|z_t)).
    func bitLogits(
        _ z: UnsafePointer<Float>, n: Int
    ) throws(PluginFailure) -> (
        a: UnsafeMutablePointer<Double>, l0: UnsafeMutablePointer<Double>, entropy: Double
    ) {
        let b = nBits, a = try host.scratchDoubles(n * b, "bit logits")
        let l0 = try host.scratchDoubles(n, "code-0 log-probabilities")
        var entropy: Double = 0
        for t in 0..<n {
            l0[t] = 0
            for i in 0..<b {
                let v = bitLogitScale * Double(z[t * b + i]), sp = softplus(v)
                (a[t * b + i], l0[t], entropy) = (v, l0[t] - sp, entropy + sp - v * sigmoid(v))
            }
        }
        return (a, l0, entropy)
    }

    /// mean_t H(p(.|z_t)) and H(p̄), and the centred weights w (K) the backward needs:
    /// w_c = log p̄_c + H(p̄) where p̄_c > 0, else 0. p̄_c = (1/N) Σ_t exp(log p(c|z_t)), one
    /// ordered sum per code. The means are over the global batch (N: every rank's tokens): one
    /// allreduce sums the entropies, Σ_t p(c|z_t), the commitment's squared errors `sse` and the
    /// code `counts` (K) of every rank, which come back as the global batch's.
    func entropyForward(
        _ z: UnsafePointer<Float>, n: Int, sse: Double, counts: UnsafePointer<Float>,
        weights: UnsafeMutablePointer<Double>
    ) throws(PluginFailure) -> (perSample: Double, codebook: Double, sse: Double, counts: [Float], globalN: Int) {
        let k = nCodes, b = nBits
        weights.update(repeating: 0, count: k)
        let (a, l0, entropy) = try bitLogits(z, n: n)
        // sums: [Σ_t H_t, sse, N, Σ_t p(c|z_t) (K), counts (K)]
        var sums = [Double](repeating: 0, count: 3 + 2 * k)
        (sums[0], sums[1], sums[2]) = (entropy, sse, Double(n))
        sums.withUnsafeMutableBufferPointer { out in
            let p = out.baseAddress! + 3
            host.parallelFor(k, grain: max(1, 65536 / (n * b + 1))) { begin, end in
                for c in begin..<end {
                    var s: Double = 0
                    for t in 0..<n { s += exp(codeLogProb(c, a + t * b, l0[t])) }
                    p[c] = s
                }
            }
            for c in 0..<k { p[k + c] = Double(counts[c]) }
        }
        try host.allreduce(&sums)
        let globalN = Int(sums[2]), counts = sums[(3 + k)...].map(Float.init)
        guard globalN > 0 else { return (0, 0, 0, counts, 0) }
        var codebook: Double = 0
        for c in 0..<k where sums[3 + c] > 0 { let p = sums[3 + c] / Double(globalN); codebook -= p * log(p) }
        for c in 0..<k where sums[3 + c] > 0 { weights[c] = log(sums[3 + c] / Double(globalN)) + codebook }
        return (sums[0] / Double(globalN), codebook, sums[1], counts, globalN)
    }

    /// grad (N,b) = d/dz [entropy_weight (mean_t H_t − gamma_div H(p̄))], from the saved z and
    /// weights, for this rank's N tokens of a global batch of `globalN`. With σ = σ(a_{t,i}), w = entropy_weight:
    ///   d/da_{t,i} [(w/N) Σ_t H_t]   = (w/N) (−a σ (1 − σ))
    ///   d/da_{t,i} [−w gamma H(p̄)]  = (w gamma/N) Σ_c log p̄_c · p(c|z_t) (bit_i(c) − σ)
    /// (dH/dp̄_c = −(log p̄_c + 1) and dp(c|z_t)/da_{t,i} = p(c|z_t)(bit_i(c) − σ); the constant
    /// +1, and any constant shift of log p̄, drops out because Σ_c p(c|z_t)(bit_i(c) − σ) = 0, so
    /// the centred weights w_c = log p̄_c + H(p̄) keep the sum well conditioned), times the chain
    /// factor da/dz = 4 scale / tau.
    func entropyBackward(
        _ z: UnsafePointer<Float>, n: Int, globalN: Int, weights: UnsafePointer<Double>,
        grad: UnsafeMutablePointer<Double>
    ) throws(PluginFailure) {
        let k = nCodes, b = nBits, (a, l0, _) = try bitLogits(z, n: n), gap = bitLogitScale
        let perSample = entropyWeight / Double(globalN), diversity = perSample * diversityGamma
        host.parallelFor(n, grain: max(1, 65536 / (k * b + 1))) { begin, end in
            for t in begin..<end {
                let at = a + t * b, g = grad + t * b
                g.update(repeating: 0, count: b)
                var total: Double = 0  // Σ_c w_c p(c|z_t); g[i] collects Σ_{c : bit i} w_c p(c|z_t)
                for c in 0..<k where diversity != 0 && weights[c] != 0 {
                    let u = weights[c] * exp(codeLogProb(c, at, l0[t]))
                    total += u
                    var m = c
                    while m != 0 { g[m.trailingZeroBitCount] += u; m &= m - 1 }
                }
                for i in 0..<b {
                    let s = sigmoid(at[i])
                    g[i] = gap * (perSample * (-at[i] * s * (1 - s)) + diversity * (g[i] - s * total))
                }
            }
        }
    }
}
