// The descriptor of the `sst` dataset plugin and its one exported entry point.
//
// SST at the sentence level: stsa.<variant>.train / .dev / .test are the train / valid /
// test splits (binary 6,920 / 872 / 1,821 sentences, fine 8,544 / 1,101 / 2,210). Samples and
// batches: see TextClassification.swift.
import Glibc
import PluginKit
import VQMoEABI

/// create(): resolve the hyperparameters and read the three files.
func makeSST(
    _ info: UnsafePointer<vqmoe_create_info>?, _ hp: UnsafePointer<vqmoe_hparams>?
) throws(PluginFailure) -> TextClassificationData {
    guard let info else { throw .invalid("sst: create_info is NULL") }
    try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "sst: create_info")
    let host = try Host.checked(info.pointee.host)
    let who = "dataset 'sst' (\(info.pointee.instance_name.map { String(cString: $0) } ?? "sst"))"
    let config = try SSTConfig(hp, modelSeqLen: info.pointee.seq_len, who: who)
    var splits: [TextExamples] = []
    for suffix in ["train", "dev", "test"] {
        splits.append(
            try readSSTFile(config.path(suffix), nClasses: config.nClasses, variant: config.variant, who: who))
    }
    return try TextClassificationData(
        host: host, name: "sst", seed: info.pointee.seed, seqLen: config.seqLen,
        nClasses: config.nClasses, splits: splits)
}

/// The static descriptor (built once, never freed): the shared dataset tables of PluginKit.
nonisolated(unsafe) let sstDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = datasetDescriptor(
    name: "sst",
    description:
        "Stanford Sentiment Treebank, sentence level (stsa.binary = SST-2, stsa.fine = SST-5; train/dev/test files): "
        + "UTF-8 bytes (vocabulary 256) padded to seq_len, one label per sentence",
    schema: SSTConfig.schema,
    create: { info, hp, out in createInstance(info, out) { () throws(PluginFailure) in try makeSST(info, hp) } })

/// The plugin's one exported symbol: the descriptor, or NULL for a host of another ABI major.
@_cdecl("vqmoe_plugin_entry")
public func vqmoeEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(host, name: "sst", sstDescriptor)
}
