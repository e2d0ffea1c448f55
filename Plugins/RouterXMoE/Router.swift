// One xmoe router instance: its model facts, hyperparameters and the host buffers it
// declared (projection (d_r,d), expert embeddings (E,d_r), learnable log-temperature (1)),
// and the per-step expert-embedding rescale (begin_step).
import Glibc
import PluginKit
import VQMoEABI

/// Names of the declared buffers (static storage, as `vqmoe_buffer_spec.name` requires).
nonisolated(unsafe) let projBufferName = staticCString("proj.weight")
nonisolated(unsafe) let embeddingsBufferName = staticCString("expert_embeddings")
nonisolated(unsafe) let logTemperatureBufferName = staticCString("log_temperature")

/// X-MoE (Chi et al. 2022, "On the Representation Collapse of Sparse Mixture of Experts"):
/// route in a low-dimensional space by cosine similarity,
///   h = W_p x (d -> d_r, no bias),   s_e = (h . e_e) / (||h|| ||e_e|| tau),
/// keep the top-k scores, weights = softmax over the kept scores (the paper's dimension
/// reduction + L2 normalisation + learnable temperature tau; the reference code's fixed
/// tau = 0.3 is temperature_mode = fixed).
final class XMoERouter {
    let host: Host
    let config: XMoEConfig
    /// d: input width.
    let dModel: Int
    /// E: number of experts.
    let nExperts: Int
    /// d_r: routing-space width.
    var routerDim: Int { config.routerDim }

