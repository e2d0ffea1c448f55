// The csv dataset's hyperparameter schema and its resolved values.
import PluginKit
import VQMoEABI

/// Resolved hyperparameters of one csv dataset.
struct CSVConfig {
    var trainPath: String
    var testPath: String
    /// JSON array of the class names (class i = element i); "" = the sorted distinct labels of
    /// the train file.
    var categoriesPath: String
    var textColumn: String
    var labelColumn: String
    /// "auto" (tab for a .tsv file, else comma), "comma" or "tab".
    var delimiter: String
    /// Fraction of the train file's rows that form the valid split: floor(rows * fraction).
    var validFraction: Double
    /// Which rows: "spread" (evenly spaced through the file) or "tail" (the last ones).
    var validRows: String
    /// Bytes per sample (T), already resolved against the model's seq_len.
    var seqLen: Int

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "train_path", type: VQMOE_HP_STRING,
            description: "CSV/TSV with a header row; the valid split is the last valid_fraction of its rows",
            defaultString: "$DATA/banking77/train.csv", extraFlags: VQMOE_HP_PATH),
        HyperparameterEntry(
            name: "test_path", type: VQMOE_HP_STRING,
            description: "CSV/TSV of the test split, same columns as the train file",
            defaultString: "$DATA/banking77/test.csv", extraFlags: VQMOE_HP_PATH),
        HyperparameterEntry(
            name: "categories_path", type: VQMOE_HP_STRING,
            description:
                "JSON array of the class names (class i = element i); empty = the sorted distinct labels of the train file",
            defaultString: "$DATA/banking77/categories.json", extraFlags: VQMOE_HP_PATH | VQMOE_HP_OPTIONAL),
        HyperparameterEntry(
            name: "text_column", type: VQMOE_HP_STRING,
            description: "header name of the text column", defaultString: "text"),
        HyperparameterEntry(
            name: "label_column", type: VQMOE_HP_STRING,
            description: "header name of the label column", defaultString: "category"),
        HyperparameterEntry(
            name: "delimiter", type: VQMOE_HP_STRING,
            description: "field separator: auto = tab for a .tsv file, comma otherwise",
            defaultString: "auto", choices: "auto,comma,tab"),
        HyperparameterEntry(
            name: "valid_fraction", type: VQMOE_HP_FLOAT,
            description:
                "floor(rows * fraction) rows of the train file form the valid split (BANKING77 has no dev set)",
            defaultValue: 0.1, min: 0, max: 0.5),
        HyperparameterEntry(
            name: "valid_rows", type: VQMOE_HP_STRING,
            description:
                "which train-file rows are valid: spread = row i when floor((i+1)f) > floor(i f) (every 1/f-th row; "
                + "keeps every class of a class-sorted file such as BANKING77 in both splits), tail = the last rows",
            defaultString: "spread", choices: "spread,tail"),
        HyperparameterEntry(
            name: "seq_len", type: VQMOE_HP_INT,
            description: "bytes per text (truncated / padded with 0); 0 = the model's seq_len",
            defaultValue: 0, min: 0),
    ]

    /// Read the values the host resolved and check them; `modelSeqLen` is create_info.seq_len.
    init(_ hp: UnsafePointer<vqmoe_hparams>?, modelSeqLen: Int64, who: String) throws(PluginFailure) {
        func string(_ name: String, _ fallback: String) -> String {
            vqmoe_hp_string(hp, name, nil).map { String(cString: $0) } ?? fallback
        }
        trainPath = string("train_path", "")
        testPath = string("test_path", "")
        categoriesPath = string("categories_path", "")
        textColumn = string("text_column", "text")
        labelColumn = string("label_column", "category")
        delimiter = string("delimiter", "auto")
        validFraction = vqmoe_hp_float(hp, "valid_fraction", 0.1)
        validRows = string("valid_rows", "spread")
        let seqLenHP = vqmoe_hp_int(hp, "seq_len", 0)
        for (name, value) in [
            ("train_path", trainPath), ("test_path", testPath), ("text_column", textColumn),
            ("label_column", labelColumn),
        ] where value.isEmpty {
            throw .invalid("\(who): hyperparameter '\(name)' is empty")
        }
        guard ["auto", "comma", "tab"].contains(delimiter) else {
            throw .invalid("\(who): delimiter '\(delimiter)' is not one of auto, comma, tab")
        }
        guard validFraction >= 0 && validFraction <= 0.5 else {
            throw .invalid("\(who): valid_fraction \(validFraction) must be in [0, 0.5]")
        }
        guard ["spread", "tail"].contains(validRows) else {
            throw .invalid("\(who): valid_rows '\(validRows)' is not one of spread, tail")
        }
        guard seqLenHP >= 0 else { throw .invalid("\(who): seq_len \(seqLenHP) must be >= 0 (0 = the model's)") }
        let T = seqLenHP > 0 ? seqLenHP : modelSeqLen
        guard T >= 1 else {
            throw .invalid("\(who): sequence length is \(T); set the dataset's seq_len or the model's seq_len to >= 1")
        }
        seqLen = Int(T)
    }

    /// Whether train-file row i (0-based, of n) belongs to the valid split. Either way the
    /// valid split has floor(n * valid_fraction) rows, and both splits keep file order.
    ///   spread: floor((i+1) f) > floor(i f), i.e. every 1/f-th row (f = 0.1: rows 9, 19, 29 ...)
    ///   tail:   i >= n - floor(n f)
    func isValidRow(_ i: Int, of n: Int) -> Bool {
        if validRows == "tail" { return i >= n - fractionOf(n, validFraction) }
        return fractionOf(i + 1, validFraction) > fractionOf(i, validFraction)
    }

    /// The field separator of the file at `path`: tab or comma (auto: tab for *.tsv).
    func delimiterByte(for path: String) -> UInt8 {
        switch delimiter {
        case "tab": return 9
        case "comma": return 44
        default: return path.lowercased().hasSuffix(".tsv") ? 9 : 44
        }
    }
}
