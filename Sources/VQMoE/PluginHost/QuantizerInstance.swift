import VQMoEABI

/// A quantizer plugin instance with Swift calls over raw buffers.
///
/// ```swift
/// let q = try QuantizerInstance(core)
/// let (loss, ctx) = try q.forward(step, x: x, n: N, quantized: qOut, codes: codes, codeCounts: counts)
/// try q.backward(ctx!, n: N, gradQuantized: dq, gradLoss: beta, gradX: dx)
/// ```
public final class QuantizerInstance: @unchecked Sendable {
    public let core: PluginInstance
    let api: vqmoe_quantizer_api
    /// K (codes in [0, K)) and L (codes per token).
    public let codebookSize: Int
    public let codesPerToken: Int

    public init(_ core: PluginInstance) throws {
        guard core.library.kind == .quantizer else { throw VQMoEError(.plugin, "\(core.describe) is not a quantizer") }
        self.core = core
        let api = core.library.desc.pointee.kind_api!.load(as: vqmoe_quantizer_api.self)
        self.api = api
        var s = vqmoe_quantizer_shape(
            struct_size: structSize(vqmoe_quantizer_shape.self), codebook_size: 0, codes_per_token: 0)
        try core.call("shape") { api.shape!(core.handle, &s) }
        guard s.codebook_size >= 1, s.codes_per_token >= 1 else {
            throw VQMoEError(.plugin, "\(core.describe): shape() gave K = \(s.codebook_size), L = \(s.codes_per_token)")
        }
        codebookSize = Int(s.codebook_size)
        codesPerToken = Int(s.codes_per_token)
    }

    public var dModel: Int { core.dims.dModel }

    func wrap(_ ctx: UnsafeMutableRawPointer?) -> PluginContext? {
        guard let ctx else { return nil }
        let api = self.api, core = self.core
        return PluginContext(ctx) { p in api.free_ctx!(core.handle, p) }
    }

    /// x (N,d) → quantized (N,d), codes (N,L), code counts (K); returns the unweighted loss.
    public func forward(
        _ step: StepInfo, x: UnsafePointer<Float>, n: Int, quantized: UnsafeMutablePointer<Float>,
        codes: UnsafeMutablePointer<Int32>, codeCounts: UnsafeMutablePointer<Float>
    ) throws -> (loss: Float, ctx: PluginContext?) {
        let a = TensorArena()
        var input = vqmoe_quantizer_input(
            struct_size: structSize(vqmoe_quantizer_input.self), x: a.f32(x, [n, dModel]))
        var out = vqmoe_quantizer_output(
            struct_size: structSize(vqmoe_quantizer_output.self),
            quantized: a.f32(quantized, [n, dModel]), codes: a.i32(codes, [n, codesPerToken]),
            code_counts: a.f32(codeCounts, [codebookSize]), loss: 0)
        var s = step.c
        var ctx: UnsafeMutableRawPointer?
        try core.call("forward") { api.forward!(core.handle, &s, &input, &out, &ctx) }
        let context = wrap(ctx)
        try core.checkFinite(quantized, n * dModel, "quantized vector")
        for i in 0..<(n * codesPerToken) where codes[i] < 0 || Int(codes[i]) >= codebookSize {
            throw VQMoEError(
                .plugin, "\(core.describe) failed in forward: code \(codes[i]) outside [0, \(codebookSize))")
        }
        guard out.loss.isFinite else {
            throw VQMoEError(.numeric, "\(core.describe) produced a non-finite quantizer loss (\(out.loss))")
        }
        return (out.loss, context)
    }

    /// Accumulate dL/dx (N,d) and parameter gradients.
    public func backward(
        _ ctx: PluginContext, n: Int, gradQuantized: UnsafePointer<Float>?, gradLoss: Float,
        gradX: UnsafeMutablePointer<Float>
    ) throws {
        let a = TensorArena()
        var gin = vqmoe_quantizer_grad_in(
            struct_size: structSize(vqmoe_quantizer_grad_in.self),
            grad_quantized: gradQuantized.map { a.f32($0, [n, dModel]) } ?? TensorArena.absent,
            grad_loss: gradLoss)
        var gout = vqmoe_quantizer_grad_out(
            struct_size: structSize(vqmoe_quantizer_grad_out.self), grad_x: a.f32(gradX, [n, dModel]))
        let finite = PluginInstance.finite([(gradQuantized, n * dModel), (UnsafePointer(gradX), n * dModel)])
        try core.call("backward") { api.backward!(core.handle, ctx.pointer, &gin, &gout) }
        try core.checkBackward(gradX: gradX, count: n * dModel, inputsWereFinite: finite && gradLoss.isFinite)
    }
}
