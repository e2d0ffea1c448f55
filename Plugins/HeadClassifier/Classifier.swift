// The `classifier` head, the VQMoE fine-tuning head ("replace the last layer with two fully
// connected layers"):
//
//     p_b    = pool(h_b)                         (d)     mean / first / last / max over real tokens
//     u_b    = W1 p_b + b1                       (H)     FC1
//     a_b    = act(u_b) ⊙ m_b / (1 - dropout)    (H)     m_b ~ Bernoulli(1 - dropout), training only
//     z_b    = W2 a_b + b2                       (C)     FC2 -> logits
//     loss   = mean over non-pad b of -log softmax(z_b)[y_b]
//
// Buffers fc1.weight (H,d), fc1.bias (H), fc2.weight (C,H), fc2.bias (C); the biases skip weight
// decay. Pooling: Pooling.swift; backward: Backward.swift.
import Glibc
import PluginKit
import VQMoEABI

/// How the (B,T,d) hidden states become one vector per sequence.
enum Pooling: String, CaseIterable {
    /// Mean over the real tokens t < len_b.
    case mean
    /// Position 0 (a [CLS]-style first token).
    case first
    /// The last real token, t = len_b - 1 (the natural summary of a causal decoder).
    case last
    /// Per feature, the maximum over the real tokens.
    case max
}

/// The nonlinearity between the two fully connected layers.
enum Activation: String, CaseIterable {
    /// max(0, u).
    case relu
    /// Exact GELU u * Phi(u) = u/2 (1 + erf(u/sqrt 2)), as torch.nn.functional.gelu and the host's FFN.
    case gelu
    /// tanh(u), as BERT's pooler (dense + tanh over [CLS]).
    case tanh
}

final class ClassifierHead: HeadPlugin {
    static let name = "classifier", version = "1.0.0"
    static let summary =
        "Sequence classifier, the VQMoE fine-tuning head (the last layer replaced by two fully connected layers): "
        + "p = pool(h) over the real tokens (mean / first / last / max), logits = W2 dropout(act(W1 p + b1)) + b2 "
        + "(act tanh by default, as BERT's pooler), mean softmax cross-entropy over non-pad targets"
    static let hyperparameters: [Hyper] = [
        .string(
            "pooling", "mean", choices: Pooling.allCases.map(\.rawValue),
            "sequence -> vector: mean / max over the real tokens (t < lengths[b]), first token, or last real token"),
        .int("hidden", 0, min: 0, max: 1 << 20, "width of the first fully connected layer; 0 = d_model"),
        .string(
            "activation", "tanh", choices: Activation.allCases.map(\.rawValue),
            "activation after FC1 (tanh = BERT-style pooler; gelu is the exact erf form)"),
        .float(
            "dropout", 0.1, min: 0, max: 0.9,
            "inverted dropout on the activated FC1 output in training forwards (mask from the step seed, kept units "
                + "scaled by 1/(1-p))"),
        .float("init_std", 0.02, min: 0, "fc1.weight, fc2.weight ~ N(0, init_std^2); biases start at 0"),
    ]

