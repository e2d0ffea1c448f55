// One smoe_dropout router instance: its model facts, hyperparameters and the one host buffer
// it declared, the frozen random router weight (E,d) -- a STATE buffer, never trained.
import PluginKit
import VQMoEABI

/// Name of the declared buffer (static storage, as `vqmoe_buffer_spec.name` requires).
nonisolated(unsafe) let weightBufferName = staticCString("weight")

/// SMoE-Dropout (Chen et al. 2023, "Sparse MoE as the New Dropout"): logits = x W^T with a
/// randomly initialised W that is never updated, keep the top k(step) of the logits, where k
/// grows linearly from k_min to k_max over training, softmax over the kept logits.
///
/// W is declared as STATE, not PARAM: the optimizer never sees it and checkpoints keep it,
/// so a resumed run routes exactly as before. Gradients still flow through W to x.
final class SMoEDropoutRouter {
    let host: Host
    let config: SMoEDropoutConfig
    /// d: input width.
    let dModel: Int
    /// E: number of experts.
    let nExperts: Int

    /// (E,d) the frozen router weight (state).
    private(set) var weight: UnsafeMutablePointer<Float>?

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        let i = info.pointee
        guard i.d_model >= 1 else { throw .invalid("d_model = \(i.d_model): the router needs d_model >= 1") }
        guard i.n_experts >= 1 else { throw .invalid("n_experts = \(i.n_experts): the router needs n_experts >= 1") }
        dModel = Int(i.d_model)
        nExperts = Int(i.n_experts)
        config = try SMoEDropoutConfig(hp, nExperts: nExperts)
    }

    /// Buffer 0: "weight" (E,d) float32 STATE.
    func bufferSpec(_ i: Int, _ out: UnsafeMutablePointer<vqmoe_buffer_spec>?) throws(PluginFailure) {
        guard let out else { throw .invalid("buffer_spec: out is NULL") }
        guard i == 0 else { throw .invalid("buffer index \(i) outside [0, 1)") }
        var s = vqmoe_buffer_spec()
        s.struct_size = UInt32(MemoryLayout<vqmoe_buffer_spec>.size)
        s.name = weightBufferName
        s.role = VQMOE_BUF_STATE
        s.dtype = vqmoe_f32()
        s.ndim = 2
        s.shape = (Int64(nExperts), Int64(dModel), 0, 0, 0, 0)
        out.pointee = s
    }

    func bind(_ bindings: UnsafePointer<vqmoe_buffer_binding>?, _ n: Int) throws(PluginFailure) {
        guard n == 1 else { throw .invalid("bind_buffers got \(n) bindings, the router declared 1") }
        guard let bindings else { throw .invalid("bind_buffers: bindings is NULL") }
        guard let w = bindings[0].data else { throw .invalid("bind_buffers: 'weight' has no data") }
        weight = w.assumingMemoryBound(to: Float.self)
    }

    /// The bound weight, or a STATE error before bind_buffers.
    func boundWeight() throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        guard let weight else { throw .state("called before bind_buffers") }
        return weight
    }

    /// W ~ N(0, init_std^2) from the host stream (seed, 0) -- the reference code's
    /// normal(0, 0.02) init of every linear layer; its router bias starts at 0 and is frozen
    /// too, so it is left out.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        let w = try boundWeight()
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(nExperts * dModel) { w[i] = config.initStd * host.normal(&r) }
    }
}
