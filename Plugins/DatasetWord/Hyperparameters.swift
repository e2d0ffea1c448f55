// The `word` dataset's hyperparameter schema and its resolved values.
import PluginKit
import VQMoEABI

/// Resolved hyperparameters of one `word` dataset.
struct WordConfig {
    /// WikiText folder holding wiki.{train,valid,test}.tokens ("" = none).
    var dir: String
    /// A single text file, split contiguously (used when `dir` is empty or lacks the files).
    var path: String
    /// Leading / next fraction of the token stream of `path` for train / valid (test: the rest).
    var trainFraction: Double
    var validFraction: Double
    /// Tokens per window; 0 = the model's seq_len.
    var seqLen: Int
    /// Train-split count a word needs to enter the vocabulary.
    var minCount: Int
    /// Largest vocabulary, <unk> and <eos> included; 0 = unlimited.
    var maxVocab: Int
    /// order = "streams": batch rows are parallel streams read in order (Transformer-XL).
    var streams: Bool

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "dir", type: VQMOE_HP_STRING,
            description:
                "WikiText-103-format folder with wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens (the host expands $DATA); empty = use path",
            defaultString: "$DATA/wikitext-103", extraFlags: VQMOE_HP_PATH | VQMOE_HP_OPTIONAL),
        HyperparameterEntry(
            name: "path", type: VQMOE_HP_STRING,
            description:
                "single text file split contiguously (by tokens) into train/valid/test; used when dir is empty or lacks its files",
            defaultString: "", extraFlags: VQMOE_HP_PATH | VQMOE_HP_OPTIONAL),
        HyperparameterEntry(
            name: "train_fraction", type: VQMOE_HP_FLOAT,
            description: "with path: leading fraction of the token stream used for training, in (0, 1]",
            defaultValue: 0.9, min: 0, max: 1),
        HyperparameterEntry(
            name: "valid_fraction", type: VQMOE_HP_FLOAT,
            description: "with path: next fraction used for validation, in [0, 1); the test split is the rest",
            defaultValue: 0.05, min: 0, max: 1),
        HyperparameterEntry(
            name: "seq_len", type: VQMOE_HP_INT,
            description: "tokens per window; 0 = the model's seq_len", defaultValue: 0, min: 0),
        HyperparameterEntry(
            name: "min_count", type: VQMOE_HP_INT,
            description:
                "a word enters the vocabulary when it occurs at least this often in the train split (else <unk>)",
            defaultValue: 1, min: 1),
        HyperparameterEntry(
            name: "max_vocab", type: VQMOE_HP_INT,
            description:
                "largest vocabulary, <unk> and <eos> included (the most frequent words are kept); 0 = unlimited",
            defaultValue: 0, min: 0),
        HyperparameterEntry(
            name: "order", type: VQMOE_HP_STRING, description: TokenBatches.orderHelp,
            defaultString: "windows", choices: "windows,streams"),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them.
    init(_ hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        func string(_ name: String, _ fallback: String) -> String {
            vqmoe_hp_string(hp, name, nil).map { String(cString: $0) } ?? fallback
        }
        dir = string("dir", "")
        path = string("path", "")
        trainFraction = vqmoe_hp_float(hp, "train_fraction", 0.9)
        validFraction = vqmoe_hp_float(hp, "valid_fraction", 0.05)
        seqLen = Int(vqmoe_hp_int(hp, "seq_len", 0))
        minCount = Int(vqmoe_hp_int(hp, "min_count", 1))
        maxVocab = Int(vqmoe_hp_int(hp, "max_vocab", 0))
        let order = string("order", "windows")
        guard order == "windows" || order == "streams" else {
            throw .invalid("order '\(order)' must be one of windows, streams")
        }
        streams = order == "streams"
        guard trainFraction > 0 && trainFraction <= 1 else {
            throw .invalid("train_fraction \(trainFraction) must be in (0, 1]")
        }
        guard validFraction >= 0 && validFraction < 1 else {
            throw .invalid("valid_fraction \(validFraction) must be in [0, 1)")
        }
        guard trainFraction + validFraction <= 1 + 1e-9 else {
            throw .invalid("train_fraction + valid_fraction = \(trainFraction + validFraction) exceeds 1")
        }
        guard seqLen >= 0 else { throw .invalid("seq_len \(seqLen) must be >= 0 (0 = the model's)") }
        guard minCount >= 1 else { throw .invalid("min_count \(minCount) must be >= 1") }
        guard maxVocab == 0 || maxVocab >= 2 else {
            throw .invalid(
                "max_vocab \(maxVocab) must be 0 (unlimited) or >= 2 (<unk> and <eos> are always in the vocabulary)")
        }
    }
}
