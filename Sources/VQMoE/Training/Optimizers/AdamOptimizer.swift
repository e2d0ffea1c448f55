import Foundation

/// Adam / AdamW over host-owned parameters (model weights and plugin parameters alike).
///
///     m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
///     θ ← θ − lr·( m̂/(√v̂ + ε) + λ·θ )     (AdamW: decoupled decay λ; Adam: λ·θ added to g)
///     m̂ = m/(1−β1^t), v̂ = v/(1−β2^t)
///
/// ```swift
/// let opt = AdamOptimizer(parameters: model.parameters, config: cfg.train)
/// opt.step(lr: 1e-3)
/// ```
/// Checkpoint slots: `m`, `v`.
public final class AdamOptimizer: Optimizer, @unchecked Sendable {
    public let parameters: [Parameter]
    public let beta1, beta2, eps, weightDecay: Float
    public let decoupled: Bool
    /// First and second moments per parameter, same order as `parameters`.
    public let slots: [OptimizerSlot]
    public var m: [UnsafeMutablePointer<Float>] { slots[0].buffers }
    public var v: [UnsafeMutablePointer<Float>] { slots[1].buffers }
    /// Steps taken (for bias correction).
    public var t = 0

    public init(parameters: [Parameter], config: TrainConfig) {
        self.parameters = parameters
        beta1 = config.beta1
        beta2 = config.beta2
        eps = config.eps
        weightDecay = config.weightDecay
        decoupled = config.optimizer == .adamw
        slots = [OptimizerSlot.zeros("m", for: parameters), OptimizerSlot.zeros("v", for: parameters)]
    }

    deinit { slots.forEach { $0.free() } }

    /// One update of every non-frozen parameter.
    public func step(lr: Float) {
        t += 1
        let bc1 = 1 - Float(pow(Double(beta1), Double(t))), bc2 = 1 - Float(pow(Double(beta2), Double(t)))
        let (b1, b2, e) = (beta1, beta2, eps)
        for (i, p) in parameters.enumerated() where !p.frozen {
            let wd = p.noDecay ? 0 : weightDecay
            let (mm, vv, w, g) = (slots[0].buffers[i], slots[1].buffers[i], p.data, p.grad)
            nonisolated(unsafe) let ptrs = (mm, vv, w, g)
            let dec = decoupled
            HostRuntime.parallelFor(Int64(p.count), grain: 32768) { lo, hi in
                let (mm, vv, w, g) = ptrs
                let vb1 = SIMD8<Float>(repeating: b1), vb2 = SIMD8<Float>(repeating: b2)
                let c1 = SIMD8<Float>(repeating: 1 / bc1), c2 = SIMD8<Float>(repeating: 1 / bc2)
                let veps = SIMD8<Float>(repeating: e), vlr = SIMD8<Float>(repeating: lr),
                    vwd = SIMD8<Float>(repeating: wd)
                var j = Int(lo)
                while j + 8 <= Int(hi) {
                    var grad = UnsafeRawPointer(g + j).loadUnaligned(as: SIMD8<Float>.self)
                    let wj = UnsafeRawPointer(w + j).loadUnaligned(as: SIMD8<Float>.self)
                    if !dec && wd != 0 { grad += vwd * wj }
                    let m1 = vb1 * UnsafeRawPointer(mm + j).loadUnaligned(as: SIMD8<Float>.self) + (1 - vb1) * grad
                    let v1 =
                        vb2 * UnsafeRawPointer(vv + j).loadUnaligned(as: SIMD8<Float>.self) + (1 - vb2) * grad * grad
                    UnsafeMutableRawPointer(mm + j).storeBytes(of: m1, as: SIMD8<Float>.self)
                    UnsafeMutableRawPointer(vv + j).storeBytes(of: v1, as: SIMD8<Float>.self)
                    let update = (m1 * c1) / ((v1 * c2).squareRoot() + veps)
                    let decay = dec ? vwd * wj : SIMD8<Float>(repeating: 0)
                    UnsafeMutableRawPointer(w + j).storeBytes(of: wj - vlr * (update + decay), as: SIMD8<Float>.self)
                    j += 8
                }
                while j < Int(hi) {
                    var grad = g[j]
                    if !dec && wd != 0 { grad += wd * w[j] }
                    mm[j] = b1 * mm[j] + (1 - b1) * grad
                    vv[j] = b2 * vv[j] + (1 - b2) * grad * grad
                    let update = (mm[j] / bc1) / ((vv[j] / bc2).squareRoot() + e)
                    w[j] -= lr * (update + (dec ? wd * w[j] : 0))
                    j += 1
                }
            }
        }
    }
}
