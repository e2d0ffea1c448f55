// Softmax cross-entropy, its logit gradient, and column sums for bias gradients, shared by the
// heads. The kit has already checked the targets (each in [0, classes) or VQMOE_PAD_TARGET).
import Glibc
import VQMoEABI

/// Softmax cross-entropy of `rows` logit rows against int32 targets (VQMOE_PAD_TARGET rows
/// ignored): loss_sum = sum over non-pad rows of log sum_j exp(z_j - m) - (z_y - m) (row max
/// m subtracted; sums in double, rows in order), correct = argmax hits (first index on ties).
/// Writes softmax(z) into `probs` when given.
public func crossEntropy(
    logits: UnsafePointer<Float>, targets: UnsafePointer<Int32>, rows: Int, classes: Int,
    probs: UnsafeMutablePointer<Float>?
) -> (lossSum: Double, correct: Int) {
    var lossSum = 0.0, correct = 0
    for i in 0..<rows {
        let z = logits + i * classes
        var m = z[0], am = 0
        for j in 1..<classes where z[j] > m { m = z[j]; am = j }
        var s = 0.0
        for j in 0..<classes { s += Double(expf(z[j] - m)) }
        if let probs {
            let p = probs + i * classes, inv = 1 / s
            for j in 0..<classes { p[j] = Float(Double(expf(z[j] - m)) * inv) }
        }
        let y = Int(targets[i])
        guard y >= 0 else { continue }
        lossSum += log(s) - Double(z[y] - m)
        if am == y { correct += 1 }
    }
    return (lossSum, correct)
}

/// The logit gradient of the mean cross-entropy: dz_i = scale (p_i - onehot(y_i)) on non-pad
/// rows, 0 on pad rows (scale = grad_loss / count).
public func crossEntropyBackward(
    probs: UnsafePointer<Float>, targets: UnsafePointer<Int32>, rows: Int, classes: Int, scale: Float,
    into dz: UnsafeMutablePointer<Float>
) {
    for i in 0..<rows {
        let row = dz + i * classes, y = Int(targets[i])
        guard y >= 0 else { row.update(repeating: 0, count: classes); continue }
        let p = probs + i * classes
        for j in 0..<classes { row[j] = scale * p[j] }
        row[y] -= scale
    }
}

extension Host {
    /// out[j] += sum_i m[i, j] for a (rows, cols) matrix, summed in double in row order (the
    /// same for any thread count): the gradient of a bias added to every row.
    public func addColumnSums(
        _ m: UnsafePointer<Float>, rows: Int, cols: Int, into out: UnsafeMutablePointer<Float>
    ) throws(PluginFailure) {
        let acc = try scratchDoubles(cols, "column sums")
        acc.update(repeating: 0, count: cols)
        for i in 0..<rows { let row = m + i * cols; for j in 0..<cols { acc[j] += Double(row[j]) } }
        for j in 0..<cols { out[j] += Float(acc[j]) }
    }
}
