// Routers on the kit: `RouterPlugin` and the vqmoe_router_api table that serves every one.
import Glibc
import VQMoEABI

/// How a router hands tokens to experts this step.
public enum RouterShape {
    /// Sparse: k experts per token, with weights.
    case topK(Int)
    /// Dense (SoftMoE): dispatch and combine over E·S slots, S per expert.
    case dense(slotsPerExpert: Int)
}

/// A router forward's tensors, checked by the kit: x (N,d) and the outputs the host allocated
/// for this step's shape.
public struct RouterForward {
    public let x: UnsafePointer<Float>
    /// Token ids (N), when the model has them.
    public let tokenIDs: UnsafePointer<Int32>?
    public let n: Int, d: Int, nGroups: Int, groupSize: Int
    /// The outputs' second dimension: k (top-k), or E·S (dense).
    public let width: Int
    /// Top-k: expert index and weight (N,k).
    public let index: UnsafeMutablePointer<Int32>?, weights: UnsafeMutablePointer<Float>?
    /// Dense: dispatch and combine (N, E·S).
    public let dispatch: UnsafeMutablePointer<Float>?, combine: UnsafeMutablePointer<Float>?
    /// Assignments (or dispatch mass) per expert (E).
    public let load: UnsafeMutablePointer<Float>
}

/// A router backward's tensors: dL/d outputs (absent = zero), dL/d aux, and grad_x (N,d) to
/// accumulate into; `frozen` is the forward's VQMOE_STEP_FROZEN (no parameter gradients).
public struct RouterBackward {
    public let gradWeights: UnsafePointer<Float>?
    public let gradDispatch: UnsafePointer<Float>?, gradCombine: UnsafePointer<Float>?
    public let gradAux: Float
    public let gradX: UnsafeMutablePointer<Float>
    public let n: Int
    public let frozen: Bool
}

/// A router component. `forward` returns the weighted aux loss and, in training, a context the
/// kit keeps for `backward` (nil for none). A router without a backward declares
/// VQMOE_PLUGIN_NO_GRAD in `flags` and keeps the default.
///
/// ```swift
/// final class MyRouter: RouterPlugin {
///     func shape(_ step: Step) throws(PluginFailure) -> RouterShape { .topK(1) }
///     func forward(_ step: Step, _ io: RouterForward) throws(PluginFailure) -> (aux: Float, context: Any?) { … }
/// }
/// ```
public protocol RouterPlugin: PluginComponent {
    func shape(_ step: Step) throws(PluginFailure) -> RouterShape
    func forward(_ step: Step, _ io: RouterForward) throws(PluginFailure) -> (aux: Float, context: Any?)
    func backward(_ context: Any, _ g: RouterBackward) throws(PluginFailure)
    /// A top-k forward whose outputs the host sized (N, `allocated`), not (N, k) for this step's
    /// `k` (a host may size them from another step's shape): the k to route with, or a SHAPE
    /// failure. Default: `k`, so the kit's shape check refuses the outputs.
    func topKWidth(_ allocated: Int, k: Int) throws(PluginFailure) -> Int
}

extension RouterPlugin {
    public func backward(_ context: Any, _ g: RouterBackward) throws(PluginFailure) {
        throw .state("this router has no backward")
    }
    public func topKWidth(_ allocated: Int, k: Int) throws(PluginFailure) -> Int { k }
}

private func router(_ inst: Instance) throws(PluginFailure) -> RouterPlugin {
    guard let r = inst.component as? RouterPlugin else { throw .state("not a router") }
    return r
}

/// The output width of a shape: k, or E·S.
private func width(_ shape: RouterShape, experts: Int) -> Int {
    switch shape {
    case .topK(let k): return k
    case .dense(let s): return experts * s
    }
}

/// vqmoe_router_api of every kit router; `routerTableNoBackward` for VQMOE_PLUGIN_NO_GRAD ones.
nonisolated(unsafe) let routerTable: UnsafeRawPointer = {
    let p = UnsafeMutablePointer<vqmoe_router_api>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_router_api(
            struct_size: UInt32(MemoryLayout<vqmoe_router_api>.size),
            shape: { inst, step, out in
                call(inst, bound: false) { i throws(PluginFailure) in
                    guard let out else { throw .invalid("shape: out is NULL") }
                    switch try router(i).shape(try Step(step)) {
                    case .topK(let k):
                        guard k >= 1 && k <= i.model.nExperts else {
                            throw .invalid("k = \(k) is outside [1, n_experts = \(i.model.nExperts)]")
                        }
                        (out.pointee.mode, out.pointee.k, out.pointee.slots_per_expert) = (
                            VQMOE_ROUTE_TOPK, Int32(k), 0
                        )
                    case .dense(let s):
                        (out.pointee.mode, out.pointee.k, out.pointee.slots_per_expert) = (
                            VQMOE_ROUTE_DENSE, 0, Int32(s)
                        )
                    }
                }
            },
            forward: { inst, step, input, output, ctx in
                ctx?.pointee = nil
                return call(inst) { i throws(PluginFailure) in try routerForward(i, step, input, output, ctx) }
            },
            backward: { inst, ctx, gin, gout in
                call(inst) { i throws(PluginFailure) in try routerBackward(i, ctx, gin, gout) }
            },
            free_ctx: { _, ctx in releaseContext(ctx) }))
    return UnsafeRawPointer(p)
}()

