// One image classifier head instance: model facts, hyperparameters and the host buffers it
// declared: norm.weight (d), norm.bias (d), head.weight (C,d), head.bias (C).
import PluginKit
import VQMoEABI

/// The declared buffers, in declaration order.
enum BufferKind: Int, CaseIterable {
    case normWeight, normBias, headWeight, headBias

    /// Static storage, as `vqmoe_buffer_spec.name` requires.
    var cName: UnsafePointer<CChar> { bufferNames[rawValue] }
}

nonisolated(unsafe) let bufferNames: [UnsafePointer<CChar>] =
    ["norm.weight", "norm.bias", "head.weight", "head.bias"].map(staticCString)

/// LayerNorm epsilon: 1e-5 as torch.nn.LayerNorm and the host's own LayerNorm (ViT's
/// reference code uses 1e-6; the difference only matters for near-constant vectors).
let layerNormEps: Float = 1e-5

/// The ViT classification head (Dosovitskiy et al. 2021):
///
///     p_b = h_b0 (cls) or mean_t h_bt (mean)                  (d)
///     y_b = LayerNorm(p_b) = (p_b - mu_b) / sqrt(var_b + eps) ⊙ gamma + beta   (d)
///     z_b = W y_b + c                                          (C)  logits
///     loss = mean over non-pad b of -log softmax(z_b)[y_b]
///
/// (timm's ViT normalises every token and then pools; for the class token that is the same
/// vector, for mean pooling it is timm's `fc_norm` variant: pool, then normalise.)
final class ImageClassifierHead {
    let host: Host
    let config: ImageClassifierConfig
    /// d: input width; C: classes.
    let dModel: Int
    let nClasses: Int

    /// Host buffers (bound by bind_buffers) and their gradients (nil when frozen by the host).
    private(set) var normWeight: UnsafeMutablePointer<Float>?  // (d) gamma
    private(set) var normBias: UnsafeMutablePointer<Float>?  // (d) beta
    private(set) var headWeight: UnsafeMutablePointer<Float>?  // (C,d) W
    private(set) var headBias: UnsafeMutablePointer<Float>?  // (C) c
    private(set) var normWeightGrad: UnsafeMutablePointer<Float>?
    private(set) var normBiasGrad: UnsafeMutablePointer<Float>?
    private(set) var headWeightGrad: UnsafeMutablePointer<Float>?
    private(set) var headBiasGrad: UnsafeMutablePointer<Float>?

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        let i = info.pointee
        guard i.d_model >= 1 else { throw .invalid("d_model = \(i.d_model) must be >= 1") }
        guard i.n_classes >= 2 else {
            throw .invalid("n_classes = \(i.n_classes); an image classifier needs the dataset's classes (>= 2)")
        }
        dModel = Int(i.d_model)
        nClasses = Int(i.n_classes)
        config = try ImageClassifierConfig(hp)
    }

    var bufferCount: Int { BufferKind.allCases.count }

    /// All PARAM float32; the LayerNorm's gamma / beta and the head bias skip weight decay.
    func bufferSpec(_ i: Int, _ out: UnsafeMutablePointer<vqmoe_buffer_spec>?) throws(PluginFailure) {
        guard let out else { throw .invalid("buffer_spec: out is NULL") }
        guard let kind = BufferKind(rawValue: i) else {
            throw .invalid("buffer index \(i) outside [0, \(bufferCount))")
        }
        var s = vqmoe_buffer_spec()
        s.struct_size = UInt32(MemoryLayout<vqmoe_buffer_spec>.size)
        s.name = kind.cName
        s.role = VQMOE_BUF_PARAM
        s.dtype = vqmoe_f32()
        switch kind {
        case .normWeight, .normBias: s.ndim = 1; s.shape = (Int64(dModel), 0, 0, 0, 0, 0); s.flags = VQMOE_BUF_NO_DECAY
        case .headWeight: s.ndim = 2; s.shape = (Int64(nClasses), Int64(dModel), 0, 0, 0, 0)
        case .headBias: s.ndim = 1; s.shape = (Int64(nClasses), 0, 0, 0, 0, 0); s.flags = VQMOE_BUF_NO_DECAY
        }
        out.pointee = s
    }

    func bind(_ bindings: UnsafePointer<vqmoe_buffer_binding>?, _ n: Int) throws(PluginFailure) {
        guard n == bufferCount else {
            throw .invalid("bind_buffers got \(n) bindings, the head declared \(bufferCount)")
        }
        guard let bindings else { throw .invalid("bind_buffers: bindings is NULL") }
        for kind in BufferKind.allCases where bindings[kind.rawValue].data == nil {
            throw .invalid("bind_buffers: '\(String(cString: kind.cName))' has no data")
        }
        func f(_ k: BufferKind) -> UnsafeMutablePointer<Float> {
            bindings[k.rawValue].data!.assumingMemoryBound(to: Float.self)
        }
        normWeight = f(.normWeight); normBias = f(.normBias); headWeight = f(.headWeight); headBias = f(.headBias)
        normWeightGrad = bindings[BufferKind.normWeight.rawValue].grad
        normBiasGrad = bindings[BufferKind.normBias.rawValue].grad
        headWeightGrad = bindings[BufferKind.headWeight.rawValue].grad
        headBiasGrad = bindings[BufferKind.headBias.rawValue].grad
    }

    /// The bound parameters (gamma, beta, W, c), or a STATE error before bind_buffers.
    func bound() throws(PluginFailure) -> (
        gamma: UnsafeMutablePointer<Float>, beta: UnsafeMutablePointer<Float>,
        w: UnsafeMutablePointer<Float>, c: UnsafeMutablePointer<Float>
    ) {
        guard let normWeight, let normBias, let headWeight, let headBias else {
            throw .state("called before bind_buffers")
        }
        return (normWeight, normBias, headWeight, headBias)
    }

    /// gamma = 1, beta = 0 (LayerNorm starts as the plain normalisation); head.weight ~
    /// N(0, init_std^2) from stream (seed, 0); head.bias = 0.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        let p = try bound()
        p.gamma.update(repeating: 1, count: dModel)
        p.beta.update(repeating: 0, count: dModel)
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(nClasses * dModel) { p.w[i] = config.initStd * host.normal(&r) }
        p.c.update(repeating: 0, count: nClasses)
    }
}
