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
/// try cut.read(tokens, splitStart: start, splitLength: len, split: 0, index: step, batchSize: 16,
///              host: host, seed: seed, inputs: x, targets: y)
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
    public func evalBatches(splitLength len: Int, batchSize: Int) -> Int64 {
        if streams { return Int64((streamLength(splitLength: len, batchSize: batchSize) + seqLen - 1) / seqLen) }
        let windows = len >= 2 ? (len - 1 + seqLen - 1) / seqLen : 0
        return Int64((windows + batchSize - 1) / batchSize)
    }

    /// Fill inputs/targets (B,T) int32 with batch `index` of the split tokens[splitStart ..<
    /// splitStart + splitLength]; returns the real rows. Eval indices past the end throw
    /// VQMOE_ERR_END_OF_DATA.
    public func read<Token: BinaryInteger>(
        _ tokens: UnsafePointer<Token>, splitStart: Int, splitLength len: Int, split: Int,
        index: Int64, batchSize B: Int, host: UnsafePointer<vqmoe_host_api>, seed: UInt64,
        inputs: UnsafeMutablePointer<Int32>, targets: UnsafeMutablePointer<Int32>
    ) throws(PluginFailure) -> Int {
        let T = seqLen, base = tokens + splitStart
        if split != 0 {
            let nb = evalBatches(splitLength: len, batchSize: B)
            guard index < nb else {
                throw PluginFailure(
                    status: VQMOE_ERR_END_OF_DATA,
                    message:
                        "\(name): \(["train", "valid", "test"][split]) batch \(index) is past the end (\(nb) batches of \(B))"
                )
            }
        }
        if streams {
            let S = streamLength(splitLength: len, batchSize: B)
            guard split != 0 || S >= T else {
                throw .invalid(
                    "\(name): order=streams: the train split (\(len) tokens) cut into \(B) streams leaves \(S) tokens per stream, fewer than one segment of seq_len \(T); lower batch_size or seq_len"
                )
            }
            let segment = split == 0 ? Int(index % Int64(S / T)) : Int(index)
            let n = min(T, S - segment * T)
            inputs.update(repeating: 0, count: B * T)
            targets.update(repeating: Int32(VQMOE_PAD_TARGET), count: B * T)
            for b in 0..<B { copy(base + b * S + segment * T, n, inputs + b * T, targets + b * T) }
            return B
        }
        if split == 0 {
            let range = UInt64(len - T)
            var rng = vqmoe_rng(key: 0, counter: 0)
            host.pointee.rng_init!(&rng, seed, UInt64(bitPattern: index))
            for b in 0..<B {
                // The high word of x · range is uniform in [0, range).
                let s = Int(host.pointee.rng_next_u64!(&rng).multipliedFullWidth(by: range).high)
                copy(base + s, T, inputs + b * T, targets + b * T)
            }
            return B
        }
        let windows = len >= 2 ? (len - 1 + T - 1) / T : 0
        let first = Int(index) * B, rows = min(B, windows - first)
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

    /// Write `streams` into dataset_info when the host's struct has the field (ABI 1.1).
    public func writeInfo(_ out: UnsafeMutablePointer<vqmoe_dataset_info>) {
        if out.pointee.struct_size >= UInt32(MemoryLayout<vqmoe_dataset_info>.offset(of: \.streams)! + 4) {
            out.pointee.streams = streams ? 1 : 0
        }
    }
}
