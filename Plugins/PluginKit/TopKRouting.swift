// Top-k routing kernels shared by the linear-score routers (smoe, xmoe, smoe_dropout): the
// per-token top-k with a softmax over the kept scores (and the full softmax for the Switch
// balance loss), and their backward. Run on the host's pool through Host.parallelFor.
import Glibc
import VQMoEABI

/// Pointers for the per-token routing loop (run on the host's pool).
public struct RouteJob {
    public var logits: UnsafeMutablePointer<Float>  // (N,E)
    public var probs: UnsafeMutablePointer<Float>?  // (N,E), nil = not needed
    public var index: UnsafeMutablePointer<Int32>  // (N,k)
    public var gates: UnsafeMutablePointer<Float>  // (N,k)
    public var e: Int
    public var k: Int
    public init(
        logits: UnsafeMutablePointer<Float>, probs: UnsafeMutablePointer<Float>?, index: UnsafeMutablePointer<Int32>,
        gates: UnsafeMutablePointer<Float>, e: Int, k: Int
    ) {
        self.logits = logits
        self.probs = probs
        self.index = index
        self.gates = gates
        self.e = e
        self.k = k
    }
}

/// For tokens [begin, end): the top-k of l_t (ties -> lower expert index, written in
/// descending-logit order); g_t = softmax of the kept logits; p_t = softmax(l_t) over all
/// E experts when a balance loss needs it.
public func routeTokens(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: RouteJob.self).pointee
    let e = job.e, k = job.k
    for t in Int(begin)..<Int(end) {
        let row = job.logits + t * e
        let idx = job.index + t * k, g = job.gates + t * k
        // Top-k by insertion: a later expert only displaces a strictly smaller logit.
        var count = 0
        for j in 0..<e {
            let v = row[j]
            var pos: Int
            if count < k {
                pos = count
                count += 1
            } else {
                guard v > row[Int(idx[k - 1])] else { continue }
                pos = k - 1
            }
            while pos > 0 && row[Int(idx[pos - 1])] < v {
                idx[pos] = idx[pos - 1]
                pos -= 1
            }
            idx[pos] = Int32(j)
        }
        // g_s = exp(l_s - l_max) / sum over kept.
        let top = row[Int(idx[0])]
        var sum: Float = 0
        for s in 0..<k { let v = expf(row[Int(idx[s])] - top); g[s] = v; sum += v }
        let inv = 1 / sum
        for s in 0..<k { g[s] *= inv }
        // Full softmax p_tj (top is the row max).
        if let probs = job.probs {
            let p = probs + t * e
            var total: Float = 0
            for j in 0..<e { let v = expf(row[j] - top); p[j] = v; total += v }
            let invTotal = 1 / total
            for j in 0..<e { p[j] *= invTotal }
        }
    }
}

/// Pointers for the per-token dlogits loop.
public struct LogitGradJob {
    public var dlogits: UnsafeMutablePointer<Float>  // (N,E), zeroed
    public var gradWeights: UnsafeMutablePointer<Float>?  // (N,k), nil = zero
    public var gates: UnsafeMutablePointer<Float>  // (N,k)
    public var index: UnsafeMutablePointer<Int32>  // (N,k)
    public var probs: UnsafeMutablePointer<Float>?  // (N,E), with balanceCoef
    public var balanceCoef: UnsafeMutablePointer<Float>?  // (E) c_e, nil = no balance gradient
    public var e: Int
    public var k: Int
    /// The weights are the kept experts' full-softmax probabilities g_s = p_{i_s} (Switch /
    /// GShard), not the softmax over the kept logits; needs probs.
    public var fullSoftmaxGates: Bool
    public init(
        dlogits: UnsafeMutablePointer<Float>, gradWeights: UnsafeMutablePointer<Float>?,
        gates: UnsafeMutablePointer<Float>, index: UnsafeMutablePointer<Int32>, probs: UnsafeMutablePointer<Float>?,
        balanceCoef: UnsafeMutablePointer<Float>?, e: Int, k: Int,
        fullSoftmaxGates: Bool = false
    ) {
        self.fullSoftmaxGates = fullSoftmaxGates
        self.dlogits = dlogits
        self.gradWeights = gradWeights
        self.gates = gates
        self.index = index
        self.probs = probs
        self.balanceCoef = balanceCoef
        self.e = e
        self.k = k
    }
}

