// The descriptor of the `sst` dataset plugin and its one exported entry point.
//
// SST at the sentence level: stsa.<variant>.train / .dev / .test are the train / valid /
// test splits (binary 6,920 / 872 / 1,821 sentences, fine 8,544 / 1,101 / 2,210). Samples and
// batches: see TextClassification.swift.
import Glibc
import PluginKit
import VQMoEABI

/// The dataset behind an opaque handle (retained by create, released by destroy).
@inline(__always) func dataset(_ inst: OpaquePointer?) -> TextClassificationData? {
    Handle.get(inst, as: TextClassificationData.self)
}

/// Run a call on the dataset behind `inst`, turning failures into status codes.
func withDataset(_ inst: OpaquePointer?, _ body: (TextClassificationData) throws(PluginFailure) -> Void) -> Int32 {
    guard let ds = dataset(inst) else { return VQMOE_ERR_INVALID_ARGUMENT }
    return guarded(ds.host.api) { () throws(PluginFailure) in try body(ds) }
}

/// create(): resolve the hyperparameters and read the three files.
func makeSST(_ info: UnsafePointer<vqmoe_create_info>?, _ hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) -> TextClassificationData {
    guard let info else { throw .invalid("sst: create_info is NULL") }
    try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "sst: create_info")
    let host = try Host.checked(info.pointee.host)
    let who = "dataset 'sst' (\(info.pointee.instance_name.map { String(cString: $0) } ?? "sst"))"
    let config = try SSTConfig(hp, modelSeqLen: info.pointee.seq_len, who: who)
    var splits: [TextExamples] = []
    for suffix in ["train", "dev", "test"] {
        splits.append(try readSSTFile(config.path(suffix), nClasses: config.nClasses, variant: config.variant, who: who))
    }
    return try TextClassificationData(host: host, name: "sst", seed: info.pointee.seed, seqLen: config.seqLen,
                                      nClasses: config.nClasses, splits: splits)
}

/// vqmoe_dataset_api: info / num_batches / read_batch.
nonisolated(unsafe) let datasetAPI: UnsafeMutablePointer<vqmoe_dataset_api> = {
    let p = UnsafeMutablePointer<vqmoe_dataset_api>.allocate(capacity: 1)
    p.initialize(to: vqmoe_dataset_api(
        struct_size: UInt32(MemoryLayout<vqmoe_dataset_api>.size),
        info: { inst, out in withDataset(inst) { ds throws(PluginFailure) in try ds.info(out) } },
        num_batches: { inst, split, batchSize, out in
            withDataset(inst) { ds throws(PluginFailure) in try ds.numBatches(split, batchSize, out) }
        },
        read_batch: { inst, req, out in withDataset(inst) { ds throws(PluginFailure) in try ds.readBatch(req, out) } }))
    return p
}()

/// The static descriptor (built once, never freed).
nonisolated(unsafe) let sstDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = {
    var d = vqmoe_plugin_desc()
    d.abi_version = UInt32(VQMOE_ABI_VERSION)
    d.struct_size = UInt32(MemoryLayout<vqmoe_plugin_desc>.size)
    d.kind = VQMOE_KIND_DATASET
    d.flags = 0
    d.name = staticCString("sst")
    d.version = staticCString("1.0.0")
    d.description = staticCString(
        "Stanford Sentiment Treebank, sentence level (stsa.binary = SST-2, stsa.fine = SST-5; train/dev/test files): " +
        "UTF-8 bytes (vocabulary 256) padded to seq_len, one label per sentence")
    d.hparams = HyperparameterEntry.cArray(SSTConfig.schema)
    d.n_hparams = Int32(SSTConfig.schema.count)
    d.create = { info, hp, out in
        out?.pointee = nil
        return guarded(info?.pointee.host) { () throws(PluginFailure) in
            guard let out else { throw .invalid("sst: create: out is NULL") }
            out.pointee = Handle.make(try makeSST(info, hp))
        }
    }
    d.destroy = { inst in Handle.release(inst, as: TextClassificationData.self) }
    d.num_buffers = { _ in 0 }
    d.buffer_spec = { inst, i, _ in
        withDataset(inst) { _ throws(PluginFailure) in throw .invalid("sst declares no buffers (asked for buffer \(i))") }
    }
    d.bind_buffers = { inst, _, n in
        withDataset(inst) { _ throws(PluginFailure) in
            guard n == 0 else { throw .invalid("sst declares no buffers, got \(n) bindings") }
        }
    }
    d.init_buffers = { _, _ in VQMOE_OK }
    d.begin_step = nil
    d.get_feature = nil
    d.kind_api = UnsafeRawPointer(datasetAPI)
    let p = UnsafeMutablePointer<vqmoe_plugin_desc>.allocate(capacity: 1)
    p.initialize(to: d)
    return p
}()

/// The plugin's one exported symbol: the descriptor, or NULL for a host of another ABI major.
@_cdecl("vqmoe_plugin_entry")
public func vqmoeEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    if let host, host.pointee.abi_version >> 16 != UInt32(VQMOE_ABI_VERSION_MAJOR) {
        let msg = "sst was built for plugin ABI \(VQMOE_ABI_VERSION_MAJOR).\(VQMOE_ABI_VERSION_MINOR), the host speaks \(host.pointee.abi_version >> 16).\(host.pointee.abi_version & 0xffff)"
        msg.withCString { m in "sst".withCString { name in host.pointee.log?(VQMOE_LOG_ERROR, name, m) } }
        return nil
    }
    return UnsafePointer(sstDescriptor)
}
