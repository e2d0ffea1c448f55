// One vqvae quantizer instance: model facts, hyperparameters, the host buffers it declared
// (codebook (K,d); with ema also ema_count (K) and ema_sum (K,d); with kmeans_init also
// initialized (1) int32) and report-only stats.
import PluginKit
import VQMoEABI

/// Names of the declared buffers (static storage, as `vqmoe_buffer_spec.name` requires).
nonisolated(unsafe) let codebookBufferName = staticCString("codebook")
nonisolated(unsafe) let emaCountBufferName = staticCString("ema_count")
nonisolated(unsafe) let emaSumBufferName = staticCString("ema_sum")
nonisolated(unsafe) let initializedBufferName = staticCString("initialized")

/// The buffers a configuration declares, in declaration order.
enum BufferKind {
    case codebook, emaCount, emaSum, initialized
}

/// Code-usage statistics of the last forward, kept for `vqmoe.metrics/1` only (they never
/// change results, so they need not live in a declared buffer).
struct UsageStats {
    /// (K) codes used per code.
    var counts: [Float]
    var tokens: Int
    /// Whether these come from a training forward (those win over eval forwards).
    var fromTraining: Bool
    /// Codes replaced by the dead-code restart in that forward (nil when it did not run).
    var restarted: Int?
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
    /// kmeans_init: (1) int32, 0 until the k-means initialisation has run, then 1.
    private(set) var initialized: UnsafeMutablePointer<Int32>?

    var stats: UsageStats?

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        let i = info.pointee
        guard i.d_model >= 1 else { throw .invalid("d_model = \(i.d_model): the quantizer needs d_model >= 1") }
        dModel = Int(i.d_model)
        config = try VQVAEConfig(hp, nCodes: Int(i.n_codes))
        if config.kmeansInit || config.deadCodeThreshold > 0 {
            guard info.pointee.host.pointee.rng_next_u64 != nil else {
                throw .invalid("host API table lacks rng_next_u64 (needed by kmeans_init / dead_code_threshold)")
            }
        }
        bufferKinds =
            [.codebook] + (config.ema ? [.emaCount, .emaSum] : []) + (config.kmeansInit ? [.initialized] : [])
    }

    /// codebook; with ema ema_count, ema_sum; with kmeans_init initialized.
    let bufferKinds: [BufferKind]
    var bufferCount: Int { bufferKinds.count }

    /// "codebook" (K,d) -- PARAM (no weight decay, frozen when fine-tuning), or STATE with
    /// ema; "ema_count" (K) STATE; "ema_sum" (K,d) STATE; "initialized" (1) int32 STATE.
    func bufferSpec(_ i: Int, _ out: UnsafeMutablePointer<vqmoe_buffer_spec>?) throws(PluginFailure) {
        guard let out else { throw .invalid("buffer_spec: out is NULL") }
        guard i >= 0 && i < bufferCount else { throw .invalid("buffer index \(i) outside [0, \(bufferCount))") }
        var s = vqmoe_buffer_spec()
        s.struct_size = UInt32(MemoryLayout<vqmoe_buffer_spec>.size)
        s.dtype = vqmoe_f32()
        s.role = VQMOE_BUF_STATE
        switch bufferKinds[i] {
        case .codebook:
            s.name = codebookBufferName
            if !config.ema {
                s.role = VQMOE_BUF_PARAM
                s.flags = VQMOE_BUF_NO_DECAY | VQMOE_BUF_FREEZE_FT
            }
            s.ndim = 2
            s.shape = (Int64(nCodes), Int64(dModel), 0, 0, 0, 0)
        case .emaCount:
            s.name = emaCountBufferName
            s.ndim = 1
            s.shape = (Int64(nCodes), 0, 0, 0, 0, 0)
        case .emaSum:
            s.name = emaSumBufferName
            s.ndim = 2
            s.shape = (Int64(nCodes), Int64(dModel), 0, 0, 0, 0)
        case .initialized:
            s.name = initializedBufferName
            s.dtype = vqmoe_i32()
            s.ndim = 1
            s.shape = (1, 0, 0, 0, 0, 0)
        }
        out.pointee = s
    }

    func bind(_ bindings: UnsafePointer<vqmoe_buffer_binding>?, _ n: Int) throws(PluginFailure) {
        guard n == bufferCount else {
            throw .invalid("bind_buffers got \(n) bindings, the quantizer declared \(bufferCount)")
        }
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
        if config.kmeansInit {
            guard let flag = bindings[bufferCount - 1].data else {
                throw .invalid("bind_buffers: 'initialized' has no data")
            }
            initialized = flag.assumingMemoryBound(to: Int32.self)
        }
    }

    /// The bound codebook, or a STATE error before bind_buffers.
    func boundCodebook() throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        guard let codebook else { throw .state("called before bind_buffers") }
        return codebook
    }

    /// e_j ~ N(0, init_scale^2) from the host stream (seed, 0); with ema: ema_sum = codebook,
    /// ema_count = 1; with kmeans_init: initialized = 0.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        let c = try boundCodebook()
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(nCodes * dModel) { c[i] = config.initScale * host.normal(&r) }
        if let emaSum, let emaCount {
            emaSum.update(from: c, count: nCodes * dModel)
            emaCount.update(repeating: 1, count: nCodes)
        }
        initialized?.pointee = 0
        stats = nil
    }

    /// The next raw 64-bit draw of a host stream (checked present at create when used).
    @inline(__always) func nextRandom(_ r: inout vqmoe_rng) -> UInt64 { host.api.pointee.rng_next_u64!(&r) }

    /// `count` int32 of host scratch memory, valid until the current plugin call returns.
    func scratchInts(_ count: Int, _ what: String) throws(PluginFailure) -> UnsafeMutablePointer<Int32> {
        guard let p = host.api.pointee.scratch!(max(count, 1) * MemoryLayout<Int32>.stride) else {
            throw .outOfMemory("could not get \(count * 4) bytes of scratch memory for \(what)")
        }
        return p.bindMemory(to: Int32.self, capacity: max(count, 1))
    }

    func shape(_ out: UnsafeMutablePointer<vqmoe_quantizer_shape>?) throws(PluginFailure) {
        guard let out else { throw .invalid("shape: out is NULL") }
        out.pointee.codebook_size = Int64(nCodes)
        out.pointee.codes_per_token = 1
    }
}