/// For tokens [begin, end):
///   kept softmax:  dl_{t,i_s} += g_s (dg_s - sum_r g_r dg_r)
///   full softmax (g_s = p_{t,i_s}):  dl_{t,j} += sum_s dg_s p_{t,i_s} (delta_{j,i_s} - p_tj)
///   balance loss:  with c_e = d aux / d p_te = grad_aux * balance_weight * E * f_e / N,
///                  dl_{t,j} += p_tj (c_j - sum_e p_te c_e)
public func logitGrads(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: LogitGradJob.self).pointee
    let e = job.e, k = job.k
    for t in Int(begin)..<Int(end) {
        let dl = job.dlogits + t * e
        if let gw = job.gradWeights, job.fullSoftmaxGates, let probs = job.probs {
            let p = probs + t * e, dg = gw + t * k, idx = job.index + t * k
            var dot: Float = 0
            for s in 0..<k { let i = Int(idx[s]); dot += dg[s] * p[i]; dl[i] += dg[s] * p[i] }
            for j in 0..<e { dl[j] -= p[j] * dot }
        } else if let gw = job.gradWeights {
            let g = job.gates + t * k, dg = gw + t * k, idx = job.index + t * k
            var dot: Float = 0
            for s in 0..<k { dot += g[s] * dg[s] }
            for s in 0..<k { dl[Int(idx[s])] += g[s] * (dg[s] - dot) }
        }
        if let c = job.balanceCoef, let probs = job.probs {
            let p = probs + t * e
            var dot: Float = 0
            for j in 0..<e { dot += p[j] * c[j] }
            for j in 0..<e { dl[j] += p[j] * (c[j] - dot) }
        }
    }
}

/// What a top-k routing forward keeps for its backward: the choices, weights, full softmax and
/// the assignment fractions f_e (constants for the gradient).
public final class TopKRoutingState {
    public let n: Int, e: Int, k: Int
    public let index: UnsafeMutablePointer<Int32>, gates: UnsafeMutablePointer<Float>
    public let probs: UnsafeMutablePointer<Float>?, fraction: UnsafeMutablePointer<Float>
    public let fullSoftmax: Bool
    /// Tokens of the global batch (every rank's; n in one process): f_e and P_e are its means.
    public var globalN: Int

    init(n: Int, e: Int, k: Int, probs: Bool, fullSoftmax: Bool) {
        (self.n, self.e, self.k, self.fullSoftmax, globalN) = (n, e, k, fullSoftmax, n)
        index = .allocate(capacity: max(n * k, 1))
        gates = .allocate(capacity: max(n * k, 1))
        self.probs = probs ? .allocate(capacity: max(n * e, 1)) : nil
        fraction = .allocate(capacity: max(e, 1))
    }

    deinit {
        index.deallocate()
        gates.deallocate()
        probs?.deallocate()
        fraction.deallocate()
    }
}

