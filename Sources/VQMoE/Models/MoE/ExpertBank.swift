import Foundation

/// E experts, each a two-layer MLP d → d_inner → d, stored as one tensor per weight so that
/// expert e's rows are contiguous:
///
///     fc1.weight (E,d_inner,d), fc1.bias (E,d_inner), fc2.weight (E,d,d_inner), fc2.bias (E,d)
///     E_e(x) = fc2_e(act(fc1_e(x)))
///     backward (h = act(hpre) recomputed from hpre):  dh = dy W2_e ⊙ act'(hpre),  dx += dh W1_e
///
/// A layer's routed experts are one bank (`<layer>.experts`); a shared expert is a bank of one
/// (`<layer>.shared_expert`).
///
/// ```swift
/// let bank = ExpertBank(name: "layers.0.ffn.experts", count: 8, dModel: 256, dInner: 512,
///                       activation: .gelu, initStd: 0.02, seed: 7)
/// bank.forward(expert: 3, rows: n, x: x, hpre: hpre, h: h, y: y)
/// ```
public final class ExpertBank: @unchecked Sendable {
    public let name: String
    public let count: Int, dModel: Int, dInner: Int
    public let activation: Activation
    public let fc1Weight, fc1Bias, fc2Weight, fc2Bias: Parameter

    /// Expert parallelism: this rank holds experts `shard.offset ..< shard.offset + count` of
    /// `shard.global` (its tensors are those rows of the whole bank's, initialised alike).
    public let shard: AxisShard?

    public init(
        name: String, count: Int, dModel: Int, dInner: Int, activation: Activation, initStd: Float,
        seeds: (fc1: UInt64, fc2: UInt64), shard: AxisShard? = nil
    ) {
        self.name = name
        self.count = shard?.count ?? count
        self.dModel = dModel
        self.dInner = dInner
        self.activation = activation
        self.shard = shard
        let (e, f, d) = (self.count, dInner, dModel), first = shard?.offset ?? 0
        fc1Weight = Parameter(name: "\(name).fc1.weight", shape: [e, f, d])
        fc1Bias = Parameter(name: "\(name).fc1.bias", shape: [e, f], noDecay: true)
        fc2Weight = Parameter(name: "\(name).fc2.weight", shape: [e, d, f])
        fc2Bias = Parameter(name: "\(name).fc2.bias", shape: [e, d], noDecay: true)
        fc1Weight.fillNormal(std: initStd, seed: seeds.fc1, skip: first * f * d)
        fc2Weight.fillNormal(std: initStd, seed: seeds.fc2, skip: first * d * f)
        for p in parameters { p.shard = shard }
    }

    public var parameters: [Parameter] { [fc1Weight, fc1Bias, fc2Weight, fc2Bias] }

    /// Experts of the whole bank (every rank's).
    public var globalCount: Int { shard?.global ?? count }

    /// y (rows,d) = E_e(x (rows,d)); keeps hpre (rows,d_inner) for the backward.
    public func forward(
        expert e: Int, rows: Int, x: UnsafePointer<Float>, hpre: UnsafeMutablePointer<Float>,
        y: UnsafeMutablePointer<Float>, scratch: ExpertScratch
    ) {
        guard rows > 0 else { return }
        let (f, d) = (dInner, dModel)
        let h = scratch.h.reserve(rows * f)
        Linear.forward(
            out: hpre, inp: x, weight: fc1Weight.data + e * f * d, bias: fc1Bias.data + e * f,
            n: rows, inFeatures: d, outFeatures: f)
        activation.forward(out: h, inp: hpre, count: rows * f)
        Linear.forward(
            out: y, inp: h, weight: fc2Weight.data + e * d * f, bias: fc2Bias.data + e * d,
            n: rows, inFeatures: f, outFeatures: d)
    }

    /// Given dy (rows,d): dx (rows,d) += dL/dx and the expert's weight gradients (frozen ones
    /// skipped).
    public func backward(
        expert e: Int, rows: Int, x: UnsafePointer<Float>, hpre: UnsafePointer<Float>,
        dy: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>, scratch s: ExpertScratch
    ) {
        guard rows > 0 else { return }
        let (f, d) = (dInner, dModel)
        let h = s.h.reserve(rows * f), dh = s.dh.reserve(rows * f), slope = s.slope.reserve(rows * f)
        activation.forwardWithSlope(out: h, slope: slope, inp: hpre, count: rows * f)
        dh.update(repeating: 0, count: rows * f)
        Linear.backward(
            dinp: dh, dweight: fc2Weight.frozen ? nil : fc2Weight.grad + e * d * f,
            dbias: fc2Bias.frozen ? nil : fc2Bias.grad + e * d, dout: dy, inp: h,
            weight: fc2Weight.data + e * d * f, n: rows, inFeatures: f, outFeatures: d)
        Vec.multiply(dh, slope, rows * f)
        Linear.backward(
            dinp: dx, dweight: fc1Weight.frozen ? nil : fc1Weight.grad + e * f * d,
            dbias: fc1Bias.frozen ? nil : fc1Bias.grad + e * f, dout: dh, inp: x,
            weight: fc1Weight.data + e * f * d, n: rows, inFeatures: d, outFeatures: f)
    }
}

/// Temporaries of the expert MLPs (one expert's rows × d_inner each), shared by every layer of a
/// model: only live inside one expert's forward or backward.
///
/// ```swift
/// let s = ExpertScratch()
/// bank.forward(expert: 0, rows: n, x: x, hpre: hpre, y: y, scratch: s)
/// ```
public final class ExpertScratch: @unchecked Sendable {
    /// act(hpre), the activation's slope, and dL/dh.
    public let h = Storage<Float>(), slope = Storage<Float>(), dh = Storage<Float>()
    public init() {}

    var bytes: Int { h.bytes + slope.bytes + dh.bytes }
}
