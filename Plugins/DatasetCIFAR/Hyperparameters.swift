// The cifar dataset's hyperparameter schema and its resolved values.
import PluginKit
import VQMoEABI

/// CIFAR-10 or CIFAR-100 (Krizhevsky 2009), binary version.
enum CIFARVariant: String {
    case cifar10, cifar100

    /// Label bytes before the 3072 pixel bytes of a record: CIFAR-10 (label); CIFAR-100 (coarse, fine).
    var labelBytes: Int { self == .cifar10 ? 1 : 2 }
    var recordSize: Int { labelBytes + 3 * 32 * 32 }
    /// Training files in order, then the test file.
    var trainFiles: [String] { self == .cifar10 ? (1...5).map { "data_batch_\($0).bin" } : ["train.bin"] }
    var testFile: String { self == .cifar10 ? "test_batch.bin" : "test.bin" }
    /// Per-channel (R, G, B) mean and standard deviation of x/255 over the training set.
    var mean: [Double] { self == .cifar10 ? [0.4914, 0.4822, 0.4465] : [0.5071, 0.4865, 0.4409] }
    var std: [Double] { self == .cifar10 ? [0.2470, 0.2435, 0.2616] : [0.2673, 0.2564, 0.2762] }
    var displayName: String { self == .cifar10 ? "CIFAR-10" : "CIFAR-100" }
}

/// Resolved hyperparameters of one `cifar` dataset.
struct CIFARConfig {
    /// Folder holding the binary batch files ($DATA expanded by the host).
    var dir: String
    var variant: CIFARVariant
    /// CIFAR-100: the 100 fine classes (false) or the 20 coarse superclasses (true).
    var coarse: Bool
    /// The last `valid_fraction` of the training records (file order) form the valid split.
    var validFraction: Double
    /// (x/255 − mean_c)/std_c per channel when true; x/255 when false.
    var normalize: Bool

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "dir", type: VQMOE_HP_STRING,
            description:
                "folder of the binary version: data_batch_{1..5}.bin + test_batch.bin (CIFAR-10) or train.bin + test.bin (CIFAR-100); $DATA and $ROOT are expanded",
            defaultString: "$DATA/cifar-10-batches-bin", extraFlags: VQMOE_HP_PATH),
        HyperparameterEntry(
            name: "variant", type: VQMOE_HP_STRING,
            description: "cifar10 (10 classes, 1 label byte per record) or cifar100 (2 label bytes: coarse, fine)",
            defaultString: "cifar10", choices: "cifar10,cifar100"),
        HyperparameterEntry(
            name: "label", type: VQMOE_HP_STRING,
            description: "CIFAR-100 label: fine (100 classes) or coarse (20 superclasses); CIFAR-10 has only fine",
            defaultString: "fine", choices: "fine,coarse"),
        HyperparameterEntry(
            name: "valid_fraction", type: VQMOE_HP_FLOAT,
            description: "the last fraction of the training records (file order) held out as the valid split",
            defaultValue: 0.1, min: 0, max: 0.5),
        HyperparameterEntry(
            name: "normalize", type: VQMOE_HP_BOOL,
            description: "per-channel (x/255 - mean)/std with the variant's training-set statistics; false: x/255",
            defaultValue: 1),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them.
    init(_ hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        func string(_ name: String, _ fallback: String) -> String {
            vqmoe_hp_string(hp, name, nil).map { String(cString: $0) } ?? fallback
        }
        dir = string("dir", "")
        let v = string("variant", "cifar10")
        let label = string("label", "fine")
        validFraction = vqmoe_hp_float(hp, "valid_fraction", 0.1)
        normalize = vqmoe_hp_bool(hp, "normalize", 1) != 0
        guard !dir.isEmpty else { throw .invalid("hyperparameter 'dir' is empty") }
        guard let variant = CIFARVariant(rawValue: v) else {
            throw .invalid("variant '\(v)' must be cifar10 or cifar100")
        }
        self.variant = variant
        guard label == "fine" || label == "coarse" else { throw .invalid("label '\(label)' must be fine or coarse") }
        coarse = label == "coarse"
        guard !(coarse && variant == .cifar10) else {
            throw .invalid("label = coarse needs variant = cifar100 (CIFAR-10 records have a single label byte)")
        }
        guard validFraction >= 0 && validFraction <= 0.5 else {
            throw .invalid("valid_fraction \(validFraction) must be in [0, 0.5]")
        }
    }

    /// Classes of the chosen label: 10, 100 (fine) or 20 (coarse).
    var nClasses: Int { variant == .cifar10 ? 10 : (coarse ? 20 : 100) }

    func path(_ name: String) -> String { dir + "/" + name }
}
