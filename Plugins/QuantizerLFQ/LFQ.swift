// The `lfq` quantizer: lookup-free quantization (Yu et al. 2023, "Language Model Beats
// Diffusion -- Tokenizer is Key to Visual Generation", §3.1, MAGVIT-v2):
//
//     z = W_in x + b_in (d -> b = log2 K),  q_i = scale · sign(z_i),  code = Σ_i [z_i > 0] 2^i
//     quantized = W_out (z + sg(q − z)) + b_out (b -> d)
//     loss = entropy_weight (mean_t H(p(.|z_t)) − gamma_div H(mean_t p(.|z_t))) + commitment mse(z, sg(q))
//     p(c|z) = softmax_c(2 z·code_c / tau)                               (entropy terms: Entropy.swift)
//
// No VQMOE_PLUGIN_STOPGRAD_LOSS: the entropy terms have no stop-gradient, and the commitment
// term's sg(q) changes nothing (q is piecewise constant in z), so the backward (Backward.swift)
// is the exact derivative of the loss. Init is fixed: W_in ~ N(0, 1/d) (stream 0), W_out ~
// N(0, 1/b) (stream 1), biases 0; every buffer is frozen when fine-tuning.
import Glibc
import PluginKit
import VQMoEABI

final class LFQQuantizer: QuantizerPlugin {
    static let name = "lfq", version = "1.0.0", reportsMetrics = true
    /// The means over tokens (per-sample entropy, p̄ of the codebook entropy, commitment mse)
    /// and the code usage are those of the global batch of a data-parallel run.
    static let flags = UInt32(VQMOE_PLUGIN_GLOBAL_BATCH)
    static let summary =
        "Lookup-free quantizer (MAGVIT-v2): z = W_in x + b_in (d -> b = log2 K), q_i = scale * sign(z_i), "
        + "code = sum_i [z_i > 0] 2^i, quantized = W_out (z + sg(q - z)) + b_out; loss = entropy_weight * "
        + "(mean per-sample entropy - diversity_gamma * codebook entropy) + commitment * mse(z, sg(q)), "
        + "p(c|z) = softmax_c(2 z . code_c / temperature)"
    /// Largest codebook: 2^16 codes (the entropy terms cost O(N K log2 K)).
    static let maxCodebookSize = 1 << 16
    static let hyperparameters: [Hyper] = [
        .int(
            "codebook_size", 0, min: 0, max: maxCodebookSize,
            "K = 2^b codes (a power of two >= 2, b sign bits); 0 = the model's n_codes"),
        .float(
            "entropy_weight", 0.1, min: 0,
            "weight of the entropy loss: mean_t H(p(.|z_t)) - diversity_gamma * H(mean_t p(.|z_t))"),
        .float(
            "diversity_gamma", 1.0, min: 0,
            "gamma_div: weight of the codebook (batch-mean) entropy, which rewards using every code"),
        .float("temperature", 1.0, min: 1e-6, "tau in p(c|z) = softmax_c(2 z . code_c / tau)"),
        .float("commitment", 0.25, min: 0, "weight of the commitment term mse(z, sg(q))"),
        .float("scale", 1.0, min: 1e-6, "code magnitude: q_i = +scale if z_i > 0 else -scale"),
    ]