    let host: Host
    /// d input width, H FC1 width (the hyperparameter 0 resolves to d_model), C classes.
    let d: Int, hidden: Int, nClasses: Int
    let pooling: Pooling, activation: Activation
    /// Inverted-dropout probability on the activated FC1 output (training forwards only);
    /// N(0, init_std^2) init of fc1.weight and fc2.weight.
    let dropout: Float, initStd: Float
    /// W1 (H,d), b1 (H), W2 (C,H), b2 (C) and their gradients (nil when frozen by the host).
    var w1: UnsafeMutablePointer<Float>!, b1: UnsafeMutablePointer<Float>!
    var w2: UnsafeMutablePointer<Float>!, b2: UnsafeMutablePointer<Float>!
    var w1Grad: UnsafeMutablePointer<Float>?, b1Grad: UnsafeMutablePointer<Float>?
    var w2Grad: UnsafeMutablePointer<Float>?, b2Grad: UnsafeMutablePointer<Float>?

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        (host, d, nClasses) = (model.host, model.dModel, model.nClasses)
        guard d >= 1 else { throw .invalid("d_model = \(d) must be >= 1") }
        guard nClasses >= 2 else {
            throw .invalid("n_classes = \(nClasses); a classifier needs the dataset's classes (>= 2)")
        }
        (pooling, activation) = (
            Pooling(rawValue: hp.string("pooling"))!, Activation(rawValue: hp.string("activation"))!
        )
        hidden = hp.int("hidden") == 0 ? d : hp.int("hidden")
        (dropout, initStd) = (hp.float("dropout"), hp.float("init_std"))
        guard dropout == 0 || host.api.pointee.rng_uniform != nil else {
            throw .invalid("dropout > 0 needs host->rng_uniform, which the host API table lacks")
        }
    }

    var perToken: Bool { false }
    var nOut: Int { nClasses }
    var isLM: Bool { false }

    var buffers: [BufferDecl] {
        [
            .param("fc1.weight", [hidden, d]), .param("fc1.bias", [hidden], noDecay: true),
            .param("fc2.weight", [nClasses, hidden]), .param("fc2.bias", [nClasses], noDecay: true),
        ]
    }

    func bind(_ b: BoundBuffers) throws(PluginFailure) {
        (w1, b1, w2, b2) = (
            try b.floats("fc1.weight"), try b.floats("fc1.bias"), try b.floats("fc2.weight"), try b.floats("fc2.bias")
        )
        (w1Grad, b1Grad, w2Grad, b2Grad) = (
            b.grad("fc1.weight"), b.grad("fc1.bias"), b.grad("fc2.weight"), b.grad("fc2.bias")
        )
    }

    /// fc1.weight ~ N(0, init_std^2) from stream (seed, 0), fc2.weight from stream (seed, 1);
    /// biases = 0.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        var r1 = host.rng(seed: seed, stream: 0)
        for i in 0..<(hidden * d) { w1[i] = initStd * host.normal(&r1) }
        var r2 = host.rng(seed: seed, stream: 1)
        for i in 0..<(nClasses * hidden) { w2[i] = initStd * host.normal(&r2) }
        b1.update(repeating: 0, count: hidden)
        b2.update(repeating: 0, count: nClasses)
    }

    /// What backward needs, copied at forward time (host buffers may change afterwards).
    struct Saved {
        /// Non-pad targets (the loss is their mean); 0 = nothing flows back.
        let count: Int
        /// (B) real tokens per sequence; (B,d) max pooling's positions (empty otherwise).
        let lengths: [Int32], argmax: [Int32]
        /// (B,d) p; (B,H) u = W1 p + b1; (B,H) a = act(u) ⊙ mask; (B,H) mask 0 or 1/(1-dropout), nil = no dropout.
        let pooled: [Float], pre: [Float], act: [Float], mask: [Float]?
        /// (B,C) softmax(z); (B) targets; W1 (H,d) and W2 (C,H) as the forward used them.
        let probs: [Float], targets: [Int32], w1: [Float], w2: [Float]
    }

    /// p = pool(h) (B,d); u = p W1^T + b1 (B,H); a = act(u) ⊙ m/(1-dropout) in training
    /// forwards (m ~ Bernoulli(1-dropout) from host stream (step seed, 0), row-major over
    /// (B,H)); logits z = a W2^T + b2 (B,C); with targets the mean cross-entropy over
    /// non-pad rows, loss_sum, count and correct.
    func forward(_ step: Step, _ io: HeadForward) throws(PluginFailure) -> HeadResult {
        let B = io.batch, T = io.seq, H = hidden, C = nClasses, lengths = io.realLengths
        // p (B,d) = pool(h).
        let pooled = try host.scratchFloats(B * d, "pooled vectors")
        let argmax = pooling == .max ? try host.scratchInts(B * d, "max positions") : nil
        host.parallelFor(B, grain: poolGrain(t: T, d: d)) { begin, end in
            pooling.forward(io.h, lengths: lengths, t: T, d: d, into: pooled, argmax: argmax, begin..<end)
        }
        // u (B,H) = b1 + p (B,d) W1^T (d,H).
        let pre = try host.scratchFloats(B * H, "FC1 outputs")
        for i in 0..<B { (pre + i * H).update(from: b1, count: H) }
        host.matmul(B, H, d, pooled, w1, pre, tb: true, beta: 1)
        // a (B,H) = act(u), then inverted dropout.
        let act = try host.scratchFloats(B * H, "activations")
        activation.apply(pre, act, B * H)
        // Data parallel: this rank's samples start at row token_offset / T of the global batch.
        let mask =
            step.train && dropout > 0
            ? try dropoutMask(B * H, seed: step.seed, skip: step.tokenOffset / max(T, 1) * H) : nil
        if let mask { for i in 0..<(B * H) { act[i] *= mask[i] } }
        // z (B,C) = b2 + a (B,H) W2^T (H,C).
        for i in 0..<B { (io.logits + i * C).update(from: b2, count: C) }
        host.matmul(B, C, H, act, w2, io.logits, tb: true, beta: 1)

        let probs = step.savesContext ? try host.scratchFloats(B * C, "probabilities") : nil
        let (lossSum, correct) =
            io.targets.map { crossEntropy(logits: io.logits, targets: $0, rows: B, classes: C, probs: probs) } ?? (0, 0)
        func copy<T>(_ p: UnsafePointer<T>?, _ count: Int) -> [T] {
            p.map { Array(UnsafeBufferPointer(start: $0, count: count)) } ?? []
        }
        let saved =
            !step.savesContext
            ? nil
            : Saved(
                count: io.count, lengths: lengths, argmax: copy(argmax, B * d), pooled: copy(pooled, B * d),
                pre: copy(pre, B * H), act: copy(act, B * H), mask: mask.map { copy($0, B * H) },
                probs: io.targets == nil ? [] : copy(probs, B * C), targets: copy(io.targets, B), w1: copy(w1, H * d),
                w2: copy(w2, C * H))
        return HeadResult(lossSum: lossSum, count: io.count, correct: correct, context: saved)
    }

    /// mask_i = 1/(1-p) with probability 1-p, else 0: u_i ~ U[0,1) from the host stream
    /// (step seed, 0), kept when u_i >= p. A pure function of the step seed, so a forward
    /// repeated with the same step (gradcheck, resume) drops the same units. Element i of this
    /// batch is element skip + i of the global batch's stream (one draw each), so the ranks of
    /// a data-parallel run drop what one process would.
    func dropoutMask(_ n: Int, seed: UInt64, skip: Int = 0) throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        let mask = try host.scratchFloats(n, "dropout mask"), uniform = host.api.pointee.rng_uniform!
        let keep = 1 / (1 - dropout)
        var r = host.rng(seed: seed, stream: 0)
        r.counter &+= UInt64(skip)
        for i in 0..<n { mask[i] = uniform(&r) >= dropout ? keep : 0 }
        return mask
    }
}

