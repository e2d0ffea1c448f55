// Heads on the kit: `HeadPlugin` and the vqmoe_head_api table that serves every one.
import Glibc
import VQMoEABI

/// A head forward's tensors, checked by the kit: h (B,T,d), targets (rows) or nil, lengths (B)
/// or nil, logits (rows, n_out) to write; rows = B·T per token, B per sequence.
public struct HeadForward {
    public let h: UnsafePointer<Float>
    public let batch: Int, seq: Int, d: Int, rows: Int
    public let targets: UnsafePointer<Int32>?
    public let lengths: UnsafePointer<Int32>?
    public let logits: UnsafeMutablePointer<Float>
}

/// What a head forward reports: the mean loss, its exact sums, and a context for `backward`.
public struct HeadResult {
    public var loss: Float = 0
    public var lossSum: Double = 0
    public var count = 0, correct = 0
    public var context: Any?
    public init() {}
}

/// A head backward: dL/d loss, and grad_h (B,T,d) to accumulate into.
public struct HeadBackward {
    public let gradLoss: Float
    public let gradH: UnsafeMutablePointer<Float>
    public let frozen: Bool
}

/// A head component.
///
/// ```swift
/// final class MyHead: HeadPlugin {
///     var perToken: Bool { true }; var nOut: Int { vocab }; var isLM: Bool { true }
///     func forward(_ step: Step, _ io: HeadForward) throws(PluginFailure) -> HeadResult { … }
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
                call(inst) { i throws(PluginFailure) in
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
    guard io.h.ndim == 3, let s = io.h.shape else { throw .shape("h must be (B, T, \(d)), got \(shapeText(io.h))") }
    let b = Int(s[0]), t = Int(s[1]), rows = hd.perToken ? b * t : b
    let f = HeadForward(
        h: try requireF32(io.h, [b, t, d], "h"), batch: b, seq: t, d: d, rows: rows,
        targets: io.targets.data == nil
            ? nil : UnsafePointer(try requireI32(io.targets, hd.perToken ? [b, t] : [b], "targets")),
        lengths: io.lengths.data == nil ? nil : UnsafePointer(try requireI32(io.lengths, [b], "lengths")),
        logits: try requireF32(output.pointee.logits, [rows, hd.nOut], "logits"))
    let r = try hd.forward(step, f)
    guard r.lossSum.isFinite, r.loss.isFinite else {
        throw .numeric("non-finite loss (\(r.lossSum)); the logits or h hold NaN/Inf")
    }
    (output.pointee.loss, output.pointee.loss_sum) = (r.loss, r.lossSum)
    (output.pointee.count, output.pointee.correct) = (Int64(r.count), Int64(r.correct))
    keep(r.context, step, rows: b, width: t, ctx)
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
    try head(inst).backward(c.saved, HeadBackward(gradLoss: gin.pointee.grad_loss, gradH: gradH, frozen: c.frozen))
}
