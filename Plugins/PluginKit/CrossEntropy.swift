// Softmax cross-entropy with pad targets and a context-or-scratch helper, shared by the
// classification heads.
import Glibc
import VQMoEABI

/// Softmax cross-entropy of `rows` logit rows against int32 targets (VQMOE_PAD_TARGET rows
/// ignored): loss_sum = sum over non-pad rows of log sum_j exp(z_j - m) - (z_y - m) (row max
/// m subtracted; sums in double), count, correct = argmax hits (first index on ties).
/// Writes softmax(z) into `probs` when given.
public func crossEntropy(
    logits: UnsafePointer<Float>, targets: UnsafePointer<Int32>, rows: Int, classes: Int,
    probs: UnsafeMutablePointer<Float>?
) throws(PluginFailure) -> (lossSum: Double, count: Int, correct: Int) {
    var count = 0
    for i in 0..<rows {
        let y = targets[i]
        if y == Int32(VQMOE_PAD_TARGET) { continue }
        guard y >= 0 && Int(y) < classes else {
            throw .invalid(
                "target \(y) at row \(i) is outside [0, \(classes)) and not the pad target \(VQMOE_PAD_TARGET)")
        }
        count += 1
    }
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
    guard lossSum.isFinite else {
        throw .numeric("non-finite cross-entropy (\(lossSum)): h or the parameters hold NaN/Inf")
    }
    return (lossSum, count, correct)
}

extension Host {
    /// `existing` (context memory) when given, else `count` floats of scratch memory.
    public func orScratch(
        _ existing: UnsafeMutablePointer<Float>?, _ count: Int, _ what: String
    ) throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        if let existing { return existing }
        return try scratchFloats(count, what)
    }

    /// `existing` (context memory) when given, else `count` int32 of scratch memory.
    public func orScratch(
        _ existing: UnsafeMutablePointer<Int32>?, _ count: Int, _ what: String
    ) throws(PluginFailure) -> UnsafeMutablePointer<Int32> {
        if let existing { return existing }
        guard let p = api.pointee.scratch!(max(count, 1) * MemoryLayout<Int32>.stride) else {
            throw .outOfMemory("could not get \(count * 4) bytes of scratch memory for \(what)")
        }
        return p.bindMemory(to: Int32.self, capacity: max(count, 1))
    }
}
