import Foundation

/// One rank's rows of a global batch: rows [offset, offset + count) of `global`, split as evenly
/// as the rows allow (rank r gets rows ⌊r·B/N⌋ ..< ⌊(r+1)·B/N⌋).
///
/// ```swift
/// let share = RowShare(global: 16, rank: 1, ranks: 2)     // rows 8 ..< 16
/// let mine = batch.rows(share)
/// ```
public struct RowShare: Sendable, Equatable {
    public let offset: Int, count: Int, global: Int

    public init(global b: Int, rank r: Int, ranks n: Int) {
        offset = r * b / n
        count = (r + 1) * b / n - offset
        global = b
    }

    /// The whole batch (one process).
    public static func whole(_ b: Int) -> RowShare { RowShare(global: b, rank: 0, ranks: 1) }

    /// This rank's share of the tokens (the weight of a per-rank mean in the global mean).
    public var fraction: Float { global > 0 ? Float(count) / Float(global) : 0 }
}

extension DatasetInstance.Batch {
    /// Rows `share.offset ..< share.offset + share.count` of this batch (a global batch of
    /// `share.global` rows), with `rows` the real ones among them.
    public func rows(_ share: RowShare) -> DatasetInstance.Batch {
        guard share.count != share.global else { return self }
        func part<T>(_ a: [T]) -> [T] {
            guard !a.isEmpty else { return a }
            let per = a.count / share.global
            return Array(a[(share.offset * per)..<((share.offset + share.count) * per)])
        }
        var b = self
        (b.inputsInt, b.inputsFloat, b.targets, b.lengths) = (
            part(inputsInt), part(inputsFloat), part(targets), part(lengths)
        )
        b.rows = max(0, min(rows - share.offset, share.count))
        if !b.inputShape.isEmpty { b.inputShape[0] = share.count }
        if !b.targetShape.isEmpty { b.targetShape[0] = share.count }
        return b
    }
}

/// Sums the gradients of a data-parallel step over the ranks while the backward goes on: the
/// model announces each group of parameters whose gradients are final (`ready`); full buckets
/// of about `bucketBytes` are copied into one buffer and all-reduced on the communication
/// thread; `finish` waits for the last ones and copies the sums back. Frozen parameters and
/// parameters `excluded` (expert-parallel shards, whose gradients are complete on their owner)
/// are left alone. Bucket boundaries depend only on the parameter order, so every rank makes
/// the same calls.
///
/// ```swift
/// let sync = GradientSync(comm: comm)
/// try model.backward(scale: scale, ready: sync.ready)
/// try sync.finish()
/// ```
public final class GradientSync {
    let comm: Comm
    let bucketBytes: Int
    let excluded: Set<ObjectIdentifier>
    private var current: [Parameter] = [], currentCount = 0
    private var inFlight: [(params: [Parameter], buffer: Storage<Float>, ticket: CommTicket?)] = []
    private var buffers: [Storage<Float>] = []
    /// Bytes all-reduced since `resetBytes` (the sum of the buckets).
    public private(set) var bytes = 0
    /// Seconds the buckets took on the communication thread, and seconds `finish` waited for
    /// them (the part not hidden behind the backward), since `resetBytes`.
    public private(set) var busySeconds = 0.0, waitedSeconds = 0.0

    public init(comm: Comm, bucketBytes: Int = 1 << 20, excluding excluded: [Parameter] = []) {
        self.comm = comm
        self.bucketBytes = bucketBytes
        self.excluded = Set(excluded.map(ObjectIdentifier.init))
    }

    /// These parameters' gradients are final.
    public func ready(_ params: [Parameter]) {
        for p in params where !p.frozen && !excluded.contains(ObjectIdentifier(p)) {
            current.append(p)
            currentCount += p.count
            if currentCount * 4 >= bucketBytes { flush() }
        }
    }

    private func flush() {
        guard !current.isEmpty else { return }
        let index = inFlight.count
        if index == buffers.count { buffers.append(Storage<Float>()) }
        let buf = buffers[index], dst = buf.reserve(currentCount)
        var o = 0
        for p in current {
            (dst + o).update(from: p.grad, count: p.count)
            o += p.count
        }
        inFlight.append((current, buf, comm.allreduceAsync(dst, count: currentCount)))
        bytes += currentCount * 4
        current = []
        currentCount = 0
    }

    /// Send what is left, wait for every bucket, and copy the sums into the gradients.
    public func finish() throws {
        flush()
        let t0 = DispatchTime.now().uptimeNanoseconds
        for (_, _, ticket) in inFlight { try comm.wait(ticket) }
        waitedSeconds += Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
        for (params, buf, ticket) in inFlight {
            busySeconds += ticket?.seconds ?? 0
            var o = 0
            for p in params {
                p.grad.update(from: buf.pointer + o, count: p.count)
                o += p.count
            }
        }
        inFlight.removeAll(keepingCapacity: true)
    }

    /// Start a new count of bytes and seconds.
    public func resetBytes() { (bytes, busySeconds, waitedSeconds) = (0, 0, 0) }
}
