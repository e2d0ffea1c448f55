// my_quantizer -- a vqmoe quantizer plugin in Swift: plain L2 vector quantization (VQ-VAE).
// `vqmoe plugin new quantizer NAME --lang swift` copies this folder with your NAME; it builds
// (./build.sh) and passes `vqmoe plugins check` as it is. Put your method where it says
// ">>> YOUR METHOD".
//
//   c = argmin_j ||x - e_j||^2 (ties -> lowest j),  quantized = x + sg(e_c - x)   (straight-through)
//   loss = mse(sg(x), e_c) + commitment mse(x, sg(e_c)),   mse = mean over N d
//   backward (g = grad_loss, M = N d):  grad_x += grad_quantized + g commitment 2/M (x - e_c)
//                                       grad_e_c += g 2/M (e_c - x)        (not when frozen)
//
// PluginKit declares the schema and buffers from the data below, checks every argument, keeps
// contexts and turns thrown PluginFailures into status codes. The ABI's rules still hold:
// gradients ACCUMULATE (+=), everything that changes results lives in declared buffers.
import PluginKit

final class MyQuantizer: QuantizerPlugin {
    static let name = "my_quantizer", version = "1.0.0"
    static let summary = "plain L2 vector quantization, straight-through, VQ-VAE loss (template)"
    /// The codebook and commitment terms use stop-gradients (plugins check compares directions).
    static let flags = UInt32(VQMOE_PLUGIN_STOPGRAD_LOSS)
    static let hyperparameters: [Hyper] = [
        .int("codebook_size", 0, min: 0, "K, codes in the codebook; 0 = the model's n_codes"),
        .float("commitment", 0.25, min: 0, "gamma: loss = mse(sg(x), q) + gamma * mse(x, sg(q))"),
        // >>> YOUR METHOD: your hyperparameters (name, default, range, doc); the host validates them.
    ]

    let host: Host
    let d: Int, k: Int, commitment: Float
    var codebook: UnsafeMutablePointer<Float>!, codebookGrad: UnsafeMutablePointer<Float>?

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        (host, d) = (model.host, model.dModel)
        k = hp.int("codebook_size") > 0 ? hp.int("codebook_size") : model.nCodes
        commitment = hp.float("commitment")
        guard k >= 1, d >= 1 else { throw .invalid("needs K >= 1 and d_model >= 1 (K = \(k), d_model = \(d))") }
    }

    var codebookSize: Int { k }

    /// codebook (K,d): trainable, no weight decay, frozen when fine-tuning.
    var buffers: [BufferDecl] { [.param("codebook", [k, d], noDecay: true, freezeWhenFineTuning: true)] }

    func bind(_ b: BoundBuffers) throws(PluginFailure) {
        (codebook, codebookGrad) = (try b.floats("codebook"), b.grad("codebook"))
    }

    /// e_j ~ N(0, 1) from the host stream (seed, 0): the same seed gives the same codebook.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(k * d) { codebook[i] = host.normal(&r) }
    }

    /// What the backward needs: x (valid until the backward returns) and the codes (the codebook
    /// changes only in the optimizer step, after the backward).
    struct Saved { let x: UnsafePointer<Float>, codes: [Int32] }

    func forward(_ step: Step, _ io: QuantizerForward) throws(PluginFailure) -> (loss: Float, context: Any?) {
        let n = io.n
        // >>> YOUR METHOD: your code assignment. Nearest code by L2 with one GEMM, exact ties.
        let sqError = try host.scratchDoubles(n, "squared errors")
        try host.nearestCodes(
            x: io.x, n: n, d: d, codebook: codebook, k: k, codes: io.codes, sqError: sqError, quantized: io.quantized,
            surrogate: step.surrogate)
        io.counts.update(repeating: 0, count: k)
        var total: Double = 0
        for t in 0..<n { io.counts[Int(io.codes[t])] += 1; total += sqError[t] }
        guard total.isFinite else { throw .numeric("non-finite distances (non-finite input or codebook)") }
        let mse = n > 0 ? total / Double(n * d) : 0
        let saved = Saved(x: io.x, codes: Array(UnsafeBufferPointer(start: io.codes, count: n)))
        return (Float((1 + Double(commitment)) * mse), saved)
    }

    func backward(_ context: Any, _ g: QuantizerBackward) throws(PluginFailure) {
        let s = context as! Saved, n = g.n
        guard n > 0 else { return }
        let unit = 2 / Float(n * d) * g.gradLoss
        for t in 0..<n {
            let e = codebook + Int(s.codes[t]) * d, x = s.x + t * d, gx = g.gradX + t * d
            for i in 0..<d { gx[i] += (g.gradQuantized?[t * d + i] ?? 0) + unit * commitment * (x[i] - e[i]) }
            guard !g.frozen, let gC = codebookGrad.map({ $0 + Int(s.codes[t]) * d }) else { continue }
            for i in 0..<d { gC[i] += unit * (e[i] - x[i]) }
        }
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(MyQuantizer.self, host)
}
