// my_dataset -- a vqmoe dataset plugin in Swift: byte-level language modelling over one file.
// `vqmoe plugin new dataset NAME --lang swift` copies this folder with your NAME; it builds
// (./build.sh) and passes `vqmoe plugins check` as it is. Put your method where it says
// ">>> YOUR METHOD".
//
// The file is hyperparameter `path` (default $DATA/enwik8-mini/enwik8-mini; the host expands
// $DATA and $ROOT); vocabulary = the 256 byte values; splits 90/5/5 of the file.
//   train:      batch `index` = B random windows of seq_len + 1 bytes, their starts drawn from
//               the host stream (instance seed, stream = index)
//   valid/test: consecutive windows in order; the kit pads a partial last batch and answers
//               END_OF_DATA past `evalBatches`
// A batch is a pure function of (seed, split, index, batch size): no cursor, no state.
import PluginKit

final class MyDataset: DatasetPlugin {
    static let name = "my_dataset", version = "1.0.0"
    static let summary = "byte-level LM over one file, 90/5/5 split (template)"
    static let hyperparameters: [Hyper] = [
        .string("path", "$DATA/enwik8-mini/enwik8-mini", path: true, "text file to model byte by byte")
    ]

    let host: Host
    let seed: UInt64, seqLen: Int
    /// The whole file, and each split's (start, length) in bytes.
    let bytes: [UInt8], splits: [(start: Int, length: Int)]

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        (host, seed, seqLen) = (model.host, model.seed, model.seqLen)
        // >>> YOUR METHOD: read and tokenize your own format.
        bytes = try readWholeFile(hp.string("path"), who: Self.who(model), hint: "set the `path` hyperparameter")
        let n = bytes.count, trainEnd = n * 90 / 100, validEnd = n * 95 / 100
        splits = [(0, trainEnd), (trainEnd, validEnd - trainEnd), (validEnd, n - validEnd)]
        guard seqLen >= 1, trainEnd >= seqLen + 1 else {
            throw .io("\(Self.who(model)): \(n) bytes; the train split needs seq_len + 1 = \(seqLen + 1)")
        }
    }

    /// >>> YOUR METHOD: .classifyTokens(vocab:classes:) or .classifyImage(classes:).
    var info: DatasetInfo {
        DatasetInfo(.languageModel(vocab: 256), sample: [seqLen], splits: splits.map(\.length))
    }

    /// Ordered windows of an eval split: seq_len inputs plus one more byte for the last target.
    func evalBatches(_ split: Split, batchSize: Int) -> Int {
        let windows = max(splits[split.rawValue].length - 1, 0) / seqLen
        return (windows + batchSize - 1) / batchSize
    }

    func read(_ b: Batch) throws(PluginFailure) -> Int {
        let (start, length) = splits[b.split.rawValue], t = seqLen
        var rng = host.rng(seed: seed, stream: UInt64(b.index))  // stream = batch index
        let windows = (length - 1) / t, first = Int(b.index) * b.size
        let rows = b.split == .train ? b.size : min(b.size, windows - first)
        for r in 0..<rows {
            // train: a start in [0, length - t - 1]; eval: the next window in order
            let at = start + (b.split == .train ? Int(host.next(&rng) % UInt64(length - t)) : (first + r) * t)
            for i in 0..<t {
                (b.tokens[r * t + i], b.targets[r * t + i]) = (Int32(bytes[at + i]), Int32(bytes[at + i + 1]))
            }
        }
        return rows
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(MyDataset.self, host)
}
