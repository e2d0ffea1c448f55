// The `lm` head: a linear layer to the vocabulary with softmax cross-entropy.
//
//   forward   logits (N,V) = h (N,d) W^T + b, N = B*T; with targets: mean cross-entropy in
//             nats over non-pad targets (VQMOE_PAD_TARGET = -1), exact loss_sum, count and
//             argmax-correct for aggregation. Without targets (data NULL): logits only.
//   backward  dlogits = grad_loss * (softmax - onehot) / count on non-pad rows;
//             grad_h += dlogits W, grad_W += dlogits^T h, grad_b += column sums of dlogits.
//
// Parameters "weight" (V,d) ~ N(0, init_std^2) and "bias" (V) = 0 (when bias=true). The
// per-row softmax runs on the host pool and reduces serially, so results do not depend on
// threads.
import Glibc
import PluginKit
import VQMoEABI

final class LMHead: HeadPlugin {
    static let name = "lm", version = "1.0.0"
    static let summary = "language-model head: linear layer to the vocabulary, softmax cross-entropy in nats"
    static let hyperparameters: [Hyper] = [
        .float("init_std", 0.02, min: 0, "standard deviation of the N(0, std^2) weight init"),
        .bool("bias", true, "learn an output bias (zero-initialised)"),
    ]

