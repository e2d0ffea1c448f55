import Foundation

/// A softmax gate over a layer's P paths (VQMoE's [g_c, g_d] for P = 2):
///
///     g (N,P) = softmax_rows(x W_gᵀ + b_g),   path p's weights are scaled by g_p(t)
///     backward: dg_p(t) = Σ_{i of p, t} raw_i · dL/dweight_i  (+ dL/dy_t · soft_p(t) for a soft output)
///               dz = g ⊙ (dg − rowsum(g ⊙ dg)),  dx += dz W_g,  dW_g += dzᵀ x,  db_g += Σ dz
///
/// ```swift
/// let gate = PathGate(name: "layers.0.ffn.gate", paths: 2, dModel: 256, initStd: 0.02, seed: 3)
/// let g = gate.forward(x: x, n: n)        // (N,P)
/// ```
public final class PathGate: @unchecked Sendable {
    public let weight: Parameter, bias: Parameter
    public let paths: Int
    /// The gate values of the last forward (N,P).
    let values = Storage<Float>()
    private var n = 0

    public init(name: String, paths: Int, dModel: Int, initStd: Float, seed: UInt64) {
        self.paths = paths
        weight = Parameter(name: "\(name).weight", shape: [paths, dModel])
        weight.fillNormal(std: initStd, seed: seed)
        bias = Parameter(name: "\(name).bias", shape: [paths], noDecay: true)
    }

    public var parameters: [Parameter] { [weight, bias] }

    /// g (N,P) = softmax(x W_gᵀ + b_g) for x (N,d).
    public func forward(x: UnsafePointer<Float>, n: Int) -> UnsafePointer<Float> {
        self.n = n
        let p = paths, g = values.reserve(n * p)
        Linear.forward(
            out: g, inp: x, weight: weight.data, bias: bias.data, n: n, inFeatures: weight.shape[1], outFeatures: p)
        for t in 0..<n {
            let row = g + t * p
            var m = row[0]
            for j in 1..<p { m = max(m, row[j]) }
            var s: Float = 0
            for j in 0..<p { row[j] = expf(row[j] - m); s += row[j] }
            for j in 0..<p { row[j] /= s }
        }
        return UnsafePointer(g)
    }

    /// Given dg (N,P) = dL/dg, accumulate dx (N,d) and the gate's gradients; dz is scratch (N,P).
    public func backward(
        dg: UnsafePointer<Float>, x: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>,
        dz: UnsafeMutablePointer<Float>
    ) {
        let p = paths, g = values.pointer
        for t in 0..<n {
            var dot: Float = 0
            for j in 0..<p { dot += g[t * p + j] * dg[t * p + j] }
            for j in 0..<p { dz[t * p + j] = g[t * p + j] * (dg[t * p + j] - dot) }
        }
        Linear.backward(
            dinp: dx, dweight: weight.frozen ? nil : weight.grad, dbias: bias.frozen ? nil : bias.grad, dout: dz,
            inp: x, weight: weight.data, n: n, inFeatures: weight.shape[1], outFeatures: p)
    }
}
