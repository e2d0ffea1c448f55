import VQMoEABI

/// How a language-model dataset cuts the token splits of one stream into (B,T) batches, as a
/// pure function of (seed, split, index, batch size). Shared by the `char` and `word` datasets.
///
///   windows (default)
///     train       batch i = B random windows; each start is drawn from the host RNG seeded with
///                 (seed, stream = i), uniform over [0, len − T − 1] (Lemire's multiply-shift)
///     valid/test  ordered, non-overlapping windows covering the split; the last window and
///                 batch may be partial (inputs 0, targets VQMOE_PAD_TARGET, rows = real windows)
///   streams (Transformer-XL)
///     every split is cut into B parallel streams of S = ⌊(len − 1) / B⌋ tokens, as
///     Transformer-XL's ordered iterator does (the last (len − 1) mod B targets are left out):
///     row b of batch i holds positions b·S + i·T ..< b·S + min((i+1)·T, S), so row b of batch
///     i+1 continues row b of batch i. Train wraps around after ⌊S / T⌋ whole segments; an
///     eval pass ends with a padded partial segment.
///
/// ```swift
/// let cut = TokenBatches(seqLen: 128, streams: false, name: "char")
/// let rows = try cut.read(tokens, splitStart: start, b, host: host, seed: seed)
/// ```
public struct TokenBatches: Sendable {
    public let seqLen: Int
    public let streams: Bool
    /// The plugin's name, for error messages.
    public let name: String

    public init(seqLen: Int, streams: Bool, name: String) {
        self.seqLen = seqLen; self.streams = streams; self.name = name
    }

    /// Tokens (each with its target) per stream: ⌊(len − 1) / B⌋.
    public func streamLength(splitLength len: Int, batchSize: Int) -> Int { max(len - 1, 0) / batchSize }

    /// Batches of an ordered pass over an eval split: ⌈windows / B⌉, streams ⌈S / T⌉.
    public func evalBatches(splitLength len: Int, batchSize: Int) -> Int {
        if streams { return (streamLength(splitLength: len, batchSize: batchSize) + seqLen - 1) / seqLen }
        let windows = len >= 2 ? (len - 1 + seqLen - 1) / seqLen : 0
        return (windows + batchSize - 1) / batchSize
    }

    /// Fill the batch's tokens/targets (B,T) with batch `b.index` of the split tokens[splitStart
    /// ..< splitStart + b.splitSize]; returns the real rows. The kit has checked an eval index
    /// against `evalBatches`.
    public func read<Token: BinaryInteger>(
        _ tokens: UnsafePointer<Token>, splitStart: Int, _ b: Batch, host: Host, seed: UInt64
    ) throws(PluginFailure) -> Int {
        let T = seqLen, B = b.size, len = b.splitSize, base = tokens + splitStart
        let inputs: UnsafeMutablePointer<Int32> = b.tokens, targets = b.targets
        if streams {
            let S = streamLength(splitLength: len, batchSize: B)
            guard b.split != .train || S >= T else {
                throw .invalid(
                    "\(name): order=streams: the train split (\(len) tokens) cut into \(B) streams leaves \(S) tokens per stream, fewer than one segment of seq_len \(T); lower batch_size or seq_len"
                )
            }
            let segment = b.split == .train ? Int(b.index % Int64(S / T)) : Int(b.index)
            let n = min(T, S - segment * T)
            inputs.update(repeating: 0, count: B * T)
            targets.update(repeating: Int32(VQMOE_PAD_TARGET), count: B * T)
            for r in 0..<B { copy(base + r * S + segment * T, n, inputs + r * T, targets + r * T) }
            return B
        }
        if b.split == .train {
            let range = UInt64(len - T)
            var rng = host.rng(seed: seed, stream: UInt64(bitPattern: b.index))
            let next = host.api.pointee.rng_next_u64!
            for r in 0..<B {
                // The high word of x · range is uniform in [0, range).
                let s = Int(next(&rng).multipliedFullWidth(by: range).high)
                copy(base + s, T, inputs + r * T, targets + r * T)
            }
            return B
        }
        let windows = len >= 2 ? (len - 1 + T - 1) / T : 0
        let first = Int(b.index) * B, rows = min(B, windows - first)
        inputs.update(repeating: 0, count: B * T)
        targets.update(repeating: Int32(VQMOE_PAD_TARGET), count: B * T)
        for r in 0..<rows {
            let start = (first + r) * T
            // targets stay inside the split
            copy(base + start, min(T, len - 1 - start), inputs + r * T, targets + r * T)
        }
        return rows
    }

