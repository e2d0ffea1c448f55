// One dense router instance: its model facts. It declares no buffers.
import PluginKit
import VQMoEABI

/// "No routing": every token goes to expert 0 with weight 1.
///
/// With n_experts = 1 the MoE layer is a plain dense FFN, the dense baseline of the paper's
/// tables: d_inner = the per-expert width matches the active compute of a top-1 SMoE, and
/// d_inner = E x the per-expert width matches its total parameters. With n_experts > 1 the
/// other experts are never used (a warning is logged at create).
final class DenseRouter {
    let host: Host
    let config: DenseConfig
    /// d: input width.
    let dModel: Int
    /// E: number of experts in the layer (only expert 0 is used).
    let nExperts: Int

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        let i = info.pointee
        guard i.d_model >= 1 else { throw .invalid("d_model = \(i.d_model): the router needs d_model >= 1") }
        guard i.n_experts >= 1 else { throw .invalid("n_experts = \(i.n_experts): the router needs n_experts >= 1") }
        dModel = Int(i.d_model)
        nExperts = Int(i.n_experts)
        config = DenseConfig(hp)
        if nExperts > 1, let log = host.api.pointee.log {
            let name = i.instance_name.map { String(cString: $0) } ?? "dense"
            let msg =
                "\(name): n_experts = \(nExperts) but the dense router sends every token to expert 0; "
                + "experts 1..\(nExperts - 1) are never used (set n_experts = 1 for the dense baseline)"
            msg.withCString { m in "dense".withCString { log(VQMOE_LOG_WARN, $0, m) } }
        }
    }

    /// No buffers: bind_buffers must get n = 0 (bindings may be NULL).
    func bind(_ n: Int) throws(PluginFailure) {
        guard n == 0 else { throw .invalid("bind_buffers got \(n) bindings, the dense router declared none") }
    }
}