    /// (d_r,d) projection W_p and its gradient (nil when the host freezes it).
    private(set) var proj: UnsafeMutablePointer<Float>?
    private(set) var projGrad: UnsafeMutablePointer<Float>?
    /// (E,d_r) expert embeddings e_e and their gradient.
    private(set) var embeddings: UnsafeMutablePointer<Float>?
    private(set) var embeddingsGrad: UnsafeMutablePointer<Float>?
    /// (1) log tau and its gradient (temperature_mode = learnable only).
    private(set) var logTemperature: UnsafeMutablePointer<Float>?
    private(set) var logTemperatureGrad: UnsafeMutablePointer<Float>?

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        let i = info.pointee
        guard i.d_model >= 1 else { throw .invalid("d_model = \(i.d_model): the router needs d_model >= 1") }
        guard i.n_experts >= 1 else { throw .invalid("n_experts = \(i.n_experts): the router needs n_experts >= 1") }
        dModel = Int(i.d_model)
        nExperts = Int(i.n_experts)
        config = try XMoEConfig(hp, nExperts: nExperts)
    }

    var bufferCount: Int { config.learnableTemperature ? 3 : 2 }

    /// Buffer 0: "proj.weight" (d_r,d); 1: "expert_embeddings" (E,d_r), no weight decay (the
    /// scores only see their directions, so decay would only shrink them, i.e. raise the
    /// effective step size); 2 (learnable temperature only): "log_temperature" (1), no
    /// weight decay. All PARAM.
    func bufferSpec(_ i: Int, _ out: UnsafeMutablePointer<vqmoe_buffer_spec>?) throws(PluginFailure) {
        guard let out else { throw .invalid("buffer_spec: out is NULL") }
        guard i >= 0 && i < bufferCount else { throw .invalid("buffer index \(i) outside [0, \(bufferCount))") }
        var s = vqmoe_buffer_spec()
        s.struct_size = UInt32(MemoryLayout<vqmoe_buffer_spec>.size)
        s.role = VQMOE_BUF_PARAM
        s.dtype = vqmoe_f32()
        switch i {
        case 0:
            s.name = projBufferName
            s.ndim = 2
            s.shape = (Int64(routerDim), Int64(dModel), 0, 0, 0, 0)
        case 1:
            s.name = embeddingsBufferName
            s.flags = VQMOE_BUF_NO_DECAY
            s.ndim = 2
            s.shape = (Int64(nExperts), Int64(routerDim), 0, 0, 0, 0)
        default:
            s.name = logTemperatureBufferName
            s.flags = VQMOE_BUF_NO_DECAY
            s.ndim = 1
            s.shape = (1, 0, 0, 0, 0, 0)
        }
        out.pointee = s
    }

    func bind(_ bindings: UnsafePointer<vqmoe_buffer_binding>?, _ n: Int) throws(PluginFailure) {
        guard n == bufferCount else {
            throw .invalid("bind_buffers got \(n) bindings, the router declared \(bufferCount)")
        }
        guard let bindings else { throw .invalid("bind_buffers: bindings is NULL") }
        guard let p = bindings[0].data else { throw .invalid("bind_buffers: 'proj.weight' has no data") }
        guard let e = bindings[1].data else { throw .invalid("bind_buffers: 'expert_embeddings' has no data") }
        proj = p.assumingMemoryBound(to: Float.self)
        projGrad = bindings[0].grad
        embeddings = e.assumingMemoryBound(to: Float.self)
        embeddingsGrad = bindings[1].grad
        if config.learnableTemperature {
            guard let t = bindings[2].data else { throw .invalid("bind_buffers: 'log_temperature' has no data") }
            logTemperature = t.assumingMemoryBound(to: Float.self)
            logTemperatureGrad = bindings[2].grad
        }
    }

    /// The bound projection and embeddings, or a STATE error before bind_buffers.
    func bound() throws(PluginFailure) -> (proj: UnsafeMutablePointer<Float>, embeddings: UnsafeMutablePointer<Float>) {
        guard let proj, let embeddings else { throw .state("called before bind_buffers") }
        return (proj, embeddings)
    }

    /// tau: exp(log_temperature) (learnable) or the `temperature` hyperparameter (fixed).
    func temperature() throws(PluginFailure) -> Float {
        guard config.learnableTemperature else { return config.temperature }
        guard let logTemperature else { throw .state("called before bind_buffers") }
        let tau = expf(logTemperature[0])
        guard tau.isFinite && tau > 0 else {
            throw .numeric(
                "temperature exp(log_temperature = \(logTemperature[0])) = \(tau) is not a finite positive number")
        }
        return tau
    }

    /// W_p ~ N(0, init_std^2) from the host stream (seed, 0); expert embeddings ~ N(0, 1)
    /// from stream (seed, 1) -- the scores only see their directions, which are uniform on
    /// the sphere, and with embedding_norm > 0 the first begin_step rescales them; the
    /// learnable log_temperature = log(temperature).
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        let (p, e) = try bound()
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(routerDim * dModel) { p[i] = config.initStd * host.normal(&r) }
        var re = host.rng(seed: seed, stream: 1)
        for i in 0..<(nExperts * routerDim) { e[i] = host.normal(&re) }
        logTemperature?[0] = logf(config.temperature)
    }

    /// begin_step: with embedding_norm = c > 0, e_e <- c * e_e / ||e_e|| for every expert (the
    /// reference code does this under no_grad before each forward). The scores are invariant
    /// to it; it fixes the embeddings' scale, and so the size of an optimizer step relative
    /// to them. A pure function of the parameters, so a resumed run repeats it exactly.
    /// Skipped with VQMOE_STEP_FROZEN and for an all-zero row.
    func beginStep(_ stepPtr: UnsafePointer<vqmoe_step_info>?) throws(PluginFailure) {
        guard let stepPtr else { throw .invalid("begin_step: step is NULL") }
        guard config.embeddingNorm > 0, stepPtr.pointee.flags & VQMOE_STEP_FROZEN == 0 else { return }
        let (_, e) = try bound()
        let dr = routerDim
        for j in 0..<nExperts {
            let row = e + j * dr
            var sq: Double = 0
            for i in 0..<dr { sq += Double(row[i]) * Double(row[i]) }
            let norm = sq.squareRoot()
            guard norm.isFinite else { throw .numeric("expert embedding \(j) has a non-finite norm") }
            guard norm > 0 else { continue }
            let scale = Float(Double(config.embeddingNorm) / norm)
            for i in 0..<dr { row[i] *= scale }
        }
    }
}
