// The `csv` dataset plugin.
//
// Generic CSV/TSV text classification with a header row (RFC 4180 quoting); BANKING77 (PolyAI,
// CC BY 4.0: 10,003 train / 3,080 test queries, 77 intents) by default. BANKING77 has no dev
// set, so the valid split is floor(rows * valid_fraction) rows of the train file (default 0.1:
// 9,003 train / 1,000 valid), chosen deterministically, file order kept: by default every
// 1/f-th row (valid_rows = spread), because BANKING77's train.csv is sorted by class and its
// last 1,000 rows (valid_rows = tail) hold only classes 69..76, 7 of which would then never
// be trained on. Samples and batches: see PluginKit's TextClassification.swift.
import PluginKit
import VQMoEABI

final class CSV: TextClassificationDataset {
    static let name = "csv", version = "1.0.0"
    static let summary =
        "CSV/TSV text classification with a header row (RFC 4180 quoting), BANKING77 by default; valid = "
        + "valid_fraction of the train file's rows (every 1/f-th, or the last); UTF-8 bytes (vocabulary 256) padded to seq_len, one label per text"
    static let hyperparameters: [Hyper] = [
        .string(
            "train_path", "$DATA/banking77/train.csv", path: true,
            "CSV/TSV with a header row; the valid split is the last valid_fraction of its rows"),
        .string(
            "test_path", "$DATA/banking77/test.csv", path: true,
            "CSV/TSV of the test split, same columns as the train file"),
        .string(
            "categories_path", "$DATA/banking77/categories.json", path: true, optional: true,
            "JSON array of the class names (class i = element i); empty = the sorted distinct labels of the train file"
        ),
        .string("text_column", "text", "header name of the text column"),
        .string("label_column", "category", "header name of the label column"),
        .string(
            "delimiter", "auto", choices: ["auto", "comma", "tab"],
            "field separator: auto = tab for a .tsv file, comma otherwise"),
        .float(
            "valid_fraction", 0.1, min: 0, max: 0.5,
            "floor(rows * fraction) rows of the train file form the valid split (BANKING77 has no dev set)"),
        .string(
            "valid_rows", "spread", choices: ["spread", "tail"],
            "which train-file rows are valid: spread = row i when floor((i+1)f) > floor(i f) (every 1/f-th row; "
                + "keeps every class of a class-sorted file such as BANKING77 in both splits), tail = the last rows"),
        .int("seq_len", 0, min: 0, "bytes per text (truncated / padded with 0); 0 = the model's seq_len"),
    ]

    let text: TextClassification

    /// Read the train and test files and the classes, and take the valid split out of the
    /// train file.
    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        let who = Self.who(model), trainPath = hp.string("train_path"), categoriesPath = hp.string("categories_path")
        let validFraction = hp.double("valid_fraction"), tail = hp.string("valid_rows") == "tail"
        let seqLen = try Self.sequenceLength(hp.int("seq_len"), model)
        let read = { (path: String) throws(PluginFailure) -> CSVRows in
            try readCSVRows(
                path, delimiter: Self.delimiterByte(hp.string("delimiter"), for: path),
                textColumn: hp.string("text_column"), labelColumn: hp.string("label_column"), who: who)
        }
        let trainRows = try read(trainPath), testRows = try read(hp.string("test_path"))
        let names = categoriesPath.isEmpty ? distinctLabels(trainRows) : try readCategories(categoriesPath, who: who)
        let source =
            categoriesPath.isEmpty
            ? "the distinct labels of \(trainPath), categories_path being empty" : "categories_path \(categoriesPath)"
        var classes: [String: Int32] = [:]
        for (i, name) in names.enumerated() { classes[name] = Int32(i) }
        let all = try examples(trainRows, classes: classes, source: source, who: who)
        let test = try examples(testRows, classes: classes, source: source, who: who)
        // valid = floor(rows * valid_fraction) rows of the train file (valid_rows says which), file order kept.
        let isValid = (0..<all.count).map { Self.isValidRow($0, of: all.count, validFraction, tail: tail) }
        let trainIndices = (0..<all.count).filter { !isValid[$0] }
        guard !trainIndices.isEmpty else {
            throw .io(
                "\(who): \(trainPath): \(all.count) rows leave no training example with valid_fraction \(validFraction)"
            )
        }
        text = try TextClassification(
            model, who: "csv", seqLen: seqLen, nClasses: names.count,
            splits: [all.subset(trainIndices), all.subset((0..<all.count).filter { isValid[$0] }), test])
    }

    /// Whether train-file row i (0-based, of n) belongs to the valid split. Either way the
    /// valid split has floor(n * f) rows (f = valid_fraction), and both splits keep file order.
    ///   spread: floor((i+1) f) > floor(i f), i.e. every 1/f-th row (f = 0.1: rows 9, 19, 29 ...)
    ///   tail:   i >= n - floor(n f)
    static func isValidRow(_ i: Int, of n: Int, _ f: Double, tail: Bool) -> Bool {
        tail ? i >= n - fractionOf(n, f) : fractionOf(i + 1, f) > fractionOf(i, f)
    }

    /// The field separator of the file at `path`: tab or comma (auto: tab for *.tsv).
    static func delimiterByte(_ delimiter: String, for path: String) -> UInt8 {
        switch delimiter {
        case "tab": return 9
        case "comma": return 44
        default: return path.lowercased().hasSuffix(".tsv") ? 9 : 44
        }
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(CSV.self, host)
}
