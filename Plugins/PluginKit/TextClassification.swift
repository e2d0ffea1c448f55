// Text-classification batches (VQMOE_TASK_CLASSIFY_TOKENS), shared by the `sst` and `csv`
// dataset plugins: this file is identical in Plugins/DatasetSST and Plugins/DatasetCSV (a
// plugin target depends only on VQMoEABI and PluginKit, so the two cannot share a module).
//
// A sample is the UTF-8 bytes of one text (vocabulary 256), truncated or padded with byte 0
// to T = seq_len; its target is the class label, and vqmoe_batch.lengths holds
// min(byte count, T), at least 1 (an empty text is a single 0 byte). Batches are a pure
// function of (instance seed, split, index, batch size B):
//   train       batch i = positions [i·B, (i+1)·B) of an endless stream of epochs; epoch e
//               is a Fisher–Yates permutation of the training examples drawn from the host
//               RNG seeded (instance seed, stream e). Every example appears exactly once per
//               epoch, and any index can be read in any order (seek = resume).
//   valid/test  the split in file order: ceil(size / B) batches, the last one possibly
//               partial (rows = real samples; the other rows have inputs 0, target
//               VQMOE_PAD_TARGET and length 1); VQMOE_ERR_END_OF_DATA past the end.
import Glibc
import VQMoEABI

public let splitNames = ["train", "valid", "test"]

/// An IO failure (file missing, unreadable or malformed): VQMOE_ERR_IO.
public func ioFailure(_ message: String) -> PluginFailure { .io(message) }

/// ASCII whitespace: space, \t, \n, \v, \f, \r.
@inline(__always) public func isSpace(_ c: UInt8) -> Bool { c == 32 || (c >= 9 && c <= 13) }

/// The examples of one split: every text's UTF-8 bytes back to back, where each one starts,
/// and its label.
public struct TextExamples {
    public init() {}
    /// All texts, concatenated.
    public private(set) var bytes: [UInt8] = []
    /// Text i is bytes[starts[i] ..< starts[i + 1]] (count + 1 offsets).
    public private(set) var starts: [Int] = [0]
    /// Class of each example, in [0, n_classes).
    public private(set) var labels: [Int32] = []

    public var count: Int { labels.count }

    public mutating func append(_ text: some Collection<UInt8>, label: Int32) {
        bytes.append(contentsOf: text)
        starts.append(bytes.count)
        labels.append(label)
    }

    /// The bytes of text i.
    public func text(_ i: Int) -> ArraySlice<UInt8> { bytes[starts[i]..<starts[i + 1]] }

    /// The examples at `indices`, in that order, as their own split.
    public func subset(_ indices: some Sequence<Int>) -> TextExamples {
        var out = TextExamples()
        for i in indices { out.append(text(i), label: labels[i]) }
        return out
    }
}

/// One text-classification dataset: three splits of byte texts, seq_len and the epoch
/// order of the train split.
public final class TextClassificationData {
    public let host: Host
    /// Registry name ("sst", "csv"), for messages.
    public let name: String
    /// Instance seed: epoch e's order is drawn from the host RNG seeded (seed, stream e).
    public let seed: UInt64
    /// Bytes per sample (T).
    public let seqLen: Int
    public let nClasses: Int
    /// train, valid, test.
    public let splits: [TextExamples]

    /// The order of epoch `cachedEpoch` (train positions -> example indices). A memo of a pure
    /// function of (seed, epoch), not state: any batch reads the same with or without it.
    private var cachedEpoch: Int64 = -1
    private var cachedOrder: [Int32] = []

    public init(
        host: Host, name: String, seed: UInt64, seqLen: Int, nClasses: Int, splits: [TextExamples]
    ) throws(PluginFailure) {
        guard host.api.pointee.rng_next_u64 != nil else {
            throw .invalid("\(name): the host API table lacks rng_next_u64")
        }
        guard splits.count == 3, splits[0].count >= 1 else { throw .invalid("\(name): the train split is empty") }
        self.host = host; self.name = name; self.seed = seed; self.seqLen = seqLen
        self.nClasses = nClasses; self.splits = splits
    }

    // MARK: the dataset API

    /// vqmoe_dataset_info: classify tokens, vocabulary 256, sample (T), examples per split.
    public func info(_ out: UnsafeMutablePointer<vqmoe_dataset_info>?) throws(PluginFailure) {
        guard let out else { throw .invalid("\(name): info: out is NULL") }
        try requireSize(out.pointee.struct_size, vqmoe_dataset_info.self, "\(name): dataset_info")
        out.pointee.task = VQMOE_TASK_CLASSIFY_TOKENS
        out.pointee.vocab_size = 256
        out.pointee.n_classes = Int64(nClasses)
        out.pointee.sample_ndim = 1
        out.pointee.sample_shape = (Int64(seqLen), 0, 0, 0)
        out.pointee.split_size = (Int64(splits[0].count), Int64(splits[1].count), Int64(splits[2].count))
    }

    /// Batches of an ordered pass: ceil(size / B) for valid/test, INT64_MAX for train.
    public func numBatches(
        _ split: Int32, _ batchSize: Int64, _ out: UnsafeMutablePointer<Int64>?
    ) throws(PluginFailure) {
        guard let out else { throw .invalid("\(name): num_batches: out is NULL") }
        guard (0...2).contains(split) else { throw .invalid("\(name): unknown split \(split)") }
        guard batchSize >= 1 else { throw .invalid("\(name): batch_size \(batchSize) must be >= 1") }
        out.pointee = split == VQMOE_SPLIT_TRAIN ? Int64.max : evalBatches(Int(split), batchSize)
    }