// MARK: - activation

/// 1/sqrt(2) and 1/sqrt(2 pi), for the exact GELU.
let invSqrt2: Float = 0.70710678118654752
let invSqrt2Pi: Float = 0.39894228040143268

extension Activation {
    /// a_i = f(u_i) for i in [0, n).
    func apply(_ u: UnsafePointer<Float>, _ a: UnsafeMutablePointer<Float>, _ n: Int) {
        switch self {
        case .relu: for i in 0..<n { a[i] = max(u[i], 0) }
        case .gelu: for i in 0..<n { let x = u[i]; a[i] = 0.5 * x * (1 + erff(x * invSqrt2)) }
        case .tanh: for i in 0..<n { a[i] = tanhf(u[i]) }
        }
    }

    /// g_i *= f'(u_i): relu' = [u > 0]; gelu' = Phi(u) + u phi(u); tanh' = 1 - tanh(u)^2.
    func backward(_ u: UnsafePointer<Float>, _ g: UnsafeMutablePointer<Float>, _ n: Int) {
        switch self {
        case .relu: for i in 0..<n where !(u[i] > 0) { g[i] = 0 }
        case .gelu:
            for i in 0..<n {
                let x = u[i]
                g[i] *= 0.5 * (1 + erff(x * invSqrt2)) + x * invSqrt2Pi * expf(-0.5 * x * x)
            }
        case .tanh: for i in 0..<n { let y = tanhf(u[i]); g[i] *= 1 - y * y }
        }
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(ClassifierHead.self, host)
}