    let host: Host
    /// Vocabulary (V) and input width (d).
    let vocab: Int, d: Int
    let useBias: Bool, initStd: Float
    /// weight (V,d), bias (V) and their gradients (nil when the host gives none).
    var weight: UnsafeMutablePointer<Float>!, bias: UnsafeMutablePointer<Float>?
    var weightGrad: UnsafeMutablePointer<Float>?, biasGrad: UnsafeMutablePointer<Float>?

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        (host, vocab, d) = (model.host, model.vocabSize, model.dModel)
        guard vocab >= 1 else {
            throw .invalid("vocab_size is \(vocab); an LM head needs the dataset's vocabulary (>= 1)")
        }
        guard d >= 1 else { throw .invalid("d_model is \(d); it must be >= 1") }
        (initStd, useBias) = (hp.float("init_std"), hp.bool("bias"))
    }

    var perToken: Bool { true }
    var nOut: Int { vocab }
    var isLM: Bool { true }

    var buffers: [BufferDecl] {
        [.param("weight", [vocab, d])] + (useBias ? [.param("bias", [vocab], noDecay: true)] : [])
    }

    func bind(_ b: BoundBuffers) throws(PluginFailure) {
        (weight, weightGrad) = (try b.floats("weight"), b.grad("weight"))
        if useBias { (bias, biasGrad) = (try b.floats("bias"), b.grad("bias")) }
    }

    /// weight ~ N(0, init_std^2) from stream 0 of the given seed; bias = 0.
    func initBuffers(seed: UInt64) throws(PluginFailure) {
        var r = host.rng(seed: seed, stream: 0)
        for i in 0..<(vocab * d) { weight[i] = host.normal(&r) * initStd }
        bias?.update(repeating: 0, count: vocab)
    }

    /// What a training forward saves for backward: non-pad targets (the loss is their mean),
    /// h (N,d), softmax probabilities (N,V) and targets (N); empty when nothing flows back.
    struct Saved { let count: Int, h: [Float], probs: [Float], targets: [Int32] }

    /// logits (N,V) = h W^T + b; with targets the loss, sums and (train) a saved context.
    func forward(_ step: Step, _ io: HeadForward) throws(PluginFailure) -> HeadResult {
        let n = io.rows, V = vocab
        if let bias {
            for i in 0..<n { (io.logits + i * V).update(from: bias, count: V) }
        } else {
            io.logits.update(repeating: 0, count: n * V)
        }
        host.matmul(n, V, d, io.h, weight, io.logits, tb: true, beta: 1)
        let empty = Saved(count: 0, h: [], probs: [], targets: [])
        // No loss: a training forward still saves an (empty) context so backward is a no-op.
        guard let y = io.targets else { return HeadResult(lossSum: 0, count: 0, correct: 0, context: empty) }
        let rowLoss = try host.scratchDoubles(n, "row losses"), rowCorrect = try host.scratchInts(n, "row hits")
        guard step.savesContext && n > 0 && io.count > 0 else {
            softmaxRows(io.logits, y, n, loss: rowLoss, correct: rowCorrect, probs: nil)
            return result(n, rowLoss, rowCorrect, io.count, context: empty)
        }
        let probs = [Float](unsafeUninitializedCapacity: n * V) { p, initialized in
            softmaxRows(io.logits, y, n, loss: rowLoss, correct: rowCorrect, probs: p.baseAddress)
            initialized = n * V
        }
        let saved = Saved(
            count: io.count, h: Array(UnsafeBufferPointer(start: io.h, count: n * d)), probs: probs,
            targets: Array(UnsafeBufferPointer(start: y, count: n)))
        return result(n, rowLoss, rowCorrect, io.count, context: saved)
    }

    /// Σ per-row cross-entropy and correct predictions, summed in row order so that the
    /// result does not depend on the thread count.
    func result(
        _ n: Int, _ rowLoss: UnsafePointer<Double>, _ rowCorrect: UnsafePointer<Int32>, _ count: Int, context: Saved
    ) -> HeadResult {
        var lossSum = 0.0, correct = 0
        for i in 0..<n { lossSum += rowLoss[i]; correct += Int(rowCorrect[i]) }
        return HeadResult(lossSum: lossSum, count: count, correct: correct, context: context)
    }

    /// Rows on the host pool: stable softmax (row max subtracted) into `probs` when given,
    /// loss_i = -log p[target] = log(sum exp(l - m)) - (l_t - m) (0 on pad rows), and
    /// correct_i = [argmax == target] (first index on ties).
    func softmaxRows(
        _ logits: UnsafePointer<Float>, _ y: UnsafePointer<Int32>, _ n: Int, loss: UnsafeMutablePointer<Double>,
        correct: UnsafeMutablePointer<Int32>, probs: UnsafeMutablePointer<Float>?
    ) {
        let V = vocab
        host.parallelFor(n, grain: 16) { begin, end in
            for i in begin..<end {
                let row = logits + i * V
                var m = row[0], am = 0
                for v in 1..<V where row[v] > m { m = row[v]; am = v }
                // Sum of exp(l - m) in double: every term is <= 1 and the max term is 1.
                var s = 0.0
                if let probs {
                    let p = probs + i * V
                    for v in 0..<V { let e = expf(row[v] - m); p[v] = e; s += Double(e) }
                    let inv = Float(1.0 / s)
                    for v in 0..<V { p[v] *= inv }
                } else {
                    for v in 0..<V { s += Double(expf(row[v] - m)) }
                }
                let t = Int(y[i])
                (loss[i], correct[i]) = t < 0 ? (0, 0) : (log(s) - Double(row[t] - m), am == t ? 1 : 0)
            }
        }
    }

    /// dlogits (N,V) = grad_loss / count * (p - onehot(target)), 0 on pad rows;
    /// grad_h (N,d) += dlogits W (V,d); unless frozen grad_W (V,d) += dlogits^T h (N,d) and
    /// grad_b (V) += column sums of dlogits (summed in double, rows in order).
    func backward(_ context: Any, _ g: HeadBackward) throws(PluginFailure) {
        let s = context as! Saved, n = g.batch * g.seq, V = vocab
        // No targets (or all padded): the loss is the constant 0, nothing to add.
        guard n > 0, s.count > 0 else { return }
        let dl = try host.scratchFloats(n * V, "dlogits")
        crossEntropyBackward(
            probs: s.probs, targets: s.targets, rows: n, classes: V, scale: g.gradLoss / Float(s.count), into: dl)
        host.matmul(n, d, V, dl, weight, g.gradH, beta: 1)
        guard !g.frozen else { return }
        if let gW = weightGrad { host.matmul(V, d, n, dl, s.h, gW, ta: true, beta: 1) }
        if let gb = biasGrad { try host.addColumnSums(dl, rows: n, cols: V, into: gb) }
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(LMHead.self, host)
}
