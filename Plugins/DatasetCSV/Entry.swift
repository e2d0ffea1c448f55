// The descriptor of the `csv` dataset plugin and its one exported entry point.
//
// Generic CSV/TSV text classification with a header row (RFC 4180 quoting); BANKING77 (PolyAI,
// CC BY 4.0: 10,003 train / 3,080 test queries, 77 intents) by default. BANKING77 has no dev
// set, so the valid split is floor(rows * valid_fraction) rows of the train file (default 0.1:
// 9,003 train / 1,000 valid), chosen deterministically, file order kept: by default every
// 1/f-th row (valid_rows = spread), because BANKING77's train.csv is sorted by class and its
// last 1,000 rows (valid_rows = tail) hold only classes 69..76, 7 of which would then never
// be trained on. Samples and batches: see TextClassification.swift.
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

/// create(): resolve the hyperparameters, read the train and test files and the classes,
/// and take the valid split out of the train file.
func makeCSV(_ info: UnsafePointer<vqmoe_create_info>?, _ hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) -> TextClassificationData {
    guard let info else { throw .invalid("csv: create_info is NULL") }
    try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "csv: create_info")
    let host = try Host.checked(info.pointee.host)
    let who = "dataset 'csv' (\(info.pointee.instance_name.map { String(cString: $0) } ?? "csv"))"
    let c = try CSVConfig(hp, modelSeqLen: info.pointee.seq_len, who: who)
    let trainRows = try readCSVRows(c.trainPath, delimiter: c.delimiterByte(for: c.trainPath), textColumn: c.textColumn,
                                    labelColumn: c.labelColumn, who: who)
    let testRows = try readCSVRows(c.testPath, delimiter: c.delimiterByte(for: c.testPath), textColumn: c.textColumn,
                                   labelColumn: c.labelColumn, who: who)
    let names = c.categoriesPath.isEmpty ? distinctLabels(trainRows) : try readCategories(c.categoriesPath, who: who)
    let source = c.categoriesPath.isEmpty ? "the distinct labels of \(c.trainPath), categories_path being empty"
                                          : "categories_path \(c.categoriesPath)"
    var classes: [String: Int32] = [:]
    for (i, name) in names.enumerated() { classes[name] = Int32(i) }
    let all = try examples(trainRows, classes: classes, source: source, who: who)
    let test = try examples(testRows, classes: classes, source: source, who: who)
    // valid = floor(rows * valid_fraction) rows of the train file (valid_rows says which), file order kept.
    let validIndices = (0..<all.count).filter { c.isValidRow($0, of: all.count) }
    let trainIndices = (0..<all.count).filter { !c.isValidRow($0, of: all.count) }
    guard !trainIndices.isEmpty else {
        throw ioFailure("\(who): \(c.trainPath): \(all.count) rows leave no training example with valid_fraction \(c.validFraction)")
    }
    return try TextClassificationData(host: host, name: "csv", seed: info.pointee.seed, seqLen: c.seqLen,
                                      nClasses: names.count,
                                      splits: [all.subset(trainIndices), all.subset(validIndices), test])
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
nonisolated(unsafe) let csvDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = {
    var d = vqmoe_plugin_desc()
    d.abi_version = UInt32(VQMOE_ABI_VERSION)
    d.struct_size = UInt32(MemoryLayout<vqmoe_plugin_desc>.size)
    d.kind = VQMOE_KIND_DATASET
    d.flags = 0
    d.name = staticCString("csv")
    d.version = staticCString("1.0.0")
    d.description = staticCString(
        "CSV/TSV text classification with a header row (RFC 4180 quoting), BANKING77 by default; valid = " +
        "valid_fraction of the train file's rows (every 1/f-th, or the last); UTF-8 bytes (vocabulary 256) padded to seq_len, one label per text")
    d.hparams = HyperparameterEntry.cArray(CSVConfig.schema)
    d.n_hparams = Int32(CSVConfig.schema.count)
    d.create = { info, hp, out in
        out?.pointee = nil
        return guarded(info?.pointee.host) { () throws(PluginFailure) in
            guard let out else { throw .invalid("csv: create: out is NULL") }
            out.pointee = Handle.make(try makeCSV(info, hp))
        }
    }
    d.destroy = { inst in Handle.release(inst, as: TextClassificationData.self) }
    d.num_buffers = { _ in 0 }
    d.buffer_spec = { inst, i, _ in
        withDataset(inst) { _ throws(PluginFailure) in throw .invalid("csv declares no buffers (asked for buffer \(i))") }
    }
    d.bind_buffers = { inst, _, n in
        withDataset(inst) { _ throws(PluginFailure) in
            guard n == 0 else { throw .invalid("csv declares no buffers, got \(n) bindings") }
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
        let msg = "csv was built for plugin ABI \(VQMOE_ABI_VERSION_MAJOR).\(VQMOE_ABI_VERSION_MINOR), the host speaks \(host.pointee.abi_version >> 16).\(host.pointee.abi_version & 0xffff)"
        msg.withCString { m in "csv".withCString { name in host.pointee.log?(VQMOE_LOG_ERROR, name, m) } }
        return nil
    }
    return UnsafePointer(csvDescriptor)
}
