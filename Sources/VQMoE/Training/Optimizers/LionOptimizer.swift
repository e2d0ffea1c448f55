import Foundation

/// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2): the
/// update is the sign of an interpolation of momentum and gradient, so every coordinate moves by
/// exactly ±lr (plus decoupled weight decay); one moment per parameter instead of Adam's two.
///
///     c = β1·m + (1−β1)·g
///     θ ← θ − lr·(sign(c) + λ·θ)          (λ = 0 for no-decay parameters; sign(0) = 0)
///     m ← β2·m + (1−β2)·g
///
/// The paper's guidance: a learning rate 3–10× below AdamW's, λ 3–10× larger, β1 = 0.9,
/// β2 = 0.99 (this config's default for `optimizer = "lion"`). Checkpoint slot: `m`.
///
/// ```swift
/// var tc = TrainConfig()
/// tc.optimizer = .lion
/// let opt = LionOptimizer(parameters: model.parameters, config: tc)
/// opt.step(lr: 1e-4)
/// ```
public final class LionOptimizer: Optimizer, @unchecked Sendable {
    public let parameters: [Parameter]
    public let beta1, beta2, weightDecay: Float
    /// The momentum per parameter, same order as `parameters`.
    public let slots: [OptimizerSlot]
    public var t = 0

    public init(parameters: [Parameter], config: TrainConfig) {
        self.parameters = parameters
        beta1 = config.beta1
        beta2 = config.beta2
        weightDecay = config.weightDecay
        slots = [OptimizerSlot.zeros("m", for: parameters)]
    }

    deinit { slots.forEach { $0.free() } }

    public func step(lr: Float) {
        t += 1
        for (i, p) in parameters.enumerated() where !p.frozen {
            let wd = p.noDecay ? 0 : weightDecay
            nonisolated(unsafe) let (m, w, g) = (slots[0].buffers[i], p.data, p.grad)
            let (b1, b2) = (beta1, beta2)
            HostRuntime.parallelFor(Int64(p.count), grain: 32768) { lo, hi in
                LionOptimizer.update(m: m, w: w, g: g, range: Int(lo)..<Int(hi), lr: lr, wd: wd, beta1: b1, beta2: b2)
            }
        }
    }

    /// The update of coordinates `range` (SIMD8 in the body, scalar at the tail).
    static func update(
        m: UnsafeMutablePointer<Float>, w: UnsafeMutablePointer<Float>, g: UnsafePointer<Float>, range: Range<Int>,
        lr: Float, wd: Float, beta1: Float, beta2: Float
    ) {
        let vb1 = SIMD8<Float>(repeating: beta1), vb2 = SIMD8<Float>(repeating: beta2)
        let vlr = SIMD8<Float>(repeating: lr), vwd = SIMD8<Float>(repeating: wd), zero = SIMD8<Float>(repeating: 0)
        var j = range.lowerBound
        while j + 8 <= range.upperBound {
            let gj = UnsafeRawPointer(g + j).loadUnaligned(as: SIMD8<Float>.self)
            let mj = UnsafeRawPointer(m + j).loadUnaligned(as: SIMD8<Float>.self)
            let wj = UnsafeRawPointer(w + j).loadUnaligned(as: SIMD8<Float>.self)
            let c = vb1 * mj + (1 - vb1) * gj
            let sign = zero.replacing(with: 1, where: c .> 0).replacing(with: -1, where: c .< 0)
            UnsafeMutableRawPointer(w + j).storeBytes(of: wj - vlr * (sign + vwd * wj), as: SIMD8<Float>.self)
            UnsafeMutableRawPointer(m + j).storeBytes(of: vb2 * mj + (1 - vb2) * gj, as: SIMD8<Float>.self)
            j += 8
        }
        while j < range.upperBound {
            let c = beta1 * m[j] + (1 - beta1) * g[j]
            let sign: Float = c > 0 ? 1 : (c < 0 ? -1 : 0)
            w[j] -= lr * (sign + wd * w[j])
            m[j] = beta2 * m[j] + (1 - beta2) * g[j]
            j += 1
        }
    }
}
