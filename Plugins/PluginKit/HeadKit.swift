// Heads on the kit: `HeadPlugin` and the vqmoe_head_api table that serves every one.
import Glibc
import VQMoEABI

/// A head forward's tensors, checked by the kit: h (B,T,d) (T >= 1 for a pooled head),
/// targets (rows) or nil, each in [0, n_out) or VQMOE_PAD_TARGET, lengths (B) in [1, T] or nil,
/// logits (rows, n_out) to write; rows = B·T per token, B per sequence.
public struct HeadForward {
    public let h: UnsafePointer<Float>
    public let batch: Int, seq: Int, d: Int, rows: Int
    public let targets: UnsafePointer<Int32>?
    public let lengths: UnsafePointer<Int32>?
    public let logits: UnsafeMutablePointer<Float>
    /// Non-pad targets (0 without targets): the loss is their mean.
    public let count: Int

    /// The real tokens of each sequence (B): `lengths`, or T for every sequence.
    public var realLengths: [Int32] {
        lengths.map { Array(UnsafeBufferPointer(start: $0, count: batch)) }
            ?? Array(repeating: Int32(seq), count: batch)
    }
}

/// What a head forward reports: the mean loss, its exact sums, and a context for `backward`.
public struct HeadResult {
    public var loss: Float = 0
    public var lossSum: Double = 0
    public var count = 0, correct = 0
    public var context: Any?
    public init() {}

    /// loss = loss_sum / count (0 when every target is padded or absent).
    public init(lossSum: Double, count: Int, correct: Int, context: Any?) {
        (self.lossSum, self.count, self.correct, self.context) = (lossSum, count, correct, context)
        loss = count > 0 ? Float(lossSum / Double(count)) : 0
    }
}

/// A head backward: dL/d loss, and grad_h (B,T,d) to accumulate into; `frozen` is the
/// forward's VQMOE_STEP_FROZEN.
public struct HeadBackward {
    public let gradLoss: Float
    public let gradH: UnsafeMutablePointer<Float>
    public let batch: Int, seq: Int, d: Int
    public let frozen: Bool
}

/// A head component: `forward` writes the logits and, with targets, returns the loss sums
/// (`io.count` non-pad targets, already checked) and, in training, a context for `backward`.
///
/// ```swift
/// final class MyHead: HeadPlugin {
///     var perToken: Bool { true }; var nOut: Int { vocab }; var isLM: Bool { true }
///     func forward(_ step: Step, _ io: HeadForward) throws(PluginFailure) -> HeadResult {
///         …  // logits, then crossEntropy(logits:targets:rows:classes:probs:) when io.targets != nil
///         return HeadResult(lossSum: lossSum, count: io.count, correct: correct, context: saved)
///     }
///     func backward(_ context: Any, _ g: HeadBackward) throws(PluginFailure) { … }
/// }
/// ```
public protocol HeadPlugin: PluginComponent {
    var perToken: Bool { get }
    var nOut: Int { get }
    var isLM: Bool { get }
    func forward(_ step: Step, _ io: HeadForward) throws(PluginFailure) -> HeadResult
    func backward(_ context: Any, _ g: HeadBackward) throws(PluginFailure)
}

private func head(_ inst: Instance) throws(PluginFailure) -> HeadPlugin {
    guard let h = inst.component as? HeadPlugin else { throw .state("not a head") }
    return h
}

/// vqmoe_head_api of every kit head.
nonisolated(unsafe) let headTable: UnsafeRawPointer = {
    let p = UnsafeMutablePointer<vqmoe_head_api>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_head_api(
            struct_size: UInt32(MemoryLayout<vqmoe_head_api>.size),
            shape: { inst, out in
                call(inst, bound: false) { i throws(PluginFailure) in
                    guard let out else { throw .invalid("shape: out is NULL") }
                    let h = try head(i)
                    (out.pointee.per_token, out.pointee.n_out, out.pointee.is_lm) = (
                        h.perToken ? 1 : 0, Int64(h.nOut), h.isLM ? 1 : 0
                    )
                }
            },
            forward: { inst, step, input, output, ctx in
                ctx?.pointee = nil
                return call(inst) { i throws(PluginFailure) in try headForward(i, step, input, output, ctx) }
            },
            backward: { inst, ctx, gin, gout in
                call(inst) { i throws(PluginFailure) in try headBackward(i, ctx, gin, gout) }
            },
            free_ctx: { _, ctx in releaseContext(ctx) }))
    return UnsafeRawPointer(p)
}()