    let host: Host
    /// d input width, K = 2^b codes, b bits.
    let d: Int, nCodes: Int, nBits: Int
    let entropyWeight: Double, diversityGamma: Double, temperature: Double, commitment: Double
    let scale: Float
    /// (b,d) W_in, (b) b_in, (d,b) W_out, (d) b_out and their gradients.
    var wIn: UnsafeMutablePointer<Float>!, bIn: UnsafeMutablePointer<Float>!
    var wOut: UnsafeMutablePointer<Float>!, bOut: UnsafeMutablePointer<Float>!
    var wInGrad: UnsafeMutablePointer<Float>?, bInGrad: UnsafeMutablePointer<Float>?
    var wOutGrad: UnsafeMutablePointer<Float>?, bOutGrad: UnsafeMutablePointer<Float>?
    /// Code usage and entropies of the last training forward (of any forward before the first), for metrics only.
    var report: (usage: CodeUsage, perSample: Double, codebook: Double, training: Bool)?

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        (host, d) = (model.host, model.dModel)
        guard d >= 1 else { throw .invalid("d_model = \(d): the quantizer needs d_model >= 1") }
        let requested = hp.int("codebook_size"), k = requested > 0 ? requested : model.nCodes
        let source = requested > 0 ? "hyperparameter codebook_size" : "the model's n_codes"
        guard k >= 2 && k & (k - 1) == 0 else {
            throw .invalid(
                "codebook size K = \(k) (from \(source)) must be a power of two >= 2: lfq codes are b = log2(K) sign bits"
            )
        }
        guard k <= Self.maxCodebookSize else {
            throw .invalid(
                "codebook size K = \(k) (from \(source)) is larger than lfq's maximum \(Self.maxCodebookSize) (2^16)")
        }
        (nCodes, nBits) = (k, k.trailingZeroBitCount)
        (entropyWeight, diversityGamma) = (hp.double("entropy_weight"), hp.double("diversity_gamma"))
        (temperature, commitment, scale) = (hp.double("temperature"), hp.double("commitment"), hp.float("scale"))
    }

    var codebookSize: Int { nCodes }
    /// 4 · scale / tau: the logit gap of one bit, a_i = logit(+) − logit(−) = (4 scale / tau) z_i.
    var bitLogitScale: Double { 4 * Double(scale) / temperature }

    var buffers: [BufferDecl] {
        [
            .param("proj_in.weight", [nBits, d], freezeWhenFineTuning: true),
            .param("proj_in.bias", [nBits], noDecay: true, freezeWhenFineTuning: true),
            .param("proj_out.weight", [d, nBits], freezeWhenFineTuning: true),
            .param("proj_out.bias", [d], noDecay: true, freezeWhenFineTuning: true),
        ]
    }

    func bind(_ b: BoundBuffers) throws(PluginFailure) {
        (wIn, bIn, wOut, bOut) = (
            try b.floats("proj_in.weight"), try b.floats("proj_in.bias"), try b.floats("proj_out.weight"),
            try b.floats("proj_out.bias")
        )
        (wInGrad, bInGrad) = (b.grad("proj_in.weight"), b.grad("proj_in.bias"))
        (wOutGrad, bOutGrad) = (b.grad("proj_out.weight"), b.grad("proj_out.bias"))
    }

    func initBuffers(seed: UInt64) throws(PluginFailure) {
        let b = nBits
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(b * d) { wIn[i] = Float(1 / Double(d).squareRoot()) * host.normal(&r) }
        r = host.rng(seed: seed, stream: 1)
        for i in 0..<(d * b) { wOut[i] = Float(1 / Double(b).squareRoot()) * host.normal(&r) }
        bIn.update(repeating: 0, count: b)
        bOut.update(repeating: 0, count: d)
        report = nil
    }

    /// What the backward needs: x by pointer (valid until the backward), the rest copied (the
    /// weights, in case the host changes them in between).
    struct Saved {
        let x: UnsafePointer<Float>
        /// z (N,b), z_q (N,b) the value fed to proj_out, centred entropy weights (K), W_in, W_out.
        let z: [Float], zq: [Float], weights: [Double], wIn: [Float], wOut: [Float]
        /// The global batch's tokens (every rank's; N in one process).
        let globalN: Int
    }

    /// z = x W_inᵀ + b_in (N,b); codes and z_q (value q; SURROGATE: z); quantized = z_q W_outᵀ + b_out.
    func forward(_ step: Step, _ io: QuantizerForward) throws(PluginFailure) -> (loss: Float, context: Any?) {
        let n = io.n, b = nBits, k = nCodes, x = io.x
        for i in 0..<(n * d) where !x[i].isFinite { throw .numeric("non-finite input x[\(i / d)][\(i % d)] = \(x[i])") }
        let z = try host.scratchFloats(n * b, "projected inputs"), zq = try host.scratchFloats(n * b, "quantized bits")
        host.matmul(n, b, d, x, wIn, z, tb: true)  // z (N,b) = x (N,d) @ W_in^T (d,b)
        for t in 0..<n { for i in 0..<b { z[t * b + i] += bIn[i] } }
        for i in 0..<(n * b) where !z[i].isFinite {
            throw .numeric("non-finite projection z[\(i / b)][\(i % b)] = \(z[i]) (non-finite proj_in?)")
        }
        var sse: Double = 0
        io.counts.update(repeating: 0, count: k)
        for t in 0..<n {
            var index: Int32 = 0
            for i in 0..<b {
                let zi = z[t * b + i], q = zi > 0 ? scale : -scale
                if zi > 0 { index |= Int32(1) << Int32(i) }
                sse += (Double(zi) - Double(q)) * (Double(zi) - Double(q))
                zq[t * b + i] = step.surrogate ? zi : q
            }
            io.codes[t] = index
            io.counts[Int(index)] += 1
        }
        host.matmul(n, d, b, zq, wOut, io.quantized, tb: true)  // quantized (N,d) = z_q (N,b) @ W_out^T (b,d)
        for t in 0..<n { for i in 0..<d { io.quantized[t * d + i] += bOut[i] } }
        let weights = try host.scratchDoubles(k, "entropy weights")
        let e = try entropyForward(z, n: n, sse: sse, counts: io.counts, weights: weights)
        if step.train || !(report?.training ?? false) {
            report = (CodeUsage(counts: e.counts, tokens: e.globalN), e.perSample, e.codebook, step.train)
        }
        let loss =
            entropyWeight * (e.perSample - diversityGamma * e.codebook)
            + commitment * (e.globalN > 0 ? e.sse / Double(e.globalN * b) : 0)
        guard step.savesContext else { return (Float(loss), nil) }
        func copy<T>(_ p: UnsafeMutablePointer<T>, _ count: Int) -> [T] {
            Array(UnsafeBufferPointer(start: p, count: count))
        }
        let saved = Saved(
            x: x, z: copy(z, n * b), zq: copy(zq, n * b), weights: copy(weights, k), wIn: copy(wIn, b * d),
            wOut: copy(wOut, d * b), globalN: e.globalN)
        return (Float(loss), saved)
    }

    /// usage_perplexity, dead_codes, code_counts, per_sample_entropy and codebook_entropy (nats).
    func metrics(_ sink: MetricSink) throws(PluginFailure) {
        guard let report else { return }
        report.usage.report(sink)
        sink.scalar("per_sample_entropy", report.perSample)
        sink.scalar("codebook_entropy", report.codebook)
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(LFQQuantizer.self, host)
}
