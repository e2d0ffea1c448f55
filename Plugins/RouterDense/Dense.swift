// The `dense` router ("no routing"): every token goes to expert 0 with weight 1.
//
//     expert_index_t = 0, weights_t = 1                          (N,1)
//     aux_loss = 0; expert_load = (N, 0, ..., 0)                  (E)
//     backward: the weights are the constant 1 and the aux loss is 0, so nothing flows back
//               (grad_x is left as it is: += 0)
//
// With n_experts = 1 the MoE layer is a plain dense FFN, the dense baseline of the paper's
// tables: d_inner = the per-expert width matches the active compute of a top-1 SMoE, and
// d_inner = E x the per-expert width matches its total parameters. With n_experts > 1 the
// other experts are never used (a warning is logged at create). No hyperparameters, no buffers.
import PluginKit
import VQMoEABI

final class DenseRouter: RouterPlugin {
    static let name = "dense", version = "1.0.0"
    /// No batch statistics: the same loss (none) on every rank of a data-parallel run.
    static let flags = UInt32(VQMOE_PLUGIN_GLOBAL_BATCH)
    static let summary =
        "no routing: every token goes to expert 0 with weight 1 (k = 1, no parameters, aux 0); with n_experts = 1 "
        + "the MoE layer is a plain dense FFN (the dense baseline: match active compute with d_inner, total parameters "
        + "with d_inner = E * d_inner)"

    /// E: number of experts in the layer (only expert 0 is used).
    let e: Int

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        e = model.nExperts
        guard model.dModel >= 1 else { throw .invalid("d_model = \(model.dModel): the router needs d_model >= 1") }
        guard e >= 1 else { throw .invalid("n_experts = \(e): the router needs n_experts >= 1") }
        if e > 1, let log = model.host.api.pointee.log {
            let name = model.instanceName.isEmpty ? "dense" : model.instanceName
            let msg =
                "\(name): n_experts = \(e) but the dense router sends every token to expert 0; "
                + "experts 1..\(e - 1) are never used (set n_experts = 1 for the dense baseline)"
            msg.withCString { m in "dense".withCString { log(VQMOE_LOG_WARN, $0, m) } }
        }
    }

    func shape(_ step: Step) throws(PluginFailure) -> RouterShape { .topK(1) }

    /// The context (kept in training only) carries nothing: it lets the host's backward pass
    /// run as for any router.
    func forward(_ step: Step, _ io: RouterForward) throws(PluginFailure) -> (aux: Float, context: Any?) {
        io.index!.update(repeating: 0, count: io.n)
        io.weights!.update(repeating: 1, count: io.n)
        io.load.update(repeating: 0, count: e)
        io.load[0] = Float(io.n)
        return (0, ())
    }

    func backward(_ context: Any, _ g: RouterBackward) throws(PluginFailure) {}
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(DenseRouter.self, host)
}
