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
                var i = Int(b)
                while i + 8 <= Int(e) {
                    let x = UnsafeRawPointer(inp + i).loadUnaligned(as: SIMD8<Float>.self)
                    let y = 0.5 * x * (1 + VecMath.erf(x * 0.70710678118654752))
                    UnsafeMutableRawPointer(out + i).storeBytes(of: y, as: SIMD8<Float>.self)
                    i += 8
                }
                while i < Int(e) { let x = inp[i]; out[i] = 0.5 * x * (1 + erff(x * 0.70710678118654752)); i += 1 }
            }
        case .relu:
            for i in 0..<count { out[i] = max(inp[i], 0) }
        }
    }

    /// Both at once: out = act(inp) and slope = act'(inp) (the MoE backward needs the
    /// activation again for dW2 and its slope for dh; GELU shares one exp between them).
    public func forwardWithSlope(
        out: UnsafeMutablePointer<Float>, slope: UnsafeMutablePointer<Float>, inp: UnsafePointer<Float>, count: Int
    ) {
        switch self {
        case .gelu:
            nonisolated(unsafe) let (out, slope) = (out, slope)
            HostRuntime.parallelFor(Int64(count), grain: 4096) { b, e in
                var i = Int(b)
                while i + 8 <= Int(e) {
                    let (v, d) = VecMath.geluAndDerivative(
                        UnsafeRawPointer(inp + i).loadUnaligned(as: SIMD8<Float>.self))
                    UnsafeMutableRawPointer(out + i).storeBytes(of: v, as: SIMD8<Float>.self)
                    UnsafeMutableRawPointer(slope + i).storeBytes(of: d, as: SIMD8<Float>.self)
                    i += 8
                }
                while i < Int(e) {
                    let x = inp[i]
                    let cdf = 0.5 * (1 + erff(x * 0.70710678118654752))
                    out[i] = x * cdf
                    slope[i] = cdf + x * 0.3989422804014327 * expf(-0.5 * x * x)
                    i += 1
                }
            }
        case .relu:
            for i in 0..<count { out[i] = max(inp[i], 0); slope[i] = inp[i] > 0 ? 1 : 0 }
        }
    }

    /// dinp = dout·act'(inp) (overwrites dinp; `dinp` may alias `dout`).
    public func backward(
        dinp: UnsafeMutablePointer<Float>, dout: UnsafePointer<Float>, inp: UnsafePointer<Float>, count: Int
    ) {
        switch self {
        case .gelu:
            nonisolated(unsafe) let dinp = dinp
            HostRuntime.parallelFor(Int64(count), grain: 4096) { b, e in
                var i = Int(b)
                while i + 8 <= Int(e) {
                    let x = UnsafeRawPointer(inp + i).loadUnaligned(as: SIMD8<Float>.self)
                    let g = UnsafeRawPointer(dout + i).loadUnaligned(as: SIMD8<Float>.self)
                    let cdf = 0.5 * (1 + VecMath.erf(x * 0.70710678118654752))
                    let pdf = 0.3989422804014327 * VecMath.exp(-0.5 * x * x)
                    UnsafeMutableRawPointer(dinp + i).storeBytes(of: g * (cdf + x * pdf), as: SIMD8<Float>.self)
                    i += 8
                }
                while i < Int(e) {
                    let x = inp[i]
                    let cdf = 0.5 * (1 + erff(x * 0.70710678118654752))
                    let pdf = 0.3989422804014327 * expf(-0.5 * x * x)
                    dinp[i] = dout[i] * (cdf + x * pdf)
                    i += 1
                }
            }
        case .relu:
            for i in 0..<count { dinp[i] = inp[i] > 0 ? dout[i] : 0 }
        }
    }
}
