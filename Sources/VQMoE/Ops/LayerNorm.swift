/// Layer normalisation over the last dimension (eps 1e-5, as torch.nn.LayerNorm).
///
///     forward   y = (x − μ)·rstd·γ + β,  rstd = 1/√(σ² + ε); saves μ, rstd (N)
///     backward  x̂ = (x − μ)·rstd, g = dy·γ:
///               dx += rstd·(g − mean(g) − x̂·mean(g·x̂));  dγ += Σ dy·x̂;  dβ += Σ dy
///
/// ```swift
/// LayerNorm.forward(out: y, mean: mu, rstd: rs, inp: x, weight: g, bias: b, n: N, c: C)
/// ```
public enum LayerNorm {
    public static let eps: Float = 1e-5

    public static func forward(
        out: UnsafeMutablePointer<Float>, mean: UnsafeMutablePointer<Float>, rstd: UnsafeMutablePointer<Float>,
        inp: UnsafePointer<Float>, weight: UnsafePointer<Float>, bias: UnsafePointer<Float>, n: Int, c: Int
    ) {
        nonisolated(unsafe) let (out, mean, rstd) = (out, mean, rstd)
        HostRuntime.parallelFor(Int64(n), grain: 16) { b, e in
            for r in Int(b)..<Int(e) {
                let x = inp + r * c, y = out + r * c
                let m = Vec.sum(x, c) / Float(c)
                var v: Float = 0
                for i in 0..<c { let d = x[i] - m; v += d * d }
                let s = 1 / (v / Float(c) + eps).squareRoot()
                for i in 0..<c { y[i] = (x[i] - m) * s * weight[i] + bias[i] }
                mean[r] = m
                rstd[r] = s
            }
        }
    }

    /// Accumulates into dinp, dweight, dbias. dweight/dbias reductions run serially in row order
    /// so results do not depend on the thread count.
    public static func backward(
        dinp: UnsafeMutablePointer<Float>, dweight: UnsafeMutablePointer<Float>?, dbias: UnsafeMutablePointer<Float>?,
        dout: UnsafePointer<Float>, inp: UnsafePointer<Float>, weight: UnsafePointer<Float>,
        mean: UnsafePointer<Float>, rstd: UnsafePointer<Float>, n: Int, c: Int
    ) {
        nonisolated(unsafe) let dinp = dinp
        HostRuntime.parallelFor(Int64(n), grain: 16) { b, e in
            for r in Int(b)..<Int(e) {
                let x = inp + r * c, dy = dout + r * c, dx = dinp + r * c
                let m = mean[r], s = rstd[r]
                var meanG: Float = 0, meanGX: Float = 0
                for i in 0..<c {
                    let g = dy[i] * weight[i]
                    meanG += g
                    meanGX += g * (x[i] - m) * s
                }
                meanG /= Float(c)
                meanGX /= Float(c)
                for i in 0..<c {
                    let xh = (x[i] - m) * s
                    dx[i] += s * (dy[i] * weight[i] - meanG - xh * meanGX)
                }
            }
        }
        guard dweight != nil || dbias != nil else { return }
        // dγ, dβ: partial sums over fixed 128-row chunks in parallel, then added in chunk order,
        // so the result does not depend on the thread count.
        let chunk = 128, chunks = (n + chunk - 1) / chunk
        let partial = UnsafeMutablePointer<Float>.allocate(capacity: chunks * 2 * c)
        defer { partial.deallocate() }
        partial.initialize(repeating: 0, count: chunks * 2 * c)
        nonisolated(unsafe) let part = partial
        HostRuntime.parallelFor(Int64(chunks)) { lo, hi in
            for k in Int(lo)..<Int(hi) {
                let pw = part + k * 2 * c, pb = pw + c
                for r in (k * chunk)..<min(n, (k + 1) * chunk) {
                    let x = inp + r * c, dy = dout + r * c
                    let m = mean[r], s = rstd[r]
                    for i in 0..<c { pw[i] += dy[i] * (x[i] - m) * s }
                    Vec.add(pb, dy, c)
                }
            }
        }
        for k in 0..<chunks {
            if let dweight { Vec.add(dweight, partial + k * 2 * c, c) }
            if let dbias { Vec.add(dbias, partial + k * 2 * c + c, c) }
        }
    }
}
