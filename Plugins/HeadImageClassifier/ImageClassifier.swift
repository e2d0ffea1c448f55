// The `image_classifier` head, the ViT classification head (Dosovitskiy et al. 2021):
//
//     p_b = h_b0 (cls) or mean_t h_bt (mean)                  (d)
//     y_b = LayerNorm(p_b) = (p_b - mu_b) / sqrt(var_b + eps) ⊙ gamma + beta   (d)
//     z_b = W y_b + c                                          (C)  logits
//     loss = mean over non-pad b of -log softmax(z_b)[y_b]
//
// (timm's ViT normalises every token and then pools; for the class token that is the same
// vector, for mean pooling it is timm's `fc_norm` variant: pool, then normalise.)
// Buffers norm.weight (d), norm.bias (d), head.weight (C,d), head.bias (C); the LayerNorm's
// gamma / beta and the head bias skip weight decay. Backward: Backward.swift.
import Glibc
import PluginKit
import VQMoEABI

/// How the (B,T,d) token states become one vector per image.
enum Pooling: String, CaseIterable {
    /// Position 0, the class token ViT prepends to the patch tokens.
    case cls
    /// Mean over all positions (class token included; positions t >= lengths[b] excluded
    /// when the host passes lengths).
    case mean
}

/// LayerNorm epsilon: 1e-5 as torch.nn.LayerNorm and the host's own LayerNorm (ViT's
/// reference code uses 1e-6; the difference only matters for near-constant vectors).
let layerNormEps: Float = 1e-5

final class ImageClassifierHead: HeadPlugin {
    static let name = "image_classifier", version = "1.0.0"
    static let summary =
        "ViT image classifier head (Dosovitskiy et al. 2021): p = the class token (position 0) or the mean over "
        + "positions, logits = W LayerNorm(p) + c (LayerNorm eps 1e-5, head.weight ~ N(0, init_std^2)), "
        + "mean softmax cross-entropy over non-pad targets"
    static let hyperparameters: [Hyper] = [
        .string(
            "pooling", "cls", choices: Pooling.allCases.map(\.rawValue),
            "image -> vector: cls = the class token (position 0), mean = mean over all positions"),
        .float(
            "init_std", 0.02, min: 0,
            "head.weight ~ N(0, init_std^2) (ViT zero-initialises it, which makes the first gradients to h vanish); "
                + "head.bias = 0"),
    ]

