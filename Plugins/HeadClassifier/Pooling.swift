// Pooling of the (B,T,d) hidden states to one vector per sequence, over the real tokens
// t < len_b (the rest of a row is padding), and its backward.
import PluginKit
import VQMoEABI

/// Pointers for the per-sequence pooling loops (run on the host's pool, one sequence per item).
struct PoolJob {
    var h: UnsafePointer<Float>  // (B,T,d) forward input
    var gradH: UnsafeMutablePointer<Float>?  // (B,T,d) backward output, accumulated
    var pooled: UnsafeMutablePointer<Float>  // (B,d) forward: p; backward: dL/dp
    var lengths: UnsafePointer<Int32>  // (B) real tokens, in [1, T]
    var argmax: UnsafeMutablePointer<Int32>?  // (B,d) max pooling: the winning position
    var pooling: Pooling
    var t: Int
    var d: Int
}

/// Forward for sequences [begin, end):
///   mean   p_bk = (1/len_b) sum_{t < len_b} h_btk
///   first  p_b  = h_b0
///   last   p_b  = h_b(len_b - 1)
///   max    p_bk = max_{t < len_b} h_btk   (argmax_bk = the first position reaching it)
func poolRows(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: PoolJob.self).pointee
    let d = job.d, T = job.t
    for b in Int(begin)..<Int(end) {
        let len = Int(job.lengths[b])
        let hb = job.h + b * T * d, p = job.pooled + b * d
        switch job.pooling {
        case .mean:
            p.update(from: hb, count: d)
            for t in 1..<max(len, 1) { let row = hb + t * d; for k in 0..<d { p[k] += row[k] } }
            let inv = 1 / Float(len)
            for k in 0..<d { p[k] *= inv }
        case .first:
            p.update(from: hb, count: d)
        case .last:
            p.update(from: hb + (len - 1) * d, count: d)
        case .max:
            let am = job.argmax! + b * d
            p.update(from: hb, count: d)
            am.update(repeating: 0, count: d)
            for t in 1..<max(len, 1) {
                let row = hb + t * d
                for k in 0..<d where row[k] > p[k] { p[k] = row[k]; am[k] = Int32(t) }
            }
        }
    }
}

/// Backward for sequences [begin, end): grad_h += dp routed to the positions pooling read
/// (mean: dp/len_b to each real token; first / last: that token; max: the argmax position).
/// Padding positions t >= len_b get nothing.
func unpoolRows(_ user: UnsafeMutableRawPointer?, _ begin: Int64, _ end: Int64) {
    let job = user!.assumingMemoryBound(to: PoolJob.self).pointee
    let d = job.d, T = job.t
    let gradH = job.gradH!
    for b in Int(begin)..<Int(end) {
        let len = Int(job.lengths[b])
        let gb = gradH + b * T * d, dp = UnsafePointer(job.pooled + b * d)
        switch job.pooling {
        case .mean:
            let inv = 1 / Float(len)
            for t in 0..<len { let row = gb + t * d; for k in 0..<d { row[k] += dp[k] * inv } }
        case .first:
            for k in 0..<d { gb[k] += dp[k] }
        case .last:
            let row = gb + (len - 1) * d
            for k in 0..<d { row[k] += dp[k] }
        case .max:
            let am = job.argmax! + b * d
            for k in 0..<d { gb[Int(am[k]) * d + k] += dp[k] }
        }
    }
}

/// Items per parallel_for chunk so a chunk is at least ~16k floats of work.
func poolGrain(t: Int, d: Int) -> Int { max(1, 16_384 / max(1, t * d)) }