/// Top-k routing over scores (N,E) with the Switch balance loss, shared by the linear-score
/// routers (smoe, xmoe, smoe_dropout):
///
///     index_t = top-k of s_t (ties -> lower expert),  w_t = softmax over the kept scores
///               (fullSoftmax: the kept experts' probabilities p_{t,i} under softmax(s_t))
///     load_e = assignments to e,  f_e = load_e / (N k),  P_e = mean_t softmax(s_t)_e
///     aux = balance_weight · E · Σ_e f_e P_e
///
/// f_e and P_e are means over the global batch: in a data-parallel run the counts and
/// probability sums are summed over the ranks (`Host.allreduce`), so aux is the single-process
/// value on every rank and the backward gives its derivative for this rank's tokens (the routers
/// declare VQMOE_PLUGIN_GLOBAL_BATCH).
///
/// ```swift
/// let (aux, state) = try TopKRouting.forward(host, scores: s, n: n, e: e, k: k, io: io, balanceWeight: 0.01,
///                                             fullSoftmax: false, save: step.savesContext)
/// let dscores = try TopKRouting.backward(host, state!, gradWeights: g.gradWeights, gradAux: g.gradAux, balanceWeight: 0.01)
/// ```
public enum TopKRouting {
    public static func forward(
        _ host: Host, scores: UnsafeMutablePointer<Float>, n: Int, e: Int, k: Int, io: RouterForward,
        balanceWeight: Float,
        needProbs: Bool = true, fullSoftmax: Bool = false, save: Bool
    ) throws(PluginFailure) -> (aux: Float, state: TopKRoutingState?) {
        let index = io.index!, gates = io.weights!, load = io.load
        let state = save ? TopKRoutingState(n: n, e: e, k: k, probs: needProbs, fullSoftmax: fullSoftmax) : nil
        var probs = state?.probs
        if needProbs && probs == nil { probs = try host.scratchFloats(n * e, "router probabilities") }
        host.parallelFor(
            n, grain: max(1, 4096 / (e + 1)),
            RouteJob(logits: scores, probs: probs, index: index, gates: gates, e: e, k: k),
            routeTokens)
        if fullSoftmax, let probs {
            for t in 0..<n { for s in 0..<k { gates[t * k + s] = probs[t * e + Int(index[t * k + s])] } }
        }
        load.update(repeating: 0, count: e)
        for i in 0..<(n * k) { load[Int(index[i])] += 1 }
        var aux: Double = 0
        // Global counts (E), probability sums (E) and tokens: one allreduce (a no-op in one process).
        var stats = (0..<e).map { Double(load[$0]) } + [Double](repeating: 0, count: e) + [Double(n)]
        if let probs {
            for t in 0..<n { let p = probs + t * e; for j in 0..<e { stats[e + j] += Double(p[j]) } }
            try host.allreduce(&stats)
        }
        let globalN = Int(stats[2 * e])
        if probs != nil, globalN > 0 {
            let assignments = Double(globalN * k)
            for j in 0..<e { aux += stats[j] / assignments * (stats[e + j] / Double(globalN)) }
            aux *= Double(balanceWeight) * Double(e)
        }
        if let state {
            state.index.update(from: index, count: n * k)
            state.gates.update(from: gates, count: n * k)
            state.globalN = globalN
            for j in 0..<e { state.fraction[j] = globalN > 0 ? Float(stats[j] / Double(globalN * k)) : 0 }
        }
        return (Float(aux), state)
    }

    /// dL/d scores (N,E), scratch memory, from dL/d weights and dL/d aux; nil when nothing flows back.
    public static func backward(
        _ host: Host, _ s: TopKRoutingState, gradWeights: UnsafePointer<Float>?, gradAux: Float, balanceWeight: Float
    ) throws(PluginFailure) -> UnsafeMutablePointer<Float>? {
        let n = s.n, e = s.e, k = s.k
        var balanceCoef: UnsafeMutablePointer<Float>? = nil
        if gradAux != 0 && balanceWeight != 0 && n > 0 && s.probs != nil {
            let c = try host.scratchFloats(e, "balance-loss coefficients")
            let scale = gradAux * balanceWeight * Float(e) / Float(s.globalN)
            for j in 0..<e { c[j] = scale * s.fraction[j] }
            balanceCoef = c
        }
        // With k = 1 the kept softmax's weight is the constant 1: no gradient from the weights.
        let weightsMatter = gradWeights != nil && (k > 1 || s.fullSoftmax)
        guard weightsMatter || balanceCoef != nil else { return nil }
        let dscores = try host.scratchFloats(n * e, "router score gradients")
        dscores.update(repeating: 0, count: n * e)
        host.parallelFor(
            n, grain: max(1, 4096 / (e + 1)),
            LogitGradJob(
                dlogits: dscores, gradWeights: weightsMatter ? UnsafeMutablePointer(mutating: gradWeights) : nil,
                gates: s.gates, index: s.index, probs: s.probs, balanceCoef: balanceCoef, e: e, k: k,
                fullSoftmaxGates: s.fullSoftmax),
            logitGrads)
        return dscores
    }
}
