// Text-classification batches (VQMOE_TASK_CLASSIFY_TOKENS), shared by the `sst` and `csv`
// dataset plugins: each is a `TextClassificationDataset` whose init reads its files into a
// `TextClassification`, which serves the batches.
//
// A sample is the UTF-8 bytes of one text (vocabulary 256), truncated or padded with byte 0
// to T = seq_len; its target is the class label, and vqmoe_batch.lengths holds
// min(byte count, T), at least 1 (an empty text is a single 0 byte). Batches are a pure
// function of (instance seed, split, index, batch size B):
//   train       batch i = positions [i·B, (i+1)·B) of an endless stream of epochs; epoch e
//               is a Fisher–Yates permutation of the training examples drawn from the host
//               RNG seeded (instance seed, stream e) (EpochSampler). Every example appears
//               exactly once per epoch, and any index can be read in any order (seek = resume).
//   valid/test  the split in file order: ceil(size / B) batches, the last one possibly
//               partial (rows = real samples; the other rows have inputs 0, target
//               VQMOE_PAD_TARGET and length 1); VQMOE_ERR_END_OF_DATA past the end.
import VQMoEABI

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
public final class TextClassification {
    /// Bytes per sample (T).
    public let seqLen: Int
    public let nClasses: Int
    /// train, valid, test.
    public let splits: [TextExamples]
    /// Epoch e's order is drawn from the host RNG seeded (instance seed, stream e).
    let sampler: EpochSampler

    /// `model` gives the host and the instance seed; `who` prefixes messages.
    public init(
        _ model: ModelInfo, who: String, seqLen: Int, nClasses: Int, splits: [TextExamples]
    ) throws(PluginFailure) {
        guard splits.count == 3, splits[0].count >= 1 else { throw .invalid("\(who): the train split is empty") }
        sampler = try EpochSampler(host: model.host, seed: model.seed, count: splits[0].count, who: who)
        self.seqLen = seqLen; self.nClasses = nClasses; self.splits = splits
    }

    /// Classify tokens, vocabulary 256, sample (T), examples per split.
    public var info: DatasetInfo {
        DatasetInfo(
            .classifyTokens(vocab: 256, classes: nClasses), sample: [seqLen], splits: splits.map(\.count))
    }

    /// Fill rows with the batch's examples: inputs (B,T), targets (B), lengths (B).
    public func read(_ b: Batch) throws(PluginFailure) -> Int {
        let examples = try b.examples(sampler), set = splits[b.split.rawValue]
        for (row, example) in examples.enumerated() {
            fillRow(row, from: set, example: example, b.tokens, b.targets, b.lengths)
        }
        return examples.count
    }

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
}

/// A text-classification dataset plugin: its init reads the files into `text`, which serves
/// the info and the batches.
public protocol TextClassificationDataset: DatasetPlugin {
    var text: TextClassification { get }
}

extension TextClassificationDataset {
    public var info: DatasetInfo { text.info }
    public func read(_ b: Batch) throws(PluginFailure) -> Int { try text.read(b) }
}
