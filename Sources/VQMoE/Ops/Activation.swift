import Foundation

/// Elementwise activations of the expert MLPs.
///
///     gelu(x) = x·Φ(x) = ½x(1 + erf(x/√2))   (exact, torch.nn.functional.gelu's default)
///     gelu'(x) = Φ(x) + x·φ(x)
///     relu(x) = max(x, 0)
///
/// ```swift
/// Activation.gelu.forward(out: h, inp: pre, count: n)
/// ```
public enum Activation: String, Sendable, CaseIterable {
    case gelu, relu

    public func forward(out: UnsafeMutablePointer<Float>, inp: UnsafePointer<Float>, count: Int) {
        switch self {
        case .gelu:
            nonisolated(unsafe) let out = out
            HostRuntime.parallelFor(Int64(count), grain: 4096) { b, e in
                for i in Int(b)..<Int(e) { let x = inp[i]; out[i] = 0.5 * x * (1 + erff(x * 0.70710678118654752)) }
            }
        case .relu:
            for i in 0..<count { out[i] = max(inp[i], 0) }
        }
    }

    /// dinp = dout·act'(inp) (overwrites dinp; `dinp` may alias `dout`).
    public func backward(dinp: UnsafeMutablePointer<Float>, dout: UnsafePointer<Float>, inp: UnsafePointer<Float>, count: Int) {
        switch self {
        case .gelu:
            nonisolated(unsafe) let dinp = dinp
            HostRuntime.parallelFor(Int64(count), grain: 4096) { b, e in
                for i in Int(b)..<Int(e) {
                    let x = inp[i]
                    let cdf = 0.5 * (1 + erff(x * 0.70710678118654752))
                    let pdf = 0.3989422804014327 * expf(-0.5 * x * x)
                    dinp[i] = dout[i] * (cdf + x * pdf)
                }
            }
        case .relu:
            for i in 0..<count { dinp[i] = inp[i] > 0 ? dout[i] : 0 }
        }
    }
}
