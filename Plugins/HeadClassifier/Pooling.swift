// Pooling of the (B,T,d) hidden states to one vector per sequence, over the real tokens
// t < len_b (the rest of a row is padding), and its backward.
import PluginKit
import VQMoEABI

extension Pooling {
    /// Forward for sequences `range`, h (B,T,d) -> p (B,d):
    ///   mean   p_bk = (1/len_b) sum_{t < len_b} h_btk
    ///   first  p_b  = h_b0
    ///   last   p_b  = h_b(len_b - 1)
    ///   max    p_bk = max_{t < len_b} h_btk   (argmax_bk = the first position reaching it)
    func forward(
        _ h: UnsafePointer<Float>, lengths: [Int32], t T: Int, d: Int, into pooled: UnsafeMutablePointer<Float>,
        argmax: UnsafeMutablePointer<Int32>?, _ range: Range<Int>
    ) {
        for b in range {
            let len = Int(lengths[b])
            let hb = h + b * T * d, p = pooled + b * d
            switch self {
            case .mean:
                p.update(from: hb, count: d)
                for t in 1..<Swift.max(len, 1) { let row = hb + t * d; for k in 0..<d { p[k] += row[k] } }
                let inv = 1 / Float(len)
                for k in 0..<d { p[k] *= inv }
            case .first:
                p.update(from: hb, count: d)
            case .last:
                p.update(from: hb + (len - 1) * d, count: d)
            case .max:
                let am = argmax! + b * d
                p.update(from: hb, count: d)
                am.update(repeating: 0, count: d)
                for t in 1..<Swift.max(len, 1) {
                    let row = hb + t * d
                    for k in 0..<d where row[k] > p[k] { p[k] = row[k]; am[k] = Int32(t) }
                }
            }
        }
    }

    /// Backward for sequences `range`: grad_h (B,T,d) += dp (B,d) routed to the positions pooling
    /// read (mean: dp/len_b to each real token; first / last: that token; max: the argmax
    /// position). Padding positions t >= len_b get nothing.
    func backward(
        _ dp: UnsafePointer<Float>, lengths: [Int32], argmax: [Int32], t T: Int, d: Int,
        into gradH: UnsafeMutablePointer<Float>, _ range: Range<Int>
    ) {
        for b in range {
            let len = Int(lengths[b])
            let gb = gradH + b * T * d, db = dp + b * d
            switch self {
            case .mean:
                let inv = 1 / Float(len)
                for t in 0..<len { let row = gb + t * d; for k in 0..<d { row[k] += db[k] * inv } }
            case .first:
                for k in 0..<d { gb[k] += db[k] }
            case .last:
                let row = gb + (len - 1) * d
                for k in 0..<d { row[k] += db[k] }
            case .max:
                for k in 0..<d { gb[Int(argmax[b * d + k]) * d + k] += db[k] }
            }
        }
    }
}

/// Items per parallel_for chunk so a chunk is at least ~16k floats of work.
func poolGrain(t: Int, d: Int) -> Int { max(1, 16_384 / max(1, t * d)) }
