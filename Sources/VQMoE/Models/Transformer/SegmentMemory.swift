import Foundation

/// Transformer-XL segment memory (Dai et al. 2019, §3.2): for every layer, the hidden states
/// that entered it in the last `capacity` positions of the previous segments, (B, M, C). No
/// gradient flows into them (sg(·) in the paper); the next segment's keys and values are
/// computed over [memory; segment].
///
/// Training and evaluation keep separate memories, so an evaluation in the middle of
/// training leaves the training stream's memory as it was. The training memory is part of
/// the resumable checkpoint.
///
/// ```swift
/// let mem = SegmentMemory(layers: 4, capacity: 128, width: 256)
/// mem.prepare(batch: 16)        // a new batch size empties it
/// mem.reset()                   // start of an evaluation pass
/// ```
public final class SegmentMemory: @unchecked Sendable {
    public let layers: Int, capacity: Int, width: Int
    public private(set) var batch = 0
    /// Data parallelism: these streams are rows `rows.offset ...` of the global batch's (a
    /// checkpoint gathers every rank's, a load takes this rank's).
    public var rows: AxisShard?
    /// Valid rows per stream (the same for every layer): 0 at the start, then min(M, seen).
    public internal(set) var length: Int {
        get { Int(lengthCell.pointee) }
        set { lengthCell.pointee = Int32(newValue) }
    }
    /// `length` as the int32 the checkpoint stores.
    let lengthCell = UnsafeMutablePointer<Int32>.allocate(capacity: 1)
    var data: [UnsafeMutablePointer<Float>] = []

    public init(layers: Int, capacity: Int, width: Int) {
        self.layers = layers; self.capacity = capacity; self.width = width
        lengthCell.initialize(to: 0)
    }

    deinit {
        data.forEach { $0.deallocate() }
        lengthCell.deallocate()
    }

    /// Allocate for `batch` streams; a batch size other than the current one empties the memory.
    public func prepare(batch b: Int) {
        guard b != batch else { return }
        data.forEach { $0.deallocate() }
        data = (0..<layers).map { _ in
            let p = UnsafeMutablePointer<Float>.allocate(capacity: max(b * capacity * width, 1))
            p.initialize(repeating: 0, count: max(b * capacity * width, 1))
            return p
        }
        batch = b
        length = 0
    }

    public func reset() { length = 0 }

    /// Layer l's memory, (B, M, C); rows 0..<length of each stream are valid.
    public func layer(_ l: Int) -> UnsafeMutablePointer<Float> { data[l] }

    /// cat (B, length + T, C) = [memory; x]; x (B, T, C).
    func concat(_ l: Int, x: UnsafePointer<Float>, t: Int, into cat: UnsafeMutablePointer<Float>) {
        let c = width, m = length, k = m + t
        for bi in 0..<batch {
            (cat + bi * k * c).update(from: data[l] + bi * capacity * c, count: m * c)
            (cat + (bi * k + m) * c).update(from: x + bi * t * c, count: t * c)
        }
    }

    /// Keep the last min(M, length + T) rows of cat (B, length + T, C) as layer l's memory.
    /// Call for every layer, then `advance(t:)`.
    func store(_ l: Int, cat: UnsafePointer<Float>, t: Int) {
        let c = width, k = length + t, keep = min(capacity, k)
        for bi in 0..<batch {
            (data[l] + bi * capacity * c).update(from: cat + (bi * k + k - keep) * c, count: keep * c)
        }
    }

    func advance(t: Int) { length = min(capacity, length + t) }
}

extension SegmentMemory {
    /// The memory as checkpoint tensors `memory.layers.<l>` (B,M,C) and `memory.length`, so that a
    /// resumed run continues the stream exactly; none before the first batch.
    func checkpointTensors() -> [Checkpoint.Tensor] {
        guard batch > 0 else { return [] }
        var out = (0..<layers).map { l in
            Checkpoint.Tensor(
                name: "memory.layers.\(l)", dtype: "F32", shape: [batch, capacity, width],
                bytes: UnsafeRawBufferPointer(start: layer(l), count: batch * capacity * width * 4),
                shard: rows?.count == batch ? rows : nil)
        }
        out.append(
            Checkpoint.Tensor(
                name: "memory.length", dtype: "I32", shape: [1],
                bytes: UnsafeRawBufferPointer(start: lengthCell, count: 4)))
        return out
    }

    /// Restore from a resumable checkpoint (absent: the memory starts empty).
    func load(_ ck: Checkpoint.Loaded, path: String) throws {
        guard let len = ck.tensors["memory.length"], let first = ck.tensors["memory.layers.0"], first.shape.count == 3
        else {
            reset()
            return
        }
        let mine = rows.flatMap { $0.global == first.shape[0] ? $0 : nil }
        prepare(batch: mine?.count ?? first.shape[0])
        let whole = mine?.global ?? batch, rowBytes = capacity * width * 4
        for l in 0..<layers {
            guard let tensor = ck.tensors["memory.layers.\(l)"], tensor.shape == [whole, capacity, width],
                tensor.dtype == "F32"
            else {
                throw VQMoEError(
                    .checkpoint,
                    "\(path): tensor 'memory.layers.\(l)' is missing or not F32 (\(whole), \(capacity), \(width))")
            }
            tensor.data.withUnsafeBytes {
                _ = memcpy(layer(l), $0.baseAddress! + (mine?.offset ?? 0) * rowBytes, batch * rowBytes)
            }
        }
        guard len.dtype == "I32", len.data.count == 4 else {
            throw VQMoEError(.checkpoint, "\(path): tensor 'memory.length' is not one I32")
        }
        length = len.data.withUnsafeBytes { Int($0.loadUnaligned(as: Int32.self)) }
        guard length >= 0 && length <= capacity else {
            throw VQMoEError(.checkpoint, "\(path): memory.length \(length) is outside 0...\(capacity)")
        }
    }
}