    public func evalBatches(_ split: Int, _ batchSize: Int64) -> Int64 {
        (Int64(splits[split].count) + batchSize - 1) / batchSize
    }

    /// Fill `out` with batch `req.index` of `req.split`: inputs (B,T), targets (B), lengths (B)
    /// int32, all host-allocated; `rows` = real samples.
    public func readBatch(
        _ req: UnsafePointer<vqmoe_batch_request>?, _ out: UnsafeMutablePointer<vqmoe_batch>?
    ) throws(PluginFailure) {
        guard let req, let out else { throw .invalid("\(name): read_batch: request or batch is NULL") }
        try requireSize(req.pointee.struct_size, vqmoe_batch_request.self, "\(name): batch request")
        try requireSize(out.pointee.struct_size, vqmoe_batch.self, "\(name): batch")
        let r = req.pointee
        guard (0...2).contains(r.split) else { throw .invalid("\(name): unknown split \(r.split)") }
        guard r.batch_size >= 1, r.index >= 0 else {
            throw .invalid("\(name): batch_size \(r.batch_size) must be >= 1 and index \(r.index) >= 0")
        }
        let B = Int(r.batch_size), T = seqLen
        let inputs = try requireI32(out.pointee.inputs, [B, T], "\(name): batch inputs")  // (B,T)
        let targets = try requireI32(out.pointee.targets, [B], "\(name): batch targets")  // (B)
        // (B); a host that does not want lengths may leave the view absent.
        var lengths: UnsafeMutablePointer<Int32>?
        if out.pointee.lengths.data != nil {
            lengths = try requireI32(out.pointee.lengths, [B], "\(name): batch lengths")
        }

        if r.split == VQMOE_SPLIT_TRAIN {
            let (first, overflow) = r.index.multipliedReportingOverflow(by: r.batch_size)
            guard !overflow, first <= Int64.max - r.batch_size else {
                throw .invalid("\(name): train batch \(r.index) of \(r.batch_size) is past the largest stream position")
            }
            let n = Int64(splits[0].count)
            for row in 0..<B {
                // Stream position p -> epoch p / N, place p % N of that epoch's order.
                let p = first + Int64(row)
                let (epoch, place) = p.quotientAndRemainder(dividingBy: n)
                let example = Int(epochOrder(epoch)[Int(place)])
                fillRow(row, from: splits[0], example: example, inputs, targets, lengths)
            }
            out.pointee.rows = r.batch_size
            return
        }
        let split = Int(r.split)
        let nb = evalBatches(split, r.batch_size)
        guard r.index < nb else {
            throw PluginFailure(
                status: VQMOE_ERR_END_OF_DATA,
                message: "\(name): \(splitNames[split]) batch \(r.index) is past the end (\(nb) batches of \(B))")
        }
        let first = Int(r.index) * B
        let rows = min(B, splits[split].count - first)
        for row in 0..<rows { fillRow(row, from: splits[split], example: first + row, inputs, targets, lengths) }
        // Padding rows: no input, a target the loss ignores, the minimum length.
        if rows < B {
            (inputs + rows * T).update(repeating: 0, count: (B - rows) * T)
            (targets + rows).update(repeating: Int32(VQMOE_PAD_TARGET), count: B - rows)
            if let lengths { (lengths + rows).update(repeating: 1, count: B - rows) }
        }
        out.pointee.rows = Int64(rows)
    }

    // MARK: samples

    /// Row `row` of a batch = example `example` of `examples`: its first min(len, T) bytes, then
    /// byte 0; its label; its length max(1, min(len, T)).
    private func fillRow(
        _ row: Int, from examples: TextExamples, example: Int, _ inputs: UnsafeMutablePointer<Int32>,
        _ targets: UnsafeMutablePointer<Int32>, _ lengths: UnsafeMutablePointer<Int32>?
    ) {
        let T = seqLen
        let dst = inputs + row * T  // (T)
        let start = examples.starts[example]
        let n = min(examples.starts[example + 1] - start, T)
        examples.bytes.withUnsafeBufferPointer { b in
            let src = b.baseAddress! + start
            for t in 0..<n { dst[t] = Int32(src[t]) }
        }
        if n < T { (dst + n).update(repeating: 0, count: T - n) }
        targets[row] = examples.labels[example]
        lengths?[row] = Int32(max(n, 1))
    }

    /// The order of epoch `epoch`: a Fisher–Yates shuffle of 0 ..< N (N = train examples).
    /// For i = N−1 down to 1, j = the high word of u · (i + 1) with u the next 64-bit draw of
    /// the host RNG seeded (instance seed, stream = epoch) (Lemire's multiply-shift: uniform
    /// in [0, i] up to 2^-64 bias), then swap places i and j.
    private func epochOrder(_ epoch: Int64) -> [Int32] {
        if epoch == cachedEpoch { return cachedOrder }
        let n = splits[0].count
        var order = [Int32](unsafeUninitializedCapacity: n) { buf, count in
            for i in 0..<n { buf[i] = Int32(i) }
            count = n
        }
        var rng = host.rng(seed: seed, stream: UInt64(bitPattern: epoch))
        let next = host.api.pointee.rng_next_u64!
        order.withUnsafeMutableBufferPointer { o in
            var i = n - 1
            while i > 0 {
                let j = Int(next(&rng).multipliedFullWidth(by: UInt64(i + 1)).high)
                o.swapAt(i, j)
                i -= 1
            }
        }
        cachedEpoch = epoch
        cachedOrder = order
        return order
    }
}

extension TextClassificationData: LegacyDatasetPlugin {
    public func batchCount(_ split: Int32, _ batchSize: Int64) throws(PluginFailure) -> Int64 {
        var n: Int64 = 0
        try numBatches(split, batchSize, &n)
        return n
    }
}
