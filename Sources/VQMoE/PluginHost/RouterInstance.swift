import VQMoEABI

/// How a router hands tokens to experts this step.
public struct RouterShape: Sendable, Equatable {
    public enum Mode: Sendable, Equatable { case topK, dense }
    public var mode: Mode
    /// Experts per token (top-k).
    public var k: Int
    /// Slots per expert (dense / SoftMoE).
    public var slotsPerExpert: Int
    public init(mode: Mode, k: Int, slotsPerExpert: Int = 0) {
        self.mode = mode; self.k = k; self.slotsPerExpert = slotsPerExpert
    }
}

/// Host-allocated router outputs for N tokens (see `vqmoe_router_output`).
public struct RouterOutputs {
    public var expertIndex: UnsafeMutablePointer<Int32>?  // (N,k)
    public var weights: UnsafeMutablePointer<Float>?  // (N,k)
    public var dispatch: UnsafeMutablePointer<Float>?  // (N,E*S)
    public var combine: UnsafeMutablePointer<Float>?  // (N,E*S)
    public var expertLoad: UnsafeMutablePointer<Float>  // (E)
    public init(
        expertIndex: UnsafeMutablePointer<Int32>? = nil, weights: UnsafeMutablePointer<Float>? = nil,
        dispatch: UnsafeMutablePointer<Float>? = nil, combine: UnsafeMutablePointer<Float>? = nil,
        expertLoad: UnsafeMutablePointer<Float>
    ) {
        self.expertIndex = expertIndex; self.weights = weights; self.dispatch = dispatch
        self.combine = combine; self.expertLoad = expertLoad
    }
}

/// A router plugin instance with Swift calls over raw buffers.
///
/// ```swift
/// let core = try PluginInstance(library: lib, instanceName: "l0.router", dims: dims, hyperparameters: hp, seed: 1)
/// let r = try RouterInstance(core)
/// let shape = try r.shape(step)                       // k for this step
/// let (aux, ctx) = try r.forward(step, x: x, tokenIDs: nil, nGroups: B, groupSize: T, outputs: outs)
/// try r.backward(ctx!, n: B*T, shape: shape, gradWeights: gW, gradAux: 1, gradX: dx)
/// ```
public final class RouterInstance: @unchecked Sendable {
    public let core: PluginInstance
    let api: vqmoe_router_api

    public init(_ core: PluginInstance) throws {
        guard core.library.kind == .router else { throw VQMoEError(.plugin, "\(core.describe) is not a router") }
        self.core = core
        api = core.library.desc.pointee.kind_api!.load(as: vqmoe_router_api.self)
    }

    public var nExperts: Int { core.dims.nExperts }
    public var dModel: Int { core.dims.dModel }

    public func shape(_ step: StepInfo) throws -> RouterShape {
        var s = step.c
        var out = vqmoe_router_shape(
            struct_size: structSize(vqmoe_router_shape.self), mode: 0, k: 0, slots_per_expert: 0)
        try core.call("shape") { api.shape!(core.handle, &s, &out) }
        switch out.mode {
        case VQMOE_ROUTE_TOPK:
            guard out.k >= 1 && Int(out.k) <= nExperts else {
                throw VQMoEError(.plugin, "\(core.describe): shape() gave k = \(out.k), outside [1, \(nExperts)]")
            }
            return RouterShape(mode: .topK, k: Int(out.k))
        case VQMOE_ROUTE_DENSE:
            guard out.slots_per_expert >= 1 else {
                throw VQMoEError(.plugin, "\(core.describe): dense routing needs slots_per_expert >= 1")
            }
            return RouterShape(mode: .dense, k: 0, slotsPerExpert: Int(out.slots_per_expert))
        default:
            throw VQMoEError(.plugin, "\(core.describe): shape() gave unknown mode \(out.mode)")
        }
    }

