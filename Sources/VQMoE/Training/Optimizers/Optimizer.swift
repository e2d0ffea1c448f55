import Foundation

/// An optimizer over host-owned parameters (model weights and plugin parameters alike). The
/// trainer, the benchmark and checkpoints use it through this protocol only: its per-parameter
/// state is a list of named slots, saved as `optimizer.<slot>.<parameter>` tensors.
///
/// ```swift
/// let opt = makeOptimizer(parameters: model.parameters.filter { !$0.frozen }, config: cfg.train)
/// opt.step(lr: 1e-3)
/// for slot in opt.slots { print(slot.name) }       // Adam: m, v; Lion: m
/// ```
public protocol Optimizer: AnyObject {
    /// The parameters it updates (frozen ones are skipped), in a fixed order.
    var parameters: [Parameter] { get }
    /// Steps taken (Adam's bias correction); restored on resume.
    var t: Int { get set }
    /// One update of every non-frozen parameter from its gradient.
    func step(lr: Float)
    /// Per-parameter state, one buffer per parameter in `parameters` order, by slot name.
    var slots: [OptimizerSlot] { get }
}

/// One kind of per-parameter optimizer state (a moment), float32, shaped like its parameter.
public struct OptimizerSlot: @unchecked Sendable {
    public let name: String
    public let buffers: [UnsafeMutablePointer<Float>]

    /// Zero-filled buffers for `parameters`.
    static func zeros(_ name: String, for parameters: [Parameter]) -> OptimizerSlot {
        OptimizerSlot(
            name: name,
            buffers: parameters.map { p in
                let b = HostRuntime.mustAllocate(p.count, of: Float.self, for: "optimizer state \(name) of \(p.name)")
                b.initialize(repeating: 0, count: p.count)
                return b
            })
    }

    func free() { buffers.forEach { Foundation.free($0) } }
}

/// The optimizer a training config names (`train.optimizer`: adam, adamw, lion).
///
/// ```swift
/// let opt = makeOptimizer(parameters: params, config: cfg.train)
/// ```
public func makeOptimizer(parameters: [Parameter], config: TrainConfig) -> Optimizer {
    switch config.optimizer {
    case .adam, .adamw: return AdamOptimizer(parameters: parameters, config: config)
    case .lion: return LionOptimizer(parameters: parameters, config: config)
    }
}

/// Global-norm gradient clipping: if ‖g‖₂ > maxNorm, every gradient is scaled by maxNorm/‖g‖₂.
/// Returns the norm before clipping.
///
/// ```swift
/// let norm = clipGradients(model.parameters, maxNorm: 0.25)
/// ```
@discardableResult
public func clipGradients(_ parameters: [Parameter], maxNorm: Float) -> Float {
    var total = 0.0
    for p in parameters where !p.frozen { total += Double(Vec.dot(p.grad, p.grad, p.count)) }
    let norm = Float(total.squareRoot())
    if maxNorm > 0 && norm > maxNorm {
        let s = maxNorm / (norm + 1e-6)
        for p in parameters where !p.frozen { Vec.scale(p.grad, s, p.count) }
    }
    return norm
}

/// Learning rate at `step` (0-based): linear warmup from 0 to lr over `warmupSteps`, then
/// cosine annealing from lr to minLR over the remaining steps (or constant).
///
/// ```swift
/// learningRate(step: 10, config: cfg.train)
/// ```
public func learningRate(step: Int, config c: TrainConfig) -> Float {
    if step < c.warmupSteps { return c.lr * Float(step + 1) / Float(c.warmupSteps + 1) }
    if c.schedule == .constant { return c.lr }
    let span = max(c.steps - c.warmupSteps, 1)
    let progress = min(Float(step - c.warmupSteps) / Float(span), 1)
    return c.minLR + 0.5 * (c.lr - c.minLR) * (1 + cos(Float.pi * progress))
}
