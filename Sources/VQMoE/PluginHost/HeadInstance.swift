import VQMoEABI

/// A head plugin instance (LM or classifier) with Swift calls over raw buffers.
///
/// ```swift
/// let head = try HeadInstance(core)
/// let r = try head.forward(step, h: h, batch: B, seq: T, targets: y, logits: logits)
/// try head.backward(r.ctx!, batch: B, seq: T, gradLoss: 1, gradH: dh)
/// ```
public final class HeadInstance: @unchecked Sendable {
    public let core: PluginInstance
    let api: vqmoe_head_api
    public let perToken: Bool
    public let nOut: Int
    public let isLM: Bool

    /// Result of a head forward: mean loss, exact sums for aggregation, saved context.
    public struct Result {
        public var loss: Float
        public var lossSum: Double
        public var count: Int
        public var correct: Int
        public var ctx: PluginContext?
    }

    public init(_ core: PluginInstance) throws {
        guard core.library.kind == .head else { throw VQMoEError(.plugin, "\(core.describe) is not a head") }
        self.core = core
        let api = core.library.desc.pointee.kind_api!.load(as: vqmoe_head_api.self)
        self.api = api
        var s = vqmoe_head_shape(struct_size: structSize(vqmoe_head_shape.self), per_token: 0, n_out: 0, is_lm: 0)
        try core.call("shape") { api.shape!(core.handle, &s) }
        guard s.n_out >= 1 else { throw VQMoEError(.plugin, "\(core.describe): shape() gave n_out = \(s.n_out)") }
        perToken = s.per_token != 0
        nOut = Int(s.n_out)
        isLM = s.is_lm != 0
    }

    public var dModel: Int { core.dims.dModel }

    func wrap(_ ctx: UnsafeMutableRawPointer?) -> PluginContext? {
        guard let ctx else { return nil }
        let api = self.api, core = self.core
        return PluginContext(ctx) { p in api.free_ctx!(core.handle, p) }
    }
    public func rows(batch: Int, seq: Int) -> Int { perToken ? batch * seq : batch }

    /// h (B,T,d), targets (B,T) or (B) int32 (nil: logits only), lengths (B) real tokens per
    /// sequence (nil: all real) → logits (rows, n_out).
    public func forward(
        _ step: StepInfo, h: UnsafePointer<Float>, batch: Int, seq: Int,
        targets: UnsafePointer<Int32>?, lengths: UnsafePointer<Int32>? = nil,
        logits: UnsafeMutablePointer<Float>
    ) throws -> Result {
        let a = TensorArena()
        let rows = self.rows(batch: batch, seq: seq)
        var input = vqmoe_head_input(
            struct_size: structSize(vqmoe_head_input.self), h: a.f32(h, [batch, seq, dModel]),
            targets: targets.map { a.i32($0, perToken ? [batch, seq] : [batch]) } ?? TensorArena.absent,
            lengths: lengths.map { a.i32($0, [batch]) } ?? TensorArena.absent)
        var out = vqmoe_head_output(
            struct_size: structSize(vqmoe_head_output.self), logits: a.f32(logits, [rows, nOut]),
            loss: 0, loss_sum: 0, count: 0, correct: 0)
        var s = step.c
        var ctx: UnsafeMutableRawPointer?
        try core.call("forward") { api.forward!(core.handle, &s, &input, &out, &ctx) }
        let context = wrap(ctx)
        try core.checkFinite(logits, rows * nOut, "logit")
        guard out.loss.isFinite else {
            throw VQMoEError(.numeric, "\(core.describe) produced a non-finite loss (\(out.loss))")
        }
        return Result(
            loss: out.loss, lossSum: out.loss_sum, count: Int(out.count), correct: Int(out.correct), ctx: context)
    }

    /// Accumulate dL/dh (B,T,d) and parameter gradients.
    public func backward(
        _ ctx: PluginContext, batch: Int, seq: Int, gradLoss: Float, gradH: UnsafeMutablePointer<Float>
    ) throws {
        let a = TensorArena()
        var gin = vqmoe_head_grad_in(struct_size: structSize(vqmoe_head_grad_in.self), grad_loss: gradLoss)
        var gout = vqmoe_head_grad_out(
            struct_size: structSize(vqmoe_head_grad_out.self), grad_h: a.f32(gradH, [batch, seq, dModel]))
        let count = batch * seq * dModel
        let finite = PluginInstance.finite([(UnsafePointer(gradH), count)])
        try core.call("backward") { api.backward!(core.handle, ctx.pointer, &gin, &gout) }
        try core.checkBackward(gradX: gradH, count: count, inputsWereFinite: finite && gradLoss.isFinite)
    }
}
