// dense forward: expert 0, weight 1, for every token.
import PluginKit
import VQMoEABI

/// The saved context: only the sizes backward checks (the weights are the constant 1, so
/// nothing flows back). Saved in train mode so that the host's backward pass runs as for
/// any router.
final class RouterContext {
    let n: Int, d: Int
    init(n: Int, d: Int) { self.n = n; self.d = d }
}

extension DenseRouter {
    func shape(_ out: UnsafeMutablePointer<vqmoe_router_shape>?) throws(PluginFailure) {
        guard let out else { throw .invalid("shape: out is NULL") }
        out.pointee.mode = VQMOE_ROUTE_TOPK
        out.pointee.k = 1
        out.pointee.slots_per_expert = 0
    }

    /// expert_index_t = 0, weights_t = 1                        (N,1)
    /// aux_loss = 0; expert_load = (N, 0, ..., 0)                 (E)
    func forward(
        _ stepPtr: UnsafePointer<vqmoe_step_info>?, _ inPtr: UnsafePointer<vqmoe_router_input>?,
        _ outPtr: UnsafeMutablePointer<vqmoe_router_output>?,
        _ ctxOut: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
    ) throws(PluginFailure) {
        ctxOut?.pointee = nil
        guard let stepPtr, let inPtr, let outPtr else { throw .invalid("forward: step, input or output is NULL") }
        try requireSize(inPtr.pointee.struct_size, vqmoe_router_input.self, "router input")
        try requireSize(outPtr.pointee.struct_size, vqmoe_router_output.self, "router output")
        let flags = stepPtr.pointee.flags
        let saveContext = flags & VQMOE_STEP_TRAIN != 0 && flags & VQMOE_STEP_NO_GRAD == 0
        let d = dModel, e = nExperts
        let n = try rowsOf(inPtr.pointee.x, cols: d, "x")
        _ = try requireF32(inPtr.pointee.x, [n, d], "x")
        let index = try requireI32(outPtr.pointee.expert_index, [n, 1], "expert_index")
        let gates = try requireF32(outPtr.pointee.weights, [n, 1], "weights")
        let load = try requireF32(outPtr.pointee.expert_load, [e], "expert_load")
        index.update(repeating: 0, count: n)
        gates.update(repeating: 1, count: n)
        load.update(repeating: 0, count: e)
        load[0] = Float(n)
        outPtr.pointee.aux_loss = 0
        if saveContext { ctxOut?.pointee = Handle.context(RouterContext(n: n, d: d)) }
    }
}