    /// inputs[t] = src[t], targets[t] = src[t + 1] for t < n.
    @inline(__always) func copy<Token: BinaryInteger>(
        _ src: UnsafePointer<Token>, _ n: Int, _ inputs: UnsafeMutablePointer<Int32>,
        _ targets: UnsafeMutablePointer<Int32>
    ) {
        for t in 0..<n {
            inputs[t] = Int32(truncatingIfNeeded: src[t])
            targets[t] = Int32(truncatingIfNeeded: src[t + 1])
        }
    }

    /// The `order` hyperparameter both datasets declare.
    public static let orderHelp =
        "windows: random train windows, ordered eval windows (each from a fresh context); streams: batch_size parallel streams read in order, row b of batch i+1 continuing row b of batch i (Transformer-XL memory)"
}

extension TokenBatches {
    /// Check the train_fraction / valid_fraction hyperparameters of a corpus split by fractions:
    /// train in (0, 1], valid in [0, 1), together at most 1.
    public static func checkFractions(train: Double, valid: Double, who: String) throws(PluginFailure) {
        guard train > 0 && train <= 1 else { throw .invalid("\(who): train_fraction \(train) must be in (0, 1]") }
        guard valid >= 0 && valid < 1 else { throw .invalid("\(who): valid_fraction \(valid) must be in [0, 1)") }
        guard train + valid <= 1 + 1e-9 else {
            throw .invalid("\(who): train_fraction + valid_fraction = \(train + valid) exceeds 1")
        }
    }

    /// Contiguous splits of `n` tokens from cumulative fractions (so 0.9 + 0.1 leaves exactly 0
    /// for test): the start and length of train, valid, test.
    public static func contiguousSplits(_ n: Int, train: Double, valid: Double) -> (start: [Int], length: [Int]) {
        let trainEnd = fractionOf(n, train), validEnd = max(trainEnd, fractionOf(n, train + valid))
        return ([0, trainEnd, validEnd], [trainEnd, validEnd - trainEnd, n - validEnd])
    }
}

/// A token corpus cut into three contiguous splits (train, valid, test), served as language-model
/// batches by `cut`.
public struct TokenCorpus<Token: BinaryInteger> {
    /// All splits, one after another.
    public let tokens: [Token]
    /// Start and length of each split in `tokens`.
    public let splitStart: [Int], splitLength: [Int]
    public let vocabSize: Int
    public let cut: TokenBatches
    let host: Host
    let seed: UInt64

    /// `model` gives the host and the instance seed. Checks the host can draw train windows.
    public init(
        _ model: ModelInfo, tokens: [Token], splitStart: [Int], splitLength: [Int], vocabSize: Int, cut: TokenBatches
    ) throws(PluginFailure) {
        guard model.host.api.pointee.rng_next_u64 != nil else {
            throw .invalid("\(cut.name): the host API table lacks rng_next_u64")
        }
        (self.tokens, self.splitStart, self.splitLength, self.vocabSize, self.cut) = (
            tokens, splitStart, splitLength, vocabSize, cut
        )
        (host, seed) = (model.host, model.seed)
    }

    public var info: DatasetInfo {
        DatasetInfo(.languageModel(vocab: vocabSize), sample: [cut.seqLen], splits: splitLength, streams: cut.streams)
    }

    public func read(_ b: Batch) throws(PluginFailure) -> Int {
        try tokens.withUnsafeBufferPointer { all throws(PluginFailure) in
            try cut.read(all.baseAddress!, splitStart: splitStart[b.split.rawValue], b, host: host, seed: seed)
        }
    }
}

/// A language-model dataset plugin: its init builds `corpus`, which serves the info and the
/// batches.
public protocol LanguageModelDataset: DatasetPlugin {
    associatedtype Token: BinaryInteger
    var corpus: TokenCorpus<Token> { get }
}

extension LanguageModelDataset {
    public var info: DatasetInfo { corpus.info }
    public func evalBatches(_ split: Split, batchSize: Int) -> Int {
        corpus.cut.evalBatches(splitLength: corpus.splitLength[split.rawValue], batchSize: batchSize)
    }
    public func read(_ b: Batch) throws(PluginFailure) -> Int { try corpus.read(b) }
}
