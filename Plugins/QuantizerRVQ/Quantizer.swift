// One rvq quantizer instance: model facts, hyperparameters, the host buffer it declared
// (codebook (L,K,d)) and report-only usage statistics.
import PluginKit
import VQMoEABI

/// Name of the declared buffer (static storage, as `vqmoe_buffer_spec.name` requires).
nonisolated(unsafe) let codebookBufferName = staticCString("codebook")

/// Code usage of the last forward, kept for `vqmoe.metrics/1` only (it never changes
/// results, so it need not live in a declared buffer).
struct UsageStats {
    /// (L) per level: (K) uses of each code.
    var levelCounts: [[Float]]
    var tokens: Int
    /// Whether these come from a training forward (those win over eval forwards).
    var fromTraining: Bool
}

/// Residual VQ (Zeghidour et al. 2021, SoundStream; Lee et al. 2022, RQ-VAE): r_0 = x,
/// c_l = argmin_j ||r_{l-1} - e^l_j||^2, q_l = e^l_{c_l}, r_l = r_{l-1} - q_l, q = sum_l q_l.
final class RVQQuantizer {
    let host: Host
    let config: RVQConfig
    /// d: input width.
    let dModel: Int
    /// K: codes per level.
    var nCodes: Int { config.codebookSize }
    /// L: levels.
    var nLevels: Int { config.levels }

    /// (L,K,d) codebooks and their gradient (nil when the host freezes them).
    private(set) var codebook: UnsafeMutablePointer<Float>?
    private(set) var codebookGrad: UnsafeMutablePointer<Float>?

    var stats: UsageStats?

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        let i = info.pointee
        guard i.d_model >= 1 else { throw .invalid("d_model = \(i.d_model): the quantizer needs d_model >= 1") }
        dModel = Int(i.d_model)
        config = try RVQConfig(hp, nCodes: Int(i.n_codes))
    }

    var bufferCount: Int { 1 }

    /// Buffer 0: "codebook" (L,K,d) PARAM, no weight decay, frozen when fine-tuning.
    func bufferSpec(_ i: Int, _ out: UnsafeMutablePointer<vqmoe_buffer_spec>?) throws(PluginFailure) {
        guard let out else { throw .invalid("buffer_spec: out is NULL") }
        guard i == 0 else { throw .invalid("buffer index \(i) outside [0, \(bufferCount))") }
        var s = vqmoe_buffer_spec()
        s.struct_size = UInt32(MemoryLayout<vqmoe_buffer_spec>.size)
        s.name = codebookBufferName
        s.role = VQMOE_BUF_PARAM
        s.flags = VQMOE_BUF_NO_DECAY | VQMOE_BUF_FREEZE_FT
        s.dtype = vqmoe_f32()
        s.ndim = 3
        s.shape = (Int64(nLevels), Int64(nCodes), Int64(dModel), 0, 0, 0)
        out.pointee = s
    }

    func bind(_ bindings: UnsafePointer<vqmoe_buffer_binding>?, _ n: Int) throws(PluginFailure) {
        guard n == bufferCount else {
            throw .invalid("bind_buffers got \(n) bindings, the quantizer declared \(bufferCount)")
        }
        guard let bindings else { throw .invalid("bind_buffers: bindings is NULL") }
        guard let c = bindings[0].data else { throw .invalid("bind_buffers: 'codebook' has no data") }
        codebook = c.assumingMemoryBound(to: Float.self)
        codebookGrad = bindings[0].grad
    }

    /// The bound codebooks, or a STATE error before bind_buffers.
    func boundCodebook() throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        guard let codebook else { throw .state("called before bind_buffers") }
        return codebook
    }

    /// e^l_j ~ N(0, init_scale^2) for every level, from the host stream (seed, 0), in (L,K,d) order.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        let c = try boundCodebook()
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(nLevels * nCodes * dModel) { c[i] = config.initScale * host.normal(&r) }
        stats = nil
    }

    /// K codes per level, L codes per token.
    func shape(_ out: UnsafeMutablePointer<vqmoe_quantizer_shape>?) throws(PluginFailure) {
        guard let out else { throw .invalid("shape: out is NULL") }
        out.pointee.codebook_size = Int64(nCodes)
        out.pointee.codes_per_token = Int32(nLevels)
    }
}