    /// x (N,d) with N = nGroups*groupSize. Returns the weighted aux loss and the saved context
    /// (nil in eval / no-grad mode).
    public func forward(
        _ step: StepInfo, x: UnsafePointer<Float>, tokenIDs: UnsafePointer<Int32>?,
        nGroups: Int, groupSize: Int, shape: RouterShape,
        outputs o: RouterOutputs
    ) throws -> (aux: Float, ctx: PluginContext?) {
        // Token ids go along whenever the model has them; a router whose configuration needs them
        // (StableMoE's distilled router) refuses their absence itself, naming the fix.
        let n = nGroups * groupSize, d = dModel, e = nExperts
        let a = TensorArena()
        var input = vqmoe_router_input(
            struct_size: structSize(vqmoe_router_input.self), x: a.f32(x, [n, d]),
            token_ids: tokenIDs.map { a.i32($0, [n]) } ?? TensorArena.absent,
            n_groups: Int64(nGroups), group_size: Int64(groupSize))
        let es = e * shape.slotsPerExpert
        var out = vqmoe_router_output(
            struct_size: structSize(vqmoe_router_output.self),
            expert_index: shape.mode == .topK ? a.i32(o.expertIndex, [n, shape.k]) : TensorArena.absent,
            weights: shape.mode == .topK ? a.f32(o.weights, [n, shape.k]) : TensorArena.absent,
            dispatch: shape.mode == .dense ? a.f32(o.dispatch, [n, es]) : TensorArena.absent,
            combine: shape.mode == .dense ? a.f32(o.combine, [n, es]) : TensorArena.absent,
            expert_load: a.f32(o.expertLoad, [e]), aux_loss: 0)
        var s = step.c
        var ctx: UnsafeMutableRawPointer?
        try core.call("forward") { api.forward!(core.handle, &s, &input, &out, &ctx) }
        let context = wrap(ctx, step)
        if shape.mode == .topK {
            try core.checkFinite(o.weights, n * shape.k, "routing weight")
            for i in 0..<(n * shape.k) where o.expertIndex![i] < 0 || Int(o.expertIndex![i]) >= e {
                throw VQMoEError(
                    .plugin, "\(core.describe) failed in forward: expert index \(o.expertIndex![i]) outside [0, \(e))")
            }
        } else {
            try core.checkFinite(o.dispatch, n * es, "dispatch weight")
            try core.checkFinite(o.combine, n * es, "combine weight")
        }
        guard out.aux_loss.isFinite else {
            throw VQMoEError(.numeric, "\(core.describe) produced a non-finite aux loss (\(out.aux_loss))")
        }
        return (out.aux_loss, context)
    }

    func wrap(_ ctx: UnsafeMutableRawPointer?, _ step: StepInfo) -> PluginContext? {
        guard let ctx else { return nil }
        let api = self.api, core = self.core
        return PluginContext(ctx) { p in api.free_ctx!(core.handle, p) }
    }

    /// Accumulate dL/dx into gradX (N,d) and parameter gradients into the host's buffers.
    public func backward(
        _ ctx: PluginContext, n: Int, shape: RouterShape,
        gradWeights: UnsafePointer<Float>? = nil, gradDispatch: UnsafePointer<Float>? = nil,
        gradCombine: UnsafePointer<Float>? = nil, gradAux: Float,
        gradX: UnsafeMutablePointer<Float>
    ) throws {
        guard let bw = api.backward else { return }  // non-trainable, no input gradient
        let a = TensorArena()
        let es = nExperts * shape.slotsPerExpert
        var gin = vqmoe_router_grad_in(
            struct_size: structSize(vqmoe_router_grad_in.self),
            grad_weights: gradWeights.map { a.f32($0, [n, shape.k]) } ?? TensorArena.absent,
            grad_dispatch: gradDispatch.map { a.f32($0, [n, es]) } ?? TensorArena.absent,
            grad_combine: gradCombine.map { a.f32($0, [n, es]) } ?? TensorArena.absent,
            grad_aux_loss: gradAux)
        var gout = vqmoe_router_grad_out(
            struct_size: structSize(vqmoe_router_grad_out.self), grad_x: a.f32(gradX, [n, dModel]))
        let finite = PluginInstance.finite([
            (gradWeights, n * shape.k), (gradDispatch, n * es), (gradCombine, n * es),
            (UnsafePointer(gradX), n * dModel),
        ])
        try core.call("backward") { bw(core.handle, ctx.pointer, &gin, &gout) }
        try core.checkBackward(gradX: gradX, count: n * dModel, inputsWereFinite: finite && gradAux.isFinite)
    }
}
