// Quantizers on the kit: `QuantizerPlugin` and the vqmoe_quantizer_api table that serves every one.
import Glibc
import VQMoEABI

/// A quantizer forward's tensors, checked by the kit: x (N,d); quantized (N,d), codes (N,L) and
/// code counts (K) to write.
public struct QuantizerForward {
    public let x: UnsafePointer<Float>
    public let n: Int, d: Int
    public let quantized: UnsafeMutablePointer<Float>
    public let codes: UnsafeMutablePointer<Int32>
    public let counts: UnsafeMutablePointer<Float>
}

/// A quantizer backward's tensors: dL/d quantized (N,d) or nil (zero), dL/d loss (β), grad_x
/// (N,d) to accumulate into; `frozen` is the forward's VQMOE_STEP_FROZEN.
public struct QuantizerBackward {
    public let gradQuantized: UnsafePointer<Float>?
    public let gradLoss: Float
    public let gradX: UnsafeMutablePointer<Float>
    public let n: Int, d: Int
    public let frozen: Bool
}

/// A quantizer component: K codes, L codes per token; `forward` returns the unweighted loss and,
/// in training, a context for `backward`.
///
/// ```swift
/// final class MyVQ: QuantizerPlugin {
///     var codebookSize: Int { k }
///     func forward(_ step: Step, _ io: QuantizerForward) throws(PluginFailure) -> (loss: Float, context: Any?) { … }
///     func backward(_ context: Any, _ g: QuantizerBackward) throws(PluginFailure) { … }
/// }
/// ```
public protocol QuantizerPlugin: PluginComponent {
    var codebookSize: Int { get }
    var codesPerToken: Int { get }
    func forward(_ step: Step, _ io: QuantizerForward) throws(PluginFailure) -> (loss: Float, context: Any?)
    func backward(_ context: Any, _ g: QuantizerBackward) throws(PluginFailure)
}

extension QuantizerPlugin {
    public var codesPerToken: Int { 1 }
}

private func quantizer(_ inst: Instance) throws(PluginFailure) -> QuantizerPlugin {
    guard let q = inst.component as? QuantizerPlugin else { throw .state("not a quantizer") }
    return q
}

/// vqmoe_quantizer_api of every kit quantizer.
nonisolated(unsafe) let quantizerTable: UnsafeRawPointer = {
    let p = UnsafeMutablePointer<vqmoe_quantizer_api>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_quantizer_api(
            struct_size: UInt32(MemoryLayout<vqmoe_quantizer_api>.size),
            shape: { inst, out in
                call(inst, bound: false) { i throws(PluginFailure) in
                    guard let out else { throw .invalid("shape: out is NULL") }
                    let q = try quantizer(i)
                    (out.pointee.codebook_size, out.pointee.codes_per_token) = (
                        Int64(q.codebookSize), Int32(q.codesPerToken)
                    )
                }
            },
            forward: { inst, step, input, output, ctx in
                ctx?.pointee = nil
                return call(inst) { i throws(PluginFailure) in try quantizerForward(i, step, input, output, ctx) }
            },
            backward: { inst, ctx, gin, gout in
                call(inst) { i throws(PluginFailure) in try quantizerBackward(i, ctx, gin, gout) }
            },
            free_ctx: { _, ctx in releaseContext(ctx) }))
    return UnsafeRawPointer(p)
}()

private func quantizerForward(
    _ inst: Instance, _ stepPtr: UnsafePointer<vqmoe_step_info>?, _ input: UnsafePointer<vqmoe_quantizer_input>?,
    _ output: UnsafeMutablePointer<vqmoe_quantizer_output>?, _ ctx: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
) throws(PluginFailure) {
    guard let input, let output else { throw .invalid("forward: input or output is NULL") }
    try requireSize(input.pointee.struct_size, vqmoe_quantizer_input.self, "quantizer input")
    try requireSize(output.pointee.struct_size, vqmoe_quantizer_output.self, "quantizer output")
    let q = try quantizer(inst), step = try Step(stepPtr), d = inst.model.dModel, out = output.pointee
    let n = try rowsOf(input.pointee.x, cols: d, "x")
    let f = QuantizerForward(
        x: try requireF32(input.pointee.x, [n, d], "x"), n: n, d: d,
        quantized: try requireF32(out.quantized, [n, d], "quantized"),
        // (N,L); (N) is accepted for L = 1.
        codes: try requireI32(
            out.codes, out.codes.ndim == 1 && q.codesPerToken == 1 ? [n] : [n, q.codesPerToken], "codes"),
        counts: try requireF32(out.code_counts, [q.codebookSize], "code_counts"))
    let (loss, saved) = try q.forward(step, f)
    guard loss.isFinite else { throw .numeric("non-finite quantizer loss \(loss)") }
    output.pointee.loss = loss
    keep(saved, step, rows: n, width: d, ctx)
}

private func quantizerBackward(
    _ inst: Instance, _ ctxPtr: UnsafeMutableRawPointer?, _ gin: UnsafePointer<vqmoe_quantizer_grad_in>?,
    _ gout: UnsafePointer<vqmoe_quantizer_grad_out>?
) throws(PluginFailure) {
    let c = try saved(ctxPtr)
    guard let gin, let gout else { throw .invalid("backward: grad_in or grad_out is NULL") }
    try requireSize(gin.pointee.struct_size, vqmoe_quantizer_grad_in.self, "quantizer grad_in")
    try requireSize(gout.pointee.struct_size, vqmoe_quantizer_grad_out.self, "quantizer grad_out")
    let n = c.rows, d = c.width, g = gin.pointee
    guard g.grad_loss.isFinite else { throw .numeric("grad_loss is \(g.grad_loss)") }
    try quantizer(inst).backward(
        c.saved,
        QuantizerBackward(
            gradQuantized: g.grad_quantized.data == nil
                ? nil : UnsafePointer(try requireF32(g.grad_quantized, [n, d], "grad_quantized")),
            gradLoss: g.grad_loss, gradX: try requireF32(gout.pointee.grad_x, [n, d], "grad_x"), n: n, d: d,
            frozen: c.frozen))
}
