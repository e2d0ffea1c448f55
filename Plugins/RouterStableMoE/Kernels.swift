// stablemoe kernels: row normalisation, argmax and softmax, the per-token routing loop and the
// per-token score gradients (both run on the host's pool).
import Glibc

/// ê_i = v_i / r_i, r_i = sqrt(||v_i||^2 + 1e-12), for the `count` rows of `width` of v.
func normalizeRows(
    _ v: UnsafePointer<Float>, count: Int, width: Int,
    _ out: UnsafeMutablePointer<Float>, _ norms: UnsafeMutablePointer<Float>
) {
    for i in 0..<count {
        let row = v + i * width, o = out + i * width
        var ss: Double = 0
        for j in 0..<width { ss += Double(row[j]) * Double(row[j]) }
        let r = (ss + 1e-12).squareRoot()
        norms[i] = Float(r)
        for j in 0..<width { o[j] = Float(Double(row[j]) / r) }
    }
}

/// Index of the largest of `count` values (ties -> the lower index).
@inline(__always) func argmax(_ row: UnsafePointer<Float>, _ count: Int) -> Int {
    var best = 0
    for j in 1..<max(count, 1) where row[j] > row[best] { best = j }
    return best
}

/// Softmax of `count` values into `out`; returns log(sum exp) of the row.
@inline(__always) func softmax(_ row: UnsafePointer<Float>, _ count: Int, _ out: UnsafeMutablePointer<Float>) -> Float {
    var m = row[0]
    for j in 1..<count where row[j] > m { m = row[j] }
    var sum: Float = 0
    for j in 0..<count { let v = expf(row[j] - m); out[j] = v; sum += v }
    let inv = 1 / sum
    for j in 0..<count { out[j] *= inv }
    return m + logf(sum)
}

/// Pointers for the per-token routing loop.
struct Route {
    var scores: UnsafeMutablePointer<Float>  // (N,E) s
    var distilled: UnsafeMutablePointer<Float>?  // (N,E) z, when computed
    var table: UnsafeMutablePointer<Int32>?  // (V) frozen stage-2 experts, when used
    var ids: UnsafePointer<Int32>?  // (N)
    var stage: Int
    var index: UnsafeMutablePointer<Int32>  // (N)
    var gate: UnsafeMutablePointer<Float>  // (N)
    var probs: UnsafeMutablePointer<Float>?  // (N,E) softmax(s), stage 1
    var q: UnsafeMutablePointer<Float>?  // (N,E) softmax(z), stage 1 with distill
    var ce: UnsafeMutablePointer<Float>?  // (N) -log q_{t,a_t}, stage 1 with distill
    var agree: UnsafeMutablePointer<Float>?  // (N) 1 when the distilled choice = argmax s
    var e: Int

    /// For `tokens`:
    ///   stage 1: a_t = argmax_e s_te;  stage 2: a_t = table[id_t] or argmax_e z_te
    ///   g_t = sigmoid(s_{t,a_t}) (the paper's gate); p_t = softmax(s_t); q_t = softmax(z_t),
    ///   ce_t = logsumexp(z_t) - z_{t,a_t}; agree_t = [distilled choice == argmax s_t].
    func run(_ tokens: Range<Int>) {
        for t in tokens {
            let s = scores + t * e
            let sArg = argmax(s, e)
            var dArg = -1
            if let table, let ids {
                dArg = Int(table[Int(ids[t])])
            } else if let z = distilled {
                dArg = argmax(z + t * e, e)
            }
            let a = stage == 1 ? sArg : dArg
            index[t] = Int32(a)
            gate[t] = 1 / (1 + expf(-s[a]))
            if let p = probs { _ = softmax(s, e, p + t * e) }
            if let q, let z = distilled, let ce {
                let lse = softmax(z + t * e, e, q + t * e)
                ce[t] = lse - z[t * e + a]
            }
            agree?[t] = dArg == sArg ? 1 : 0
        }
    }
}

/// For `tokens`:
///   gate:     ds_{t,a_t} += dg_t * g_t (1 - g_t)
///   balance:  with c_e = d aux / d p_te = grad_aux * balance_weight * E * f_e / N,
///             ds_{t,j} += p_tj (c_j - sum_e p_te c_e)
func scoreGrads(
    _ ds: UnsafeMutablePointer<Float>, gradWeights: UnsafePointer<Float>?, gate: UnsafePointer<Float>,
    index: UnsafePointer<Int32>, probs: UnsafePointer<Float>, balanceCoef: UnsafePointer<Float>?, e: Int,
    _ tokens: Range<Int>
) {
    for t in tokens {
        let row = ds + t * e
        if let gw = gradWeights {
            let g = gate[t]
            row[Int(index[t])] += gw[t] * g * (1 - g)
        }
        if let c = balanceCoef {
            let p = probs + t * e
            var dot: Float = 0
            for j in 0..<e { dot += p[j] * c[j] }
            for j in 0..<e { row[j] += p[j] * (c[j] - dot) }
        }
    }
}
