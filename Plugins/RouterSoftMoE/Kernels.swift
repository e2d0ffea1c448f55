// softmoe kernels: the dispatch softmax (down each slot's column, within a group), the combine
// softmax (across the slots of a token), their backward, and the l2 normalisations of x and Phi.
import Glibc

/// For groups g in `groups`: D[t,j] = exp(L[t,j] - m_j) / sum_{t' in g} exp(L[t',j] - m_j),
/// m_j = max_{t in g} L[t,j] (a softmax down each column, within the group); colMax and colSum
/// (G,ES) are work space.
func dispatchSoftmax(
    _ logits: UnsafePointer<Float>, _ dispatch: UnsafeMutablePointer<Float>, colMax: UnsafeMutablePointer<Float>,
    colSum: UnsafeMutablePointer<Float>, groupSize tg: Int, es: Int, _ groups: Range<Int>
) {
    for g in groups {
        let m = colMax + g * es, sum = colSum + g * es
        m.update(repeating: -Float.infinity, count: es)
        sum.update(repeating: 0, count: es)
        for t in (g * tg)..<((g + 1) * tg) {
            let row = logits + t * es
            for j in 0..<es where row[j] > m[j] { m[j] = row[j] }
        }
        for t in (g * tg)..<((g + 1) * tg) {
            let row = logits + t * es, out = dispatch + t * es
            for j in 0..<es { let v = expf(row[j] - m[j]); out[j] = v; sum[j] += v }
        }
        for j in 0..<es { sum[j] = 1 / sum[j] }
        for t in (g * tg)..<((g + 1) * tg) {
            let out = dispatch + t * es
            for j in 0..<es { out[j] *= sum[j] }
        }
    }
}

/// For tokens t in `tokens`: C[t,:] = softmax(L[t,:]) over the E*S slots.
func combineSoftmax(
    _ logits: UnsafePointer<Float>, _ combine: UnsafeMutablePointer<Float>, es: Int, _ tokens: Range<Int>
) {
    for t in tokens {
        let row = logits + t * es, out = combine + t * es
        var m = row[0]
        for j in 1..<es where row[j] > m { m = row[j] }
        var sum: Float = 0
        for j in 0..<es { let v = expf(row[j] - m); out[j] = v; sum += v }
        let inv = 1 / sum
        for j in 0..<es { out[j] *= inv }
    }
}

/// For groups g in `groups`: dL[t,j] += D[t,j] (gD[t,j] - sum_{t' in g} D[t',j] gD[t',j]); dots
/// (G,ES) is work space.
func dispatchGrads(
    _ dlogits: UnsafeMutablePointer<Float>, _ dispatch: UnsafePointer<Float>, _ gradDispatch: UnsafePointer<Float>,
    dots: UnsafeMutablePointer<Float>, groupSize tg: Int, es: Int, _ groups: Range<Int>
) {
    for g in groups {
        let dot = dots + g * es
        dot.update(repeating: 0, count: es)
        for t in (g * tg)..<((g + 1) * tg) {
            let dr = dispatch + t * es, gr = gradDispatch + t * es
            for j in 0..<es { dot[j] += dr[j] * gr[j] }
        }
        for t in (g * tg)..<((g + 1) * tg) {
            let dr = dispatch + t * es, gr = gradDispatch + t * es, out = dlogits + t * es
            for j in 0..<es { out[j] += dr[j] * (gr[j] - dot[j]) }
        }
    }
}

/// For tokens t in `tokens`: dL[t,j] += C[t,j] (gC[t,j] - sum_j' C[t,j'] gC[t,j']).
func combineGrads(
    _ dlogits: UnsafeMutablePointer<Float>, _ combine: UnsafePointer<Float>, _ gradCombine: UnsafePointer<Float>,
    es: Int, _ tokens: Range<Int>
) {
    for t in tokens {
        let c = combine + t * es, g = gradCombine + t * es, out = dlogits + t * es
        var dot: Float = 0
        for j in 0..<es { dot += c[j] * g[j] }
        for j in 0..<es { out[j] += c[j] * (g[j] - dot) }
    }
}

/// v̂_i = v_i / r_i, r_i = sqrt(||v_i||^2 + 1e-12), for `count` rows of `width`.
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

/// Φ̂[:,j] = Φ[:,j] / ρ_j, ρ_j = sqrt(||Φ[:,j]||^2 + 1e-12), for the columns of a (rows, cols) matrix.
func normalizeColumns(
    _ v: UnsafePointer<Float>, rows: Int, cols: Int,
    _ out: UnsafeMutablePointer<Float>, _ norms: UnsafeMutablePointer<Float>
) {
    var ss = [Double](repeating: 0, count: cols)
    for i in 0..<rows { let row = v + i * cols; for j in 0..<cols { ss[j] += Double(row[j]) * Double(row[j]) } }
    for j in 0..<cols { norms[j] = Float((ss[j] + 1e-12).squareRoot()) }
    for i in 0..<rows {
        let row = v + i * cols, o = out + i * cols
        for j in 0..<cols { o[j] = Float(Double(row[j]) / (ss[j] + 1e-12).squareRoot()) }
    }
}