nonisolated(unsafe) let routerTableNoBackward: UnsafeRawPointer = {
    let p = UnsafeMutablePointer<vqmoe_router_api>.allocate(capacity: 1)
    p.initialize(to: routerTable.load(as: vqmoe_router_api.self))
    p.pointee.backward = nil
    return UnsafeRawPointer(p)
}()

private func routerForward(
    _ inst: Instance, _ stepPtr: UnsafePointer<vqmoe_step_info>?, _ input: UnsafePointer<vqmoe_router_input>?,
    _ output: UnsafeMutablePointer<vqmoe_router_output>?, _ ctx: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
) throws(PluginFailure) {
    guard let input, let output else { throw .invalid("forward: input or output is NULL") }
    try requireSize(input.pointee.struct_size, vqmoe_router_input.self, "router input")
    try requireSize(output.pointee.struct_size, vqmoe_router_output.self, "router output")
    let r = try router(inst), step = try Step(stepPtr), d = inst.model.dModel, e = inst.model.nExperts
    let shape = try r.shape(step), io = input.pointee, out = output.pointee
    var w = width(shape, experts: e)
    let n = try rowsOf(io.x, cols: d, "x")
    let topK: Bool
    if case .topK = shape { topK = true } else { topK = false }
    guard io.n_groups >= 0, io.group_size >= 0, io.n_groups * io.group_size == Int64(n) else {
        throw .shape(
            "n_groups = \(io.n_groups) times group_size = \(io.group_size) must equal the \(n) tokens of x"
                + (topK ? "" : " (dispatch normalises within a group)"))
    }
    if topK, out.expert_index.ndim == 2, let s = out.expert_index.shape, Int(s[1]) != w {
        w = try r.topKWidth(Int(s[1]), k: w)
    }
    let f = RouterForward(
        x: try requireF32(io.x, [n, d], "x"),
        tokenIDs: io.token_ids.data == nil ? nil : UnsafePointer(try requireI32(io.token_ids, [n], "token_ids")),
        n: n, d: d, nGroups: Int(io.n_groups), groupSize: Int(io.group_size), width: w,
        index: topK ? try requireI32(out.expert_index, [n, w], "expert_index") : nil,
        weights: topK ? try requireF32(out.weights, [n, w], "weights") : nil,
        dispatch: topK ? nil : try requireF32(out.dispatch, [n, w], "dispatch"),
        combine: topK ? nil : try requireF32(out.combine, [n, w], "combine"),
        load: try requireF32(out.expert_load, [e], "expert_load"))
    let (aux, saved) = try r.forward(step, f)
    guard aux.isFinite else { throw .numeric("non-finite aux loss \(aux)") }
    output.pointee.aux_loss = aux
    keep(saved, step, rows: n, width: w, ctx)
}

private func routerBackward(
    _ inst: Instance, _ ctxPtr: UnsafeMutableRawPointer?, _ gin: UnsafePointer<vqmoe_router_grad_in>?,
    _ gout: UnsafePointer<vqmoe_router_grad_out>?
) throws(PluginFailure) {
    let c = try saved(ctxPtr)
    guard let gin, let gout else { throw .invalid("backward: grad_in or grad_out is NULL") }
    try requireSize(gin.pointee.struct_size, vqmoe_router_grad_in.self, "router grad_in")
    try requireSize(gout.pointee.struct_size, vqmoe_router_grad_out.self, "router grad_out")
    let g = gin.pointee, n = c.rows, w = c.width
    func optional(_ t: vqmoe_tensor, _ what: String) throws(PluginFailure) -> UnsafePointer<Float>? {
        t.data == nil ? nil : UnsafePointer(try requireF32(t, [n, w], what))
    }
    guard g.grad_aux_loss.isFinite else { throw .numeric("grad_aux_loss is \(g.grad_aux_loss)") }
    try router(inst).backward(
        c.saved,
        RouterBackward(
            gradWeights: try optional(g.grad_weights, "grad_weights"),
            gradDispatch: try optional(g.grad_dispatch, "grad_dispatch"),
            gradCombine: try optional(g.grad_combine, "grad_combine"), gradAux: g.grad_aux_loss,
            gradX: try requireF32(gout.pointee.grad_x, [n, inst.model.dModel], "grad_x"), n: n, frozen: c.frozen))
}
