import Foundation
import VQMoEABI

/// A named float32 tensor the optimizer updates: value and gradient, 64-byte aligned.
/// Model weights own their memory; plugin parameters are views of host buffers
/// (`HostBuffer`), so the optimizer, clipping and checkpoints treat every component alike.
///
/// ```swift
/// let w = Parameter(name: "layers.0.attn.qkv.weight", shape: [3 * c, c])
/// w.fillNormal(std: 0.02, seed: 1)
/// ```
public final class Parameter: @unchecked Sendable {
    public let name: String
    public let shape: [Int]
    public let count: Int
    public let data: UnsafeMutablePointer<Float>
    public let grad: UnsafeMutablePointer<Float>
    /// Excluded from weight decay (biases, LayerNorm, embeddings of positions...).
    public var noDecay: Bool
    /// Not updated (frozen while fine-tuning).
    public var frozen = false
    /// A plugin parameter flagged VQMOE_BUF_FREEZE_FT: frozen by a fine-tuning config that gives
    /// no `finetune.freeze` list.
    public let freezeWhenFineTuning: Bool
    /// Expert parallelism: this tensor holds rows `shard.offset ..< shard.offset + shape[0]` of
    /// a tensor of `shard.global` rows (axis 0) that the ranks hold between them. Its gradient is
    /// complete on this rank (no all-reduce), and a checkpoint gathers the whole tensor.
    public var shard: AxisShard?
    private let owned: Bool

    public init(name: String, shape: [Int], noDecay: Bool = false) {
        self.name = name
        self.shape = shape
        count = shape.reduce(1, *)
        data = HostRuntime.mustAllocate(count, of: Float.self, for: "parameter \(name) \(shape)")
        grad = HostRuntime.mustAllocate(count, of: Float.self, for: "the gradient of \(name) \(shape)")
        data.initialize(repeating: 0, count: count)
        grad.initialize(repeating: 0, count: count)
        self.noDecay = noDecay
        freezeWhenFineTuning = false
        owned = true
    }

    /// A view of a plugin's parameter buffer (memory stays the host buffer's).
    public init(view buffer: HostBuffer, prefix: String) {
        name = "\(prefix).\(buffer.name)"
        shape = buffer.shape
        count = buffer.count
        data = buffer.floats
        grad = buffer.grad!
        noDecay = buffer.flags & VQMOE_BUF_NO_DECAY != 0
        freezeWhenFineTuning = buffer.flags & VQMOE_BUF_FREEZE_FT != 0
        owned = false
        keepAlive = buffer
    }
    private var keepAlive: HostBuffer?

    deinit {
        if owned { free(data); free(grad) }
    }

    public func zeroGrad() { grad.update(repeating: 0, count: count) }
    public func fill(_ v: Float) { data.update(repeating: v, count: count) }

    /// N(0, std²) from a seeded stream; `skip` draws are passed over first (a shard of a larger
    /// tensor gets the values the whole tensor has at its rows).
    public func fillNormal(std: Float, seed: UInt64, skip: Int = 0) {
        var r = HostRNG.make(seed: seed, stream: 0x1417)
        r.counter &+= UInt64(2 * skip)  // normal() consumes two counter values
        for i in 0..<count { data[i] = HostRNG.normal(&r) * std }
    }
}

/// Rows `offset ..< offset + count` (axis 0) of a tensor of `global` rows held by several ranks.
///
/// ```swift
/// let s = AxisShard(offset: 4, count: 4, global: 8)   // experts 4..<8 of 8
/// ```
public struct AxisShard: Sendable, Equatable {
    public let offset: Int, count: Int, global: Int
    public init(offset: Int, count: Int, global: Int) {
        (self.offset, self.count, self.global) = (offset, count, global)
    }
}

/// Every state buffer of a plugin (EMA counts, flags) as a named byte range, for checkpoints.
public struct StateBuffer: @unchecked Sendable {
    public let name: String
    public let buffer: HostBuffer
}
