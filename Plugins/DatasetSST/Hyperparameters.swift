// The sst dataset's hyperparameter schema and its resolved values.
import PluginKit
import VQMoEABI

/// Resolved hyperparameters of one sst dataset.
struct SSTConfig {
    /// Folder holding stsa.<variant>.{train,dev,test}.
    var dir: String
    /// "binary" (SST-2) or "fine" (SST-5).
    var variant: String
    /// Bytes per sample (T), already resolved against the model's seq_len.
    var seqLen: Int

    /// Classes of each variant: binary 0/1 (negative, positive), fine 0..4 (very negative ..
    /// very positive).
    static let classesOfVariant = ["binary": 2, "fine": 5]

    var nClasses: Int { Self.classesOfVariant[variant]! }

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "dir", type: VQMOE_HP_STRING,
            description: "folder holding stsa.<variant>.{train,dev,test} (one 'LABEL SENTENCE' a line)",
            defaultString: "$DATA/sst", extraFlags: VQMOE_HP_PATH),
        HyperparameterEntry(
            name: "variant", type: VQMOE_HP_STRING,
            description: "binary = SST-2 (labels 0/1, neutral sentences removed), fine = SST-5 (labels 0..4)",
            defaultString: "binary", choices: "binary,fine"),
        HyperparameterEntry(
            name: "seq_len", type: VQMOE_HP_INT,
            description: "bytes per sentence (truncated / padded with 0); 0 = the model's seq_len",
            defaultValue: 0, min: 0),
    ]

    /// Read the values the host resolved and check them; `modelSeqLen` is create_info.seq_len.
    init(_ hp: UnsafePointer<vqmoe_hparams>?, modelSeqLen: Int64, who: String) throws(PluginFailure) {
        dir = vqmoe_hp_string(hp, "dir", nil).map { String(cString: $0) } ?? ""
        variant = vqmoe_hp_string(hp, "variant", nil).map { String(cString: $0) } ?? "binary"
        let seqLenHP = vqmoe_hp_int(hp, "seq_len", 0)
        guard !dir.isEmpty else { throw .invalid("\(who): hyperparameter 'dir' is empty") }
        guard Self.classesOfVariant[variant] != nil else {
            throw .invalid("\(who): variant '\(variant)' is not one of binary, fine")
        }
        guard seqLenHP >= 0 else { throw .invalid("\(who): seq_len \(seqLenHP) must be >= 0 (0 = the model's)") }
        let T = seqLenHP > 0 ? seqLenHP : modelSeqLen
        guard T >= 1 else {
            throw .invalid("\(who): sequence length is \(T); set the dataset's seq_len or the model's seq_len to >= 1")
        }
        seqLen = Int(T)
    }

    /// stsa.<variant>.<suffix> in `dir`.
    func path(_ suffix: String) -> String { (dir.hasSuffix("/") ? dir : dir + "/") + "stsa.\(variant).\(suffix)" }
}
