// The `sst` dataset plugin.
//
// SST at the sentence level: stsa.<variant>.train / .dev / .test are the train / valid /
// test splits (binary 6,920 / 872 / 1,821 sentences, fine 8,544 / 1,101 / 2,210). Samples and
// batches: see PluginKit's TextClassification.swift.
import PluginKit
import VQMoEABI

final class SST: TextClassificationDataset {
    static let name = "sst", version = "1.0.0"
    static let summary =
        "Stanford Sentiment Treebank, sentence level (stsa.binary = SST-2, stsa.fine = SST-5; train/dev/test files): "
        + "UTF-8 bytes (vocabulary 256) padded to seq_len, one label per sentence"
    static let hyperparameters: [Hyper] = [
        .string(
            "dir", "$DATA/sst", path: true,
            "folder holding stsa.<variant>.{train,dev,test} (one 'LABEL SENTENCE' a line)"),
        .string(
            "variant", "binary", choices: ["binary", "fine"],
            "binary = SST-2 (labels 0/1, neutral sentences removed), fine = SST-5 (labels 0..4)"),
        .int("seq_len", 0, min: 0, "bytes per sentence (truncated / padded with 0); 0 = the model's seq_len"),
    ]

    /// Classes of each variant: binary 0/1 (negative, positive), fine 0..4 (very negative ..
    /// very positive).
    static let classesOfVariant = ["binary": 2, "fine": 5]

    let text: TextClassification

    /// Read the three files stsa.<variant>.{train,dev,test} of `dir`.
    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        let who = Self.who(model), dir = hp.string("dir"), variant = hp.string("variant")
        let nClasses = Self.classesOfVariant[variant]!
        let seqLen = try Self.sequenceLength(hp.int("seq_len"), model)
        var splits: [TextExamples] = []
        for suffix in ["train", "dev", "test"] {
            let path = (dir.hasSuffix("/") ? dir : dir + "/") + "stsa.\(variant).\(suffix)"
            splits.append(try readSSTFile(path, nClasses: nClasses, variant: variant, who: who))
        }
        text = try TextClassification(model, who: "sst", seqLen: seqLen, nClasses: nClasses, splits: splits)
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(SST.self, host)
}