private func headForward(
    _ inst: Instance, _ stepPtr: UnsafePointer<vqmoe_step_info>?, _ input: UnsafePointer<vqmoe_head_input>?,
    _ output: UnsafeMutablePointer<vqmoe_head_output>?, _ ctx: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
) throws(PluginFailure) {
    guard let input, let output else { throw .invalid("forward: input or output is NULL") }
    try requireSize(input.pointee.struct_size, vqmoe_head_input.self, "head input")
    try requireSize(output.pointee.struct_size, vqmoe_head_output.self, "head output")
    let hd = try head(inst), step = try Step(stepPtr), d = inst.model.dModel, io = input.pointee
    let minT = hd.perToken ? 0 : 1
    guard io.h.ndim == 3, let s = io.h.shape, s[0] >= 0, s[1] >= minT else {
        throw .shape("h must be (B, T, \(d))\(minT > 0 ? " with T >= 1" : ""), got \(shapeText(io.h))")
    }
    let b = Int(s[0]), t = Int(s[1]), rows = hd.perToken ? b * t : b
    let h = try requireF32(io.h, [b, t, d], "h")
    let targets = io.targets.data == nil ? nil : try requireI32(io.targets, hd.perToken ? [b, t] : [b], "targets")
    let lengths = io.lengths.data == nil ? nil : try requireI32(io.lengths, [b], "lengths")
    if let lengths { try checkLengths(lengths, b: b, t: t) }
    let count = targets == nil ? 0 : try countTargets(targets!, rows: rows, classes: hd.nOut)
    let f = HeadForward(
        h: h, batch: b, seq: t, d: d, rows: rows, targets: targets.map { UnsafePointer($0) },
        lengths: lengths.map { UnsafePointer($0) },
        logits: try requireF32(output.pointee.logits, [rows, hd.nOut], "logits"), count: count)
    let r = try hd.forward(step, f)
    guard r.lossSum.isFinite, r.loss.isFinite else {
        throw .numeric("non-finite loss (\(r.lossSum)); the logits or h hold NaN/Inf")
    }
    (output.pointee.loss, output.pointee.loss_sum) = (r.loss, r.lossSum)
    (output.pointee.count, output.pointee.correct) = (Int64(r.count), Int64(r.correct))
    keep(r.context, step, rows: b, width: t, ctx)
}

/// Each of the B lengths in [1, T].
private func checkLengths(_ lengths: UnsafePointer<Int32>, b: Int, t: Int) throws(PluginFailure) {
    for i in 0..<b where lengths[i] < 1 || Int(lengths[i]) > t {
        throw .invalid("lengths[\(i)] = \(lengths[i]) is outside [1, \(t)] (T = the sequence length of h)")
    }
}

/// The targets other than VQMOE_PAD_TARGET, each checked to lie in [0, classes).
private func countTargets(_ y: UnsafePointer<Int32>, rows: Int, classes: Int) throws(PluginFailure) -> Int {
    var count = 0
    for i in 0..<rows where y[i] != Int32(VQMOE_PAD_TARGET) {
        guard y[i] >= 0 && Int(y[i]) < classes else {
            throw .invalid(
                "target \(y[i]) at row \(i) is outside [0, \(classes)) and not the pad target \(VQMOE_PAD_TARGET)")
        }
        count += 1
    }
    return count
}

private func headBackward(
    _ inst: Instance, _ ctxPtr: UnsafeMutableRawPointer?, _ gin: UnsafePointer<vqmoe_head_grad_in>?,
    _ gout: UnsafePointer<vqmoe_head_grad_out>?
) throws(PluginFailure) {
    let c = try saved(ctxPtr)
    guard let gin, let gout else { throw .invalid("backward: grad_in or grad_out is NULL") }
    try requireSize(gin.pointee.struct_size, vqmoe_head_grad_in.self, "head grad_in")
    try requireSize(gout.pointee.struct_size, vqmoe_head_grad_out.self, "head grad_out")
    guard gin.pointee.grad_loss.isFinite else { throw .numeric("grad_loss is \(gin.pointee.grad_loss)") }
    let gradH = try requireF32(gout.pointee.grad_h, [c.rows, c.width, inst.model.dModel], "grad_h")
    try head(inst).backward(
        c.saved,
        HeadBackward(
            gradLoss: gin.pointee.grad_loss, gradH: gradH, batch: c.rows, seq: c.width, d: inst.model.dModel,
            frozen: c.frozen))
}
