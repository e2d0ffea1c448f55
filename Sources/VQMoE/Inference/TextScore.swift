import Foundation
import VQMoEABI

/// A language model's loss on any token sequence (`vqmoe eval RUN_DIR --text FILE`), every
/// target scored exactly once:
///
/// - learned absolute positions (GPT-2): windows of `seq_len` tokens starting every `stride`
///   tokens (stride ≤ seq_len); a target is scored in the first window that reaches it, so with
///   stride S every target after the first window sees at least seq_len − S tokens before it
///   (stride = seq_len: the non-overlapping windows of a dataset's eval split). Windows go
///   `batch` at a time.
/// - Transformer-XL: consecutive segments of `seq_len` tokens with the evaluation memory, as an
///   ordered evaluation pass over one stream (the stride is the segment).
///
/// ```swift
/// let s = try TextScore.score(model: model, tokens: codec.encode(text), stride: 128, batch: 8)
/// print(s.lossSum / Double(s.count) / log(2))    // bits per token
/// ```
public enum TextScore {
    public static func score(
        model: Transformer, tokens: [Int32], stride step: Int, batch: Int = 8
    ) throws -> (lossSum: Double, count: Int) {
        let t = model.config.seqLen, n = tokens.count, xl = model.config.relative
        guard n >= 2 else { throw VQMoEError(.data, "the text has \(n) token(s): scoring needs at least 2") }
        guard step >= 1 && step <= t else {
            throw VQMoEError(.usage, "--stride \(step) must be in 1...\(t) (the model's seq_len)")
        }
        if let bad = tokens.first(where: { $0 < 0 || Int($0) >= model.config.vocabSize }) {
            throw VQMoEError(.data, "token \(bad) is outside the model's vocabulary [0, \(model.config.vocabSize))")
        }
        // (start, first target scored): targets are token indices 1..<n; window w scores (first...start + T).
        var windows: [(start: Int, first: Int)] = []
        var scored = 0, start = 0
        while scored < n - 1 {
            windows.append((start, scored + 1))
            scored = min(start + t, n - 1)
            start += xl ? t : step
        }
        let rows = xl ? 1 : min(batch, windows.count)
        var inputs = [Int32](repeating: 0, count: rows * t)
        var targets = [Int32](repeating: Int32(VQMOE_PAD_TARGET), count: rows * t)
        var lossSum = 0.0, count = 0
        model.resetEvalMemory()
        let pad = Int32(VQMOE_PAD_TARGET)
        for group in stride(from: 0, to: windows.count, by: rows) {
            for r in 0..<rows {
                // Rows past the last window: inputs 0, no targets.
                let w = group + r < windows.count ? windows[group + r] : (start: n, first: n)
                for i in 0..<t {
                    let at = w.start + i
                    inputs[r * t + i] = at < n ? tokens[at] : 0
                    targets[r * t + i] = at + 1 >= w.first && at + 1 < n ? tokens[at + 1] : pad
                }
            }
            let parts = try inputs.withUnsafeBufferPointer { x in
                try targets.withUnsafeBufferPointer { y in
                    try model.forward(
                        tokens: x.baseAddress!, targets: y.baseAddress!, batch: rows, step: group, train: false)
                }
            }
            lossSum += parts.lossSum
            count += parts.count
        }
        return (lossSum, count)
    }
}
