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

/// create(): resolve the hyperparameters, read the train and test files and the classes,
/// and take the valid split out of the train file.
func makeCSV(
    _ info: UnsafePointer<vqmoe_create_info>?, _ hp: UnsafePointer<vqmoe_hparams>?
) throws(PluginFailure) -> TextClassificationData {
    guard let info else { throw .invalid("csv: create_info is NULL") }
    try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "csv: create_info")
    let host = try Host.checked(info.pointee.host)
    let who = "dataset 'csv' (\(info.pointee.instance_name.map { String(cString: $0) } ?? "csv"))"
    let c = try CSVConfig(hp, modelSeqLen: info.pointee.seq_len, who: who)
    let trainRows = try readCSVRows(
        c.trainPath, delimiter: c.delimiterByte(for: c.trainPath), textColumn: c.textColumn,
        labelColumn: c.labelColumn, who: who)
    let testRows = try readCSVRows(
        c.testPath, delimiter: c.delimiterByte(for: c.testPath), textColumn: c.textColumn,
        labelColumn: c.labelColumn, who: who)
    let names = c.categoriesPath.isEmpty ? distinctLabels(trainRows) : try readCategories(c.categoriesPath, who: who)
    let source =
        c.categoriesPath.isEmpty
        ? "the distinct labels of \(c.trainPath), categories_path being empty"
        : "categories_path \(c.categoriesPath)"
    var classes: [String: Int32] = [:]
    for (i, name) in names.enumerated() { classes[name] = Int32(i) }
    let all = try examples(trainRows, classes: classes, source: source, who: who)
    let test = try examples(testRows, classes: classes, source: source, who: who)
    // valid = floor(rows * valid_fraction) rows of the train file (valid_rows says which), file order kept.
    let validIndices = (0..<all.count).filter { c.isValidRow($0, of: all.count) }
    let trainIndices = (0..<all.count).filter { !c.isValidRow($0, of: all.count) }
    guard !trainIndices.isEmpty else {
        throw ioFailure(
            "\(who): \(c.trainPath): \(all.count) rows leave no training example with valid_fraction \(c.validFraction)"
        )
    }
    return try TextClassificationData(
        host: host, name: "csv", seed: info.pointee.seed, seqLen: c.seqLen,
        nClasses: names.count,
        splits: [all.subset(trainIndices), all.subset(validIndices), test])
}

/// The static descriptor (built once, never freed): the shared dataset tables of PluginKit.
nonisolated(unsafe) let csvDescriptor: UnsafeMutablePointer<vqmoe_plugin_desc> = datasetDescriptor(
    name: "csv",
    description: "CSV/TSV text classification with a header row (RFC 4180 quoting), BANKING77 by default; valid = "
        + "valid_fraction of the train file's rows (every 1/f-th, or the last); UTF-8 bytes (vocabulary 256) padded to seq_len, one label per text",
    schema: CSVConfig.schema,
    create: { info, hp, out in createInstance(info, out) { () throws(PluginFailure) in try makeCSV(info, hp) } })

/// The plugin's one exported symbol: the descriptor, or NULL for a host of another ABI major.
@_cdecl("vqmoe_plugin_entry")
public func vqmoeEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(host, name: "csv", csvDescriptor)
}
