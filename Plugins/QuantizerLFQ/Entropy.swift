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
@inline(__always) func sigmoid(_ a: Double) -> Double {
    if a >= 0 { return 1 / (1 + exp(-a)) }
    let e = exp(a)
    return e / (1 + e)
}

/// log p(c|z_t) = l0_t + Σ_{i : bit i of c} a_{t,i}.
@inline(__always) func codeLogProb(_ c: Int, _ at: UnsafePointer<Double>, _ l0: Double) -> Double {
    var lp = l0, m = c
    while m != 0 { lp += at[m.trailingZeroBitCount]; m &= m - 1 }
    return lp
}

/// Pointers for the batch-mean distribution loop (over codes, so each p̄_c is one ordered sum).
struct MeanProbJob {
    var a: UnsafeMutablePointer<Double>  // (N,b) bit logit gaps
    var l0: UnsafeMutablePointer<Double>  // (N) log p(code 0|z_t)
    var meanP: UnsafeMutablePointer<Double>  // (K) out: p̄_c
    var n: Int
    var b: Int
}

/// For codes [begin, end): p̄_c = (1/N) Σ_t exp(log p(c|z_t)).
func meanProbs(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: MeanProbJob.self).pointee
    for c in Int(begin)..<Int(end) {
        var s: Double = 0
        for t in 0..<job.n { s += exp(codeLogProb(c, job.a + t * job.b, job.l0[t])) }
        job.meanP[c] = s / Double(job.n)
    }
}

/// Pointers for the per-token entropy-gradient loop.
struct EntropyGradJob {
    var a: UnsafeMutablePointer<Double>  // (N,b)
    var l0: UnsafeMutablePointer<Double>  // (N)
    var weights: UnsafeMutablePointer<Double>  // (K) w_c = log p̄_c + H(p̄) (0 where p̄_c = 0)
    var grad: UnsafeMutablePointer<Double>  // (N,b) out: d(entropy loss)/d a
    var b: Int
    var k: Int
    var perSampleCoef: Double  // entropy_weight / N
    var diversityCoef: Double  // entropy_weight · gamma_div / N
}

/// For tokens [begin, end), with σ = σ(a_{t,i}):
///   d/da_{t,i} [(w/N) Σ_t H_t]   = (w/N) (−a σ (1 − σ))
///   d/da_{t,i} [−w gamma H(p̄)]  = (w gamma/N) Σ_c log p̄_c · p(c|z_t) (bit_i(c) − σ)
/// (dH/dp̄_c = −(log p̄_c + 1) and dp(c|z_t)/da_{t,i} = p(c|z_t)(bit_i(c) − σ); the constant
/// +1, and any constant shift of log p̄, drops out because Σ_c p(c|z_t)(bit_i(c) − σ) = 0, so
/// the centred weights w_c = log p̄_c + H(p̄) are used to keep the sum well conditioned.)
func entropyGrads(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: EntropyGradJob.self).pointee
    let b = job.b
    for t in Int(begin)..<Int(end) {
        let at = job.a + t * b, g = job.grad + t * b
        for i in 0..<b { g[i] = 0 }
        var total: Double = 0  // Σ_c w_c p(c|z_t); g[i] collects Σ_{c : bit i} w_c p(c|z_t)
        if job.diversityCoef != 0 {
            for c in 0..<job.k where job.weights[c] != 0 {
                let u = job.weights[c] * exp(codeLogProb(c, at, job.l0[t]))
                total += u
                var m = c
                while m != 0 { g[m.trailingZeroBitCount] += u; m &= m - 1 }
            }
        }
        for i in 0..<b {
            let s = sigmoid(at[i])
            g[i] = job.perSampleCoef * (-at[i] * s * (1 - s)) + job.diversityCoef * (g[i] - s * total)
        }
    }
}

extension LFQQuantizer {
    /// a (N,b) = (4 scale / tau) z and l0 (N) = −Σ_i softplus(a_{t,i}); returns Σ_t H(p(.|z_t)).
    func bitLogits(
        _ z: UnsafePointer<Float>, n: Int, a: UnsafeMutablePointer<Double>,
        l0: UnsafeMutablePointer<Double>
    ) -> Double {
        let b = nBits, gap = config.bitLogitScale
        var entropy: Double = 0
        for t in 0..<n {
            var l: Double = 0
            for i in 0..<b {
                let v = gap * Double(z[t * b + i])
                a[t * b + i] = v
                let sp = softplus(v)
                l -= sp
                entropy += sp - v * sigmoid(v)
            }
            l0[t] = l
        }
        return entropy
    }

    /// mean_t H(p(.|z_t)) and H(p̄), and the centred weights w (K) the backward needs:
    /// w_c = log p̄_c + H(p̄) where p̄_c > 0, else 0.
    func entropyForward(
        _ z: UnsafePointer<Float>, n: Int,
        weights: UnsafeMutablePointer<Double>
    ) throws(PluginFailure) -> (perSample: Double, codebook: Double) {
        let k = nCodes, b = nBits
        weights.update(repeating: 0, count: k)
        guard n > 0 else { return (0, 0) }
        let a = try host.scratchDoubles(n * b, "bit logits")
        let l0 = try host.scratchDoubles(n, "code-0 log-probabilities")
        let perSample = bitLogits(z, n: n, a: a, l0: l0) / Double(n)
        let meanP = try host.scratchDoubles(k, "batch-mean code distribution")
        host.parallelFor(
            k, grain: max(1, 65536 / (n * b + 1)), MeanProbJob(a: a, l0: l0, meanP: meanP, n: n, b: b), meanProbs)
        var codebook: Double = 0
        for c in 0..<k where meanP[c] > 0 { codebook -= meanP[c] * log(meanP[c]) }
        for c in 0..<k where meanP[c] > 0 { weights[c] = log(meanP[c]) + codebook }
        return (perSample, codebook)
    }

    /// grad (N,b) = d/dz [entropy_weight (mean_t H_t − gamma_div H(p̄))], from the saved z
    /// and weights (see `entropyGrads`), times the chain factor 4 scale / tau.
    func entropyBackward(
        _ z: UnsafePointer<Float>, n: Int, weights: UnsafeMutablePointer<Double>,
        grad: UnsafeMutablePointer<Double>
    ) throws(PluginFailure) {
        let k = nCodes, b = nBits
        let a = try host.scratchDoubles(n * b, "bit logits")
        let l0 = try host.scratchDoubles(n, "code-0 log-probabilities")
        _ = bitLogits(z, n: n, a: a, l0: l0)
        let w = config.entropyWeight / Double(n)
        host.parallelFor(
            n, grain: max(1, 65536 / (k * b + 1)),
            EntropyGradJob(
                a: a, l0: l0, weights: weights, grad: grad, b: b, k: k,
                perSampleCoef: w, diversityCoef: w * config.diversityGamma), entropyGrads)
        let gap = config.bitLogitScale
        for i in 0..<(n * b) { grad[i] *= gap }
    }
}