    let host: Host
    /// d input width, C classes.
    let d: Int, nClasses: Int
    let pooling: Pooling
    /// Standard deviation of the N(0, init_std^2) init of head.weight.
    let initStd: Float
    /// gamma (d), beta (d), W (C,d), c (C) and their gradients (nil when frozen by the host).
    var gamma: UnsafeMutablePointer<Float>!, beta: UnsafeMutablePointer<Float>!
    var w: UnsafeMutablePointer<Float>!, c: UnsafeMutablePointer<Float>!
    var gammaGrad: UnsafeMutablePointer<Float>?, betaGrad: UnsafeMutablePointer<Float>?
    var wGrad: UnsafeMutablePointer<Float>?, cGrad: UnsafeMutablePointer<Float>?

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        (host, d, nClasses) = (model.host, model.dModel, model.nClasses)
        guard d >= 1 else { throw .invalid("d_model = \(d) must be >= 1") }
        guard nClasses >= 2 else {
            throw .invalid("n_classes = \(nClasses); an image classifier needs the dataset's classes (>= 2)")
        }
        (pooling, initStd) = (Pooling(rawValue: hp.string("pooling"))!, hp.float("init_std"))
    }

    var perToken: Bool { false }
    var nOut: Int { nClasses }
    var isLM: Bool { false }

    var buffers: [BufferDecl] {
        [
            .param("norm.weight", [d], noDecay: true), .param("norm.bias", [d], noDecay: true),
            .param("head.weight", [nClasses, d]), .param("head.bias", [nClasses], noDecay: true),
        ]
    }

    func bind(_ b: BoundBuffers) throws(PluginFailure) {
        (gamma, beta, w, c) = (
            try b.floats("norm.weight"), try b.floats("norm.bias"), try b.floats("head.weight"),
            try b.floats("head.bias")
        )
        (gammaGrad, betaGrad, wGrad, cGrad) = (
            b.grad("norm.weight"), b.grad("norm.bias"), b.grad("head.weight"), b.grad("head.bias")
        )
    }

    /// gamma = 1, beta = 0 (LayerNorm starts as the plain normalisation); head.weight ~
    /// N(0, init_std^2) from stream (seed, 0); head.bias = 0.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        gamma.update(repeating: 1, count: d)
        beta.update(repeating: 0, count: d)
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(nClasses * d) { w[i] = initStd * host.normal(&r) }
        c.update(repeating: 0, count: nClasses)
    }

    /// What backward needs, copied at forward time (host buffers may change afterwards).
    struct Saved {
        /// Non-pad targets (the loss is their mean); 0 = nothing flows back.
        let count: Int
        /// (B) positions mean pooling averages; (B) targets.
        let lengths: [Int32], targets: [Int32]
        /// (B,d) xhat = (p - mu) * rstd; (B) rstd = 1 / sqrt(var + eps); (B,d) y = xhat ⊙ gamma + beta;
        /// (B,C) softmax(z); gamma (d) and W (C,d) as the forward used them.
        let xhat: [Float], rstd: [Float], normed: [Float], probs: [Float], gamma: [Float], w: [Float]
    }

    /// y = LayerNorm(pool(h)) (B,d); logits z = y W^T + c (B,C); with targets the mean
    /// cross-entropy over non-pad rows, loss_sum, count and correct.
    func forward(_ step: Step, _ io: HeadForward) throws(PluginFailure) -> HeadResult {
        let B = io.batch, T = io.seq, C = nClasses, lengths = io.realLengths
        let xhat = try host.scratchFloats(B * d, "normalised vectors")
        let rstd = try host.scratchFloats(B, "inverse standard deviations")
        let normed = try host.scratchFloats(B * d, "LayerNorm outputs")
        host.parallelFor(B, grain: max(1, 16_384 / (T * d))) { begin, end in
            poolAndNormalize(io.h, lengths: lengths, t: T, xhat: xhat, rstd: rstd, normed: normed, begin..<end)
        }
        // z (B,C) = c + y (B,d) W^T (d,C).
        for i in 0..<B { (io.logits + i * C).update(from: c, count: C) }
        host.matmul(B, C, d, normed, w, io.logits, tb: true, beta: 1)

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
                count: io.count, lengths: lengths, targets: copy(io.targets, B), xhat: copy(xhat, B * d),
                rstd: copy(rstd, B), normed: copy(normed, B * d), probs: io.targets == nil ? [] : copy(probs, B * C),
                gamma: copy(gamma, d), w: copy(w, C * d))
        return HeadResult(lossSum: lossSum, count: io.count, correct: correct, context: saved)
    }

    /// For images `range`:
    ///   p = h_b0 (cls) or (1/len_b) sum_{t < len_b} h_bt (mean)
    ///   mu = mean_k p_k, var = mean_k (p_k - mu)^2 (in double), rstd = 1/sqrt(var + eps)
    ///   xhat = (p - mu) rstd, y = xhat ⊙ gamma + beta
    func poolAndNormalize(
        _ h: UnsafePointer<Float>, lengths: [Int32], t T: Int, xhat: UnsafeMutablePointer<Float>,
        rstd: UnsafeMutablePointer<Float>, normed: UnsafeMutablePointer<Float>, _ range: Range<Int>
    ) {
        for b in range {
            let hb = h + b * T * d, x = xhat + b * d, y = normed + b * d
            x.update(from: hb, count: d)  // pool into x
            if pooling == .mean {
                let len = Int(lengths[b])
                for t in 1..<max(len, 1) { let row = hb + t * d; for k in 0..<d { x[k] += row[k] } }
                let inv = 1 / Float(len)
                for k in 0..<d { x[k] *= inv }
            }
            var mean = 0.0
            for k in 0..<d { mean += Double(x[k]) }
            mean /= Double(d)
            var variance = 0.0
            for k in 0..<d { let c = Double(x[k]) - mean; variance += c * c }
            variance /= Double(d)
            let r = Float(1 / (variance + Double(layerNormEps)).squareRoot())
            rstd[b] = r
            let mu = Float(mean)
            for k in 0..<d {
                let xh = (x[k] - mu) * r
                x[k] = xh
                y[k] = xh * gamma[k] + beta[k]
            }
        }
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(ImageClassifierHead.self, host)
}
