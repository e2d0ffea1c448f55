import Foundation

/// Expert parallelism: the routed experts of a layer are split over the ranks (rank q holds
/// experts ⌊q·E/N⌋ ..< ⌊(q+1)·E/N⌋), and each token's row travels to the rank holding its
/// expert and back (FastMoE / DeepSpeed-MoE / Tutel's all-to-all dispatch). After the gather the
/// rows are already grouped by expert (the counting sort of `AssignmentTable`), so the rows for
/// rank q are one contiguous block:
///
///     plan      every rank's rows per expert (E counts each), all-gathered: counts[s][e]
///     dispatch  all-to-all-v: block q of the local rows → rank q;  rows from rank s arrive
///               source-major and are regrouped expert-major (expert j: rank 0's, rank 1's, …)
///     experts   the owner runs each of its experts once over every rank's rows
///     collect   the reverse: expert-major → source-major → all-to-all-v back into block q
///
/// The backward uses the same plan: dL/dy rows go out as the inputs did, dL/dx rows come back.
/// No token is dropped (there is no capacity), and an expert's weight gradient is complete on
/// its owner.
///
/// ```swift
/// let ex = ExpertExchange(shard: AxisShard(offset: 4, count: 4, global: 8), comm: comm)
/// try ex.plan(offsets: table.offsets.pointer, d: 256)
/// let xr = try ex.dispatch(xg, into: ex.inputs)       // (R,d) rows of this rank's experts
/// try ex.collect(yr, into: yg)
/// ```
public final class ExpertExchange: @unchecked Sendable {
    public let shard: AxisShard
    let comm: Comm
    /// Rows this rank's experts received in the last plan (Σ over sources and experts).
    public private(set) var received = 0
    /// First row of local expert j in expert-major order (count + 1 entries).
    public private(set) var expertRows: [Int] = []
    /// Inputs (expert-major) of the last forward, kept for the backward.
    public let inputs = Storage<Float>()
    private var d = 0
    private var sendRows: [Int] = [], sendOffsets: [Int] = [], recvRows: [Int] = [], recvOffsets: [Int] = []
    /// (source-major row, expert-major row, rows) for every (source rank, local expert).
    private var segments: [(source: Int, major: Int, rows: Int)] = []
    private let sourceMajor = Storage<Float>()

    public init(shard: AxisShard, comm: Comm) {
        self.shard = shard
        self.comm = comm
    }

    /// The experts rank q of n holds, of e.
    public static func owned(rank q: Int, ranks n: Int, experts e: Int) -> AxisShard {
        AxisShard(offset: q * e / n, count: (q + 1) * e / n - q * e / n, global: e)
    }

    /// Exchange the row counts of the routed experts (ids 0 ..< E of `offsets`, which has the
    /// first row of each expert id in the local expert-ordered rows).
    public func plan(offsets: UnsafePointer<Int32>, d: Int) throws {
        let e = shard.global, n = comm.size
        self.d = d
        let mine = (0..<e).map { Int64(offsets[$0 + 1] - offsets[$0]) }
        var all = [Int64](repeating: 0, count: e * n)
        try comm.allgatherEqual(mine, into: &all)
        sendRows = []
        sendOffsets = []
        for q in 0..<n {
            let o = ExpertExchange.owned(rank: q, ranks: n, experts: e)
            sendOffsets.append(Int(offsets[o.offset]))
            sendRows.append(Int(offsets[o.offset + o.count] - offsets[o.offset]))
        }
        // Expert-major layout of what arrives: local expert j gets rank 0's rows, then rank 1's, ...
        let local = shard.count
        expertRows = [0]
        for j in 0..<local {
            expertRows.append(expertRows[j] + (0..<n).reduce(0) { $0 + Int(all[$1 * e + shard.offset + j]) })
        }
        received = expertRows[local]
        recvRows = []
        recvOffsets = []
        segments = []
        var source = 0
        var within = [Int](repeating: 0, count: local)  // rows of expert j placed so far
        for s in 0..<n {
            recvOffsets.append(source)
            var rows = 0
            for j in 0..<local {
                let c = Int(all[s * e + shard.offset + j])
                if c > 0 { segments.append((source + rows, expertRows[j] + within[j], c)) }
                within[j] += c
                rows += c
            }
            recvRows.append(rows)
            source += rows
        }
    }

    /// Send each owner its block of `rows` (the local expert-ordered rows, (A,d)) and regroup
    /// what arrives expert-major into `out` (received × d); returns out's pointer.
    @discardableResult
    public func dispatch(_ rows: UnsafePointer<Float>, into out: Storage<Float>) throws -> UnsafeMutablePointer<Float> {
        let src = sourceMajor.reserve(max(received * d, 1))
        try exchange(
            send: rows, sendRows: sendRows, sendOffsets: sendOffsets, recv: src, recvRows: recvRows,
            recvOffsets: recvOffsets)
        let dst = out.reserve(max(received * d, 1))
        for s in segments { (dst + s.major * d).update(from: src + s.source * d, count: s.rows * d) }
        return dst
    }

    /// The reverse of `dispatch`: this rank's expert-major rows `major` (received × d) go back to
    /// the ranks they came from, into their blocks of `rows`.
    public func collect(_ major: UnsafePointer<Float>, into rows: UnsafeMutablePointer<Float>) throws {
        let src = sourceMajor.reserve(max(received * d, 1))
        for s in segments { (src + s.source * d).update(from: major + s.major * d, count: s.rows * d) }
        try exchange(
            send: src, sendRows: recvRows, sendOffsets: recvOffsets, recv: rows, recvRows: sendRows,
            recvOffsets: sendOffsets)
    }

    private func exchange(
        send: UnsafePointer<Float>, sendRows: [Int], sendOffsets: [Int], recv: UnsafeMutablePointer<Float>,
        recvRows: [Int], recvOffsets: [Int]
    ) throws {
        let b = Int64(d * 4)
        try comm.alltoallv(
            send: UnsafeRawPointer(send), sendCounts: sendRows.map { Int64($0) * b },
            sendOffsets: sendOffsets.map { Int64($0) * b }, recv: UnsafeMutableRawPointer(recv),
            recvCounts: recvRows.map { Int64($0) * b }, recvOffsets: recvOffsets.map { Int64($0) * b })
        bytes += (sendRows.reduce(0, +) - sendRows[comm.rank]) * d * 4
    }

    /// Bytes this rank sent to other ranks since the last `resetBytes`.
    public private(set) var bytes = 0
    public func resetBytes() { bytes = 0 }
}
