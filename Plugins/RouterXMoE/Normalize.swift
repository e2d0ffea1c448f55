// The L2 row normalisation of the token projections and the expert embeddings, and its backward.

/// Norms below this are clamped (as F.normalize's eps): u = h / max(||h||, eps).
let normEps: Float = 1e-4

/// For `rows` of src (·,cols): norm_r = ||src_r||, unit_r = src_r / max(norm_r, eps).
func normalizeRows(
    _ src: UnsafePointer<Float>, _ unit: UnsafeMutablePointer<Float>, _ norms: UnsafeMutablePointer<Float>,
    cols c: Int, _ rows: Range<Int>
) {
    for r in rows {
        let s = src + r * c, u = unit + r * c
        var sq: Float = 0
        for i in 0..<c { sq += s[i] * s[i] }
        let norm = sq.squareRoot()
        norms[r] = norm
        let inv = 1 / (norm >= normEps ? norm : normEps)
        for i in 0..<c { u[i] = s[i] * inv }
    }
}

/// For `rows`, the backward of unit = src / max(||src||, eps), in place (d/d unit in, d/d src out):
///   ||src|| >= eps:  d src = (d unit - unit (unit . d unit)) / ||src||
///   ||src|| <  eps:  d src = d unit / eps   (the clamped norm is a constant)
func normalizeGrads(
    _ grad: UnsafeMutablePointer<Float>, _ unit: UnsafePointer<Float>, _ norms: UnsafePointer<Float>,
    cols c: Int, _ rows: Range<Int>
) {
    for r in rows {
        let g = grad + r * c, u = unit + r * c
        let norm = norms[r]
        if norm >= normEps {
            var dot: Float = 0
            for i in 0..<c { dot += u[i] * g[i] }
            let inv = 1 / norm
            for i in 0..<c { g[i] = (g[i] - u[i] * dot) * inv }
        } else {
            let inv = 1 / normEps
            for i in 0..<c { g[i] *= inv }
        }
    }
}
