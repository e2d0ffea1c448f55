// One smoe router instance: its model facts, hyperparameters and the host buffers it
// declared (weight (E,d), optional bias (E)).
import PluginKit
import VQMoEABI

/// Names of the declared buffers (static storage, as `vqmoe_buffer_spec.name` requires).
nonisolated(unsafe) let weightBufferName = staticCString("weight")
nonisolated(unsafe) let biasBufferName = staticCString("bias")

/// A Mixtral-style top-k router: logits = x W^T (+ b), keep the k largest, softmax over them.
final class SMoERouter {
    let host: Host
    let config: SMoEConfig
    /// d: input width.
    let dModel: Int
    /// E: number of experts.
    let nExperts: Int

    /// (E,d) router weight and its gradient (nil when the host freezes it).
    private(set) var weight: UnsafeMutablePointer<Float>?
    private(set) var weightGrad: UnsafeMutablePointer<Float>?
    /// (E) logit bias and its gradient, with `bias = true`.
    private(set) var bias: UnsafeMutablePointer<Float>?
    private(set) var biasGrad: UnsafeMutablePointer<Float>?

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        let i = info.pointee
        guard i.d_model >= 1 else { throw .invalid("d_model = \(i.d_model): the router needs d_model >= 1") }
        guard i.n_experts >= 1 else { throw .invalid("n_experts = \(i.n_experts): the router needs n_experts >= 1") }
        dModel = Int(i.d_model)
        nExperts = Int(i.n_experts)
        config = try SMoEConfig(hp, nExperts: nExperts)
    }

    var bufferCount: Int { config.bias ? 2 : 1 }

    /// Buffer 0: "weight" (E,d) PARAM; buffer 1 (with bias): "bias" (E) PARAM, no decay.
    func bufferSpec(_ i: Int, _ out: UnsafeMutablePointer<vqmoe_buffer_spec>?) throws(PluginFailure) {
        guard let out else { throw .invalid("buffer_spec: out is NULL") }
        guard i >= 0 && i < bufferCount else { throw .invalid("buffer index \(i) outside [0, \(bufferCount))") }
        var s = vqmoe_buffer_spec()
        s.struct_size = UInt32(MemoryLayout<vqmoe_buffer_spec>.size)
        s.role = VQMOE_BUF_PARAM
        s.dtype = vqmoe_f32()
        if i == 0 {
            s.name = weightBufferName
            s.ndim = 2
            s.shape = (Int64(nExperts), Int64(dModel), 0, 0, 0, 0)
        } else {
            s.name = biasBufferName
            s.flags = VQMOE_BUF_NO_DECAY
            s.ndim = 1
            s.shape = (Int64(nExperts), 0, 0, 0, 0, 0)
        }
        out.pointee = s
    }

    func bind(_ bindings: UnsafePointer<vqmoe_buffer_binding>?, _ n: Int) throws(PluginFailure) {
        guard n == bufferCount else {
            throw .invalid("bind_buffers got \(n) bindings, the router declared \(bufferCount)")
        }
        guard let bindings else { throw .invalid("bind_buffers: bindings is NULL") }
        guard let w = bindings[0].data else { throw .invalid("bind_buffers: 'weight' has no data") }
        weight = w.assumingMemoryBound(to: Float.self)
        weightGrad = bindings[0].grad
        if config.bias {
            guard let b = bindings[1].data else { throw .invalid("bind_buffers: 'bias' has no data") }
            bias = b.assumingMemoryBound(to: Float.self)
            biasGrad = bindings[1].grad
        }
    }

    /// The bound weight, or a STATE error before bind_buffers.
    func boundWeight() throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        guard let weight else { throw .state("called before bind_buffers") }
        return weight
    }

    /// W ~ N(0, init_std^2) from the host stream (seed, 0); bias = 0.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        let w = try boundWeight()
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(nExperts * dModel) { w[i] = config.initStd * host.normal(&r) }
        bias?.update(repeating: 0, count: nExperts)
    }
}
