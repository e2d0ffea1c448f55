import Foundation

/// Every (token, expert, weight) assignment of one MoE forward, path after path, and their order
/// by expert.
///
///     path p owns assignments start_p ..< start_p + N·per_p; assignment start_p + t·per_p + j is
///     token t's j-th choice on that path, reading the row t of the path's source (x or x̂)
///     weight_i = g_p(t) · raw_i   (g = 1 without a gate)
///     slot_i: row of assignment i in the expert-ordered buffers (a stable counting sort:
///     offsets[e] ..< offsets[e+1] are expert e's rows, in assignment order)
///
/// ```swift
/// let table = AssignmentTable()
/// let out = table.begin(tokens: n, paths: [(k, x)])    // each path writes its expert ids, raw weights
/// table.finish(experts: e)                              // weights, then the sort
/// ```
public final class AssignmentTable: @unchecked Sendable {
    /// One path's share of the table.
    public struct Range: Sendable {
        public var start: Int
        public var perToken: Int
        public nonisolated(unsafe) var source: UnsafePointer<Float>
        public var count: Int
    }

    public let expert = Storage<Int32>(), raw = Storage<Float>(), weight = Storage<Float>(), slot = Storage<Int32>()
    /// offsets (experts + 1): expert e's rows are offsets[e] ..< offsets[e+1].
    public let offsets = Storage<Int32>()
    private let cursor = Storage<Int32>()
    public private(set) var ranges: [Range] = []
    public private(set) var tokens = 0, count = 0, experts = 0

    public init() {}

    /// Lay out a forward over `n` tokens: one range per path, `perToken` assignments per token
    /// reading rows of `source` (N,d). Returns each range's expert ids and raw weights to fill.
    public func begin(
        tokens n: Int, paths: [(perToken: Int, source: UnsafePointer<Float>)]
    )
        -> [(expert: UnsafeMutablePointer<Int32>, raw: UnsafeMutablePointer<Float>)]
    {
        tokens = n
        ranges.removeAll(keepingCapacity: true)
        var start = 0
        for p in paths {
            ranges.append(Range(start: start, perToken: p.perToken, source: p.source, count: n * p.perToken))
            start += n * p.perToken
        }
        count = start
        let ex = expert.reserve(count), r = raw.reserve(count)
        return ranges.map { (ex + $0.start, r + $0.start) }
    }

    /// Final weights and the counting sort by expert over `experts` experts; `gate` (N,P) holds
    /// g_p(t) for the P paths (weight = g_p(t)·raw), nil for weight = raw.
    public func finish(experts e: Int, gate: UnsafePointer<Float>? = nil) {
        experts = e
        let w = weight.reserve(count), r = raw.pointer, ex = expert.pointer, np = ranges.count
        if let gate {
            for (p, range) in ranges.enumerated() {
                for i in 0..<range.count {
                    w[range.start + i] = gate[(i / range.perToken) * np + p] * r[range.start + i]
                }
            }
        } else {
            w.update(from: r, count: count)
        }
        let off = offsets.reserve(e + 1), cur = cursor.reserve(e), sl = slot.reserve(count)
        off.update(repeating: 0, count: e + 1)
        for i in 0..<count { off[Int(ex[i]) + 1] += 1 }
        for i in 0..<e { off[i + 1] += off[i] }
        cur.update(from: off, count: e)
        for i in 0..<count {
            let x = Int(ex[i])
            sl[i] = cur[x]
            cur[x] += 1
        }
    }

    /// Assignments per expert in this forward.
    public var load: [Float] { (0..<experts).map { Float(offsets.pointer[$0 + 1] - offsets.pointer[$0]) } }

    /// body(path, token, assignment) for every assignment, tokens split over the pool: one
    /// thread visits all of a token's assignments, path after path (a fixed summation order).
    public func forEachToken(_ body: (Int, Int, Int) -> Void) {
        nonisolated(unsafe) let body = body
        let ranges = self.ranges
        HostRuntime.parallelFor(Int64(tokens), grain: 64) { lo, hi in
            for t in Int(lo)..<Int(hi) {
                for (p, r) in ranges.enumerated() {
                    for j in 0..<r.perToken { body(p, t, r.start + t * r.perToken + j) }
                }
            }
        }
    }

    /// body(path, token, assignment) for every assignment, assignments split over the pool.
    public func forEachAssignment(_ body: (Int, Int, Int) -> Void) {
        nonisolated(unsafe) let body = body
        for (p, r) in ranges.enumerated() {
            HostRuntime.parallelFor(Int64(r.count), grain: 256) { lo, hi in
                for i in Int(lo)..<Int(hi) { body(p, i / r.perToken, r.start + i) }
            }
        }
    }
}
