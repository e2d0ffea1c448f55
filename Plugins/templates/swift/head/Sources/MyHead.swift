// my_head -- a vqmoe head plugin in Swift: a linear language-model head. `vqmoe plugin new head
// NAME --lang swift` copies this folder with your NAME; it builds (./build.sh) and passes
// `vqmoe plugins check` as it is. Put your method where it says ">>> YOUR METHOD".
//
//   logits = h W^T + b   (W (V,d) "weight" ~ N(0, init_std^2), b (V) "bias" = 0, V = vocab_size),
//   one prediction per token; loss = mean cross-entropy over the targets that are not
//   VQMOE_PAD_TARGET (the kit checks them and counts them: io.count)
//   backward: dlogits = (softmax - onehot) grad_loss / count, then into h, W and b
//
// PluginKit declares the schema and buffers from the data below, checks every argument, keeps
// contexts and turns thrown PluginFailures into status codes. The ABI's rules still hold:
// gradients ACCUMULATE (+=), everything that changes results lives in declared buffers.
import PluginKit

final class MyHead: HeadPlugin {
    static let name = "my_head", version = "1.0.0"
    static let summary = "linear LM head, per-token cross-entropy (template)"
    static let hyperparameters: [Hyper] = [
        .float("init_std", 0.02, min: 0, "standard deviation of the initial output weights")
    ]

    let host: Host
    let vocab: Int, d: Int, initStd: Float
    var weight: UnsafeMutablePointer<Float>!, bias: UnsafeMutablePointer<Float>!
    var weightGrad: UnsafeMutablePointer<Float>?, biasGrad: UnsafeMutablePointer<Float>?

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        (host, vocab, d, initStd) = (model.host, model.vocabSize, model.dModel, hp.float("init_std"))
        guard vocab >= 1, d >= 1 else { throw .invalid("needs vocab_size >= 1 and d_model >= 1") }
    }

    /// >>> YOUR METHOD: false for one prediction per sequence (a pooled classifier, nOut = classes).
    var perToken: Bool { true }
    var nOut: Int { vocab }
    var isLM: Bool { true }

    var buffers: [BufferDecl] { [.param("weight", [vocab, d]), .param("bias", [vocab], noDecay: true)] }

    func bind(_ b: BoundBuffers) throws(PluginFailure) {
        (weight, weightGrad) = (try b.floats("weight"), b.grad("weight"))
        (bias, biasGrad) = (try b.floats("bias"), b.grad("bias"))
    }

    /// W ~ N(0, init_std^2) from the host stream (seed, 0); b = 0.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(vocab * d) { weight[i] = initStd * host.normal(&r) }
        bias.update(repeating: 0, count: vocab)
    }

    /// What the backward needs: h (valid until the backward returns), softmax (N,V), targets.
    struct Saved { let h: UnsafePointer<Float>, probs: [Float], targets: UnsafePointer<Int32>?, count: Int }

    func forward(_ step: Step, _ io: HeadForward) throws(PluginFailure) -> HeadResult {
        let n = io.rows
        // >>> YOUR METHOD: your output layer (two layers, tied embeddings...). logits = h W^T + b
        for i in 0..<n { (io.logits + i * vocab).update(from: bias, count: vocab) }
        host.matmul(n, vocab, d, io.h, weight, io.logits, tb: true, beta: 1)
        guard let y = io.targets else { return HeadResult(lossSum: 0, count: 0, correct: 0, context: nil) }
        var probs = [Float](repeating: 0, count: n * vocab)
        let (lossSum, correct) = probs.withUnsafeMutableBufferPointer {
            crossEntropy(logits: io.logits, targets: y, rows: n, classes: vocab, probs: $0.baseAddress)
        }
        let saved = Saved(h: io.h, probs: probs, targets: y, count: io.count)
        return HeadResult(lossSum: lossSum, count: io.count, correct: correct, context: saved)
    }

    func backward(_ context: Any, _ g: HeadBackward) throws(PluginFailure) {
        guard let s = context as? Saved, let y = s.targets, s.count > 0 else { return }  // no loss, no gradient
        let n = g.batch * g.seq
        let dl = try host.scratchFloats(n * vocab, "logit gradients")  // (N,V)
        crossEntropyBackward(
            probs: s.probs, targets: y, rows: n, classes: vocab, scale: g.gradLoss / Float(s.count), into: dl)
        host.matmul(n, d, vocab, dl, weight, g.gradH, beta: 1)  // grad_h += dlogits W
        guard !g.frozen else { return }
        if let gW = weightGrad { host.matmul(vocab, d, n, dl, s.h, gW, ta: true, beta: 1) }  // += dlogits^T h
        if let gb = biasGrad { try host.addColumnSums(dl, rows: n, cols: vocab, into: gb) }
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(MyHead.self, host)
}
