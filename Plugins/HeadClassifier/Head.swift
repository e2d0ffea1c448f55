// One classifier head instance: model facts, hyperparameters and the host buffers it
// declared: fc1.weight (H,d), fc1.bias (H), fc2.weight (C,H), fc2.bias (C).
import PluginKit
import VQMoEABI

/// The declared buffers, in declaration order.
enum BufferKind: Int, CaseIterable {
    case fc1Weight, fc1Bias, fc2Weight, fc2Bias

    /// Static storage, as `vqmoe_buffer_spec.name` requires.
    var cName: UnsafePointer<CChar> { bufferNames[rawValue] }
}

nonisolated(unsafe) let bufferNames: [UnsafePointer<CChar>] =
    ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"].map(staticCString)

/// The VQMoE fine-tuning head ("replace the last layer with two fully connected layers"):
///
///     p_b    = pool(h_b)                         (d)     mean / first / last / max over real tokens
///     u_b    = W1 p_b + b1                       (H)     FC1
///     a_b    = act(u_b) ⊙ m_b / (1 - dropout)    (H)     m_b ~ Bernoulli(1 - dropout), training only
///     z_b    = W2 a_b + b2                       (C)     FC2 -> logits
///     loss   = mean over non-pad b of -log softmax(z_b)[y_b]
final class ClassifierHead {
    let host: Host
    let config: ClassifierConfig
    /// d: input width; H: FC1 width; C: classes.
    let dModel: Int
    let hidden: Int
    let nClasses: Int

    /// Host buffers (bound by bind_buffers) and their gradients (nil when frozen by the host).
    private(set) var fc1Weight: UnsafeMutablePointer<Float>?  // (H,d)
    private(set) var fc1Bias: UnsafeMutablePointer<Float>?  // (H)
    private(set) var fc2Weight: UnsafeMutablePointer<Float>?  // (C,H)
    private(set) var fc2Bias: UnsafeMutablePointer<Float>?  // (C)
    private(set) var fc1WeightGrad: UnsafeMutablePointer<Float>?
    private(set) var fc1BiasGrad: UnsafeMutablePointer<Float>?
    private(set) var fc2WeightGrad: UnsafeMutablePointer<Float>?
    private(set) var fc2BiasGrad: UnsafeMutablePointer<Float>?

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        let i = info.pointee
        guard i.d_model >= 1 else { throw .invalid("d_model = \(i.d_model) must be >= 1") }
        guard i.n_classes >= 2 else {
            throw .invalid("n_classes = \(i.n_classes); a classifier needs the dataset's classes (>= 2)")
        }
        dModel = Int(i.d_model)
        nClasses = Int(i.n_classes)
        config = try ClassifierConfig(hp, dModel: dModel)
        hidden = config.hidden
        guard config.dropout == 0 || host.api.pointee.rng_uniform != nil else {
            throw .invalid("dropout > 0 needs host->rng_uniform, which the host API table lacks")
        }
    }

    var bufferCount: Int { BufferKind.allCases.count }

    /// Weights (2-D, weight decay) and biases (1-D, NO_DECAY), all PARAM float32.
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
        case .fc1Weight: s.ndim = 2; s.shape = (Int64(hidden), Int64(dModel), 0, 0, 0, 0)
        case .fc1Bias: s.ndim = 1; s.shape = (Int64(hidden), 0, 0, 0, 0, 0); s.flags = VQMOE_BUF_NO_DECAY
        case .fc2Weight: s.ndim = 2; s.shape = (Int64(nClasses), Int64(hidden), 0, 0, 0, 0)
        case .fc2Bias: s.ndim = 1; s.shape = (Int64(nClasses), 0, 0, 0, 0, 0); s.flags = VQMOE_BUF_NO_DECAY
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
        fc1Weight = f(.fc1Weight); fc1Bias = f(.fc1Bias); fc2Weight = f(.fc2Weight); fc2Bias = f(.fc2Bias)
        fc1WeightGrad = bindings[BufferKind.fc1Weight.rawValue].grad
        fc1BiasGrad = bindings[BufferKind.fc1Bias.rawValue].grad
        fc2WeightGrad = bindings[BufferKind.fc2Weight.rawValue].grad
        fc2BiasGrad = bindings[BufferKind.fc2Bias.rawValue].grad
    }

    /// The bound parameters (W1, b1, W2, b2), or a STATE error before bind_buffers.
    func bound() throws(PluginFailure) -> (
        w1: UnsafeMutablePointer<Float>, b1: UnsafeMutablePointer<Float>,
        w2: UnsafeMutablePointer<Float>, b2: UnsafeMutablePointer<Float>
    ) {
        guard let fc1Weight, let fc1Bias, let fc2Weight, let fc2Bias else { throw .state("called before bind_buffers") }
        return (fc1Weight, fc1Bias, fc2Weight, fc2Bias)
    }

    /// fc1.weight ~ N(0, init_std^2) from stream (seed, 0), fc2.weight from stream (seed, 1);
    /// biases = 0.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        let p = try bound()
        var r1 = host.rng(seed: seed, stream: 0)
        for i in 0..<(hidden * dModel) { p.w1[i] = config.initStd * host.normal(&r1) }
        var r2 = host.rng(seed: seed, stream: 1)
        for i in 0..<(nClasses * hidden) { p.w2[i] = config.initStd * host.normal(&r2) }
        p.b1.update(repeating: 0, count: hidden)
        p.b2.update(repeating: 0, count: nClasses)
    }
}
