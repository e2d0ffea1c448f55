// One vqvae quantizer instance: model facts, hyperparameters, the host buffers it declared
// (codebook (K,d); with ema also ema_count (K) and ema_sum (K,d)) and report-only stats.
import PluginKit
import VQMoEABI

/// Names of the declared buffers (static storage, as `vqmoe_buffer_spec.name` requires).
nonisolated(unsafe) let codebookBufferName = staticCString("codebook")
nonisolated(unsafe) let emaCountBufferName = staticCString("ema_count")
nonisolated(unsafe) let emaSumBufferName = staticCString("ema_sum")

/// Code-usage statistics of the last forward, kept for `vqmoe.metrics/1` only (they never
/// change results, so they need not live in a declared buffer).
struct UsageStats {
    /// (K) codes used per code.
    var counts: [Float]
    var tokens: Int
    /// Whether these come from a training forward (those win over eval forwards).
    var fromTraining: Bool
}

/// The VQ-VAE quantizer: c(x) = argmin_j ||x - e_j||^2, q = e_c.
final class VQVAEQuantizer {
    let host: Host
    let config: VQVAEConfig
    /// d: input width.
    let dModel: Int
    /// K: codebook size.
    var nCodes: Int { config.codebookSize }

    /// (K,d) codes; PARAM (with gradient) unless ema, then STATE.
    private(set) var codebook: UnsafeMutablePointer<Float>?
    private(set) var codebookGrad: UnsafeMutablePointer<Float>?
    /// ema: (K) N_j and (K,d) m_j.
    private(set) var emaCount: UnsafeMutablePointer<Float>?
    private(set) var emaSum: UnsafeMutablePointer<Float>?

    var stats: UsageStats?

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        let i = info.pointee
        guard i.d_model >= 1 else { throw .invalid("d_model = \(i.d_model): the quantizer needs d_model >= 1") }
        dModel = Int(i.d_model)
        config = try VQVAEConfig(hp, nCodes: Int(i.n_codes))
    }

    var bufferCount: Int { config.ema ? 3 : 1 }

    /// 0: "codebook" (K,d) -- PARAM (no weight decay, frozen when fine-tuning), or STATE
    /// with ema; 1: "ema_count" (K) STATE; 2: "ema_sum" (K,d) STATE.
    func bufferSpec(_ i: Int, _ out: UnsafeMutablePointer<vqmoe_buffer_spec>?) throws(PluginFailure) {
        guard let out else { throw .invalid("buffer_spec: out is NULL") }
        guard i >= 0 && i < bufferCount else { throw .invalid("buffer index \(i) outside [0, \(bufferCount))") }
        var s = vqmoe_buffer_spec()
        s.struct_size = UInt32(MemoryLayout<vqmoe_buffer_spec>.size)
        s.dtype = vqmoe_f32()
        s.role = VQMOE_BUF_STATE
        switch i {
        case 0:
            s.name = codebookBufferName
            if !config.ema {
                s.role = VQMOE_BUF_PARAM
                s.flags = VQMOE_BUF_NO_DECAY | VQMOE_BUF_FREEZE_FT
            }
            s.ndim = 2
            s.shape = (Int64(nCodes), Int64(dModel), 0, 0, 0, 0)
        case 1:
            s.name = emaCountBufferName
            s.ndim = 1
            s.shape = (Int64(nCodes), 0, 0, 0, 0, 0)
        default:
            s.name = emaSumBufferName
            s.ndim = 2
            s.shape = (Int64(nCodes), Int64(dModel), 0, 0, 0, 0)
        }
        out.pointee = s
    }

    func bind(_ bindings: UnsafePointer<vqmoe_buffer_binding>?, _ n: Int) throws(PluginFailure) {
        guard n == bufferCount else { throw .invalid("bind_buffers got \(n) bindings, the quantizer declared \(bufferCount)") }
        guard let bindings else { throw .invalid("bind_buffers: bindings is NULL") }
        guard let c = bindings[0].data else { throw .invalid("bind_buffers: 'codebook' has no data") }
        codebook = c.assumingMemoryBound(to: Float.self)
        codebookGrad = config.ema ? nil : bindings[0].grad
        if config.ema {
            guard let count = bindings[1].data, let sum = bindings[2].data else {
                throw .invalid("bind_buffers: 'ema_count' or 'ema_sum' has no data")
            }
            emaCount = count.assumingMemoryBound(to: Float.self)
            emaSum = sum.assumingMemoryBound(to: Float.self)
        }
    }

    /// The bound codebook, or a STATE error before bind_buffers.
    func boundCodebook() throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        guard let codebook else { throw .state("called before bind_buffers") }
        return codebook
    }

    /// e_j ~ N(0, init_scale^2) from the host stream (seed, 0); with ema: ema_sum = codebook,
    /// ema_count = 1.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        let c = try boundCodebook()
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(nCodes * dModel) { c[i] = config.initScale * host.normal(&r) }
        if let emaSum, let emaCount {
            emaSum.update(from: c, count: nCodes * dModel)
            emaCount.update(repeating: 1, count: nCodes)
        }
        stats = nil
    }

    func shape(_ out: UnsafeMutablePointer<vqmoe_quantizer_shape>?) throws(PluginFailure) {
        guard let out else { throw .invalid("shape: out is NULL") }
        out.pointee.codebook_size = Int64(nCodes)
        out.pointee.codes_per_token = 1
    }
}
