// The idx dataset's hyperparameter schema and its resolved values.
import PluginKit
import VQMoEABI

/// Resolved hyperparameters of one `idx` dataset.
struct IDXConfig {
    /// Folder holding the four IDX files ($DATA expanded by the host).
    var dir: String
    /// File names inside `dir` (an absolute name is used as is).
    var trainImages: String
    var trainLabels: String
    var testImages: String
    var testLabels: String
    /// The last `valid_fraction` of the training images, in file order, form the valid split.
    var validFraction: Double
    /// x/255 then (x/255 − mean)/std when true; x/255 when false.
    var normalize: Bool
    var mean: Double
    var std: Double
    /// Labels must lie in [0, n_classes).
    var nClasses: Int

    static let schema: [HyperparameterEntry] = [
        HyperparameterEntry(
            name: "dir", type: VQMOE_HP_STRING,
            description: "folder holding the IDX files (the host expands $DATA and $ROOT)",
            defaultString: "$DATA/fashion-mnist", extraFlags: VQMOE_HP_PATH),
        HyperparameterEntry(
            name: "train_images", type: VQMOE_HP_STRING,
            description: "training images in dir (IDX3 ubyte, gzip or plain; '.gz' added or dropped when missing)",
            defaultString: "train-images-idx3-ubyte.gz"),
        HyperparameterEntry(
            name: "train_labels", type: VQMOE_HP_STRING,
            description: "training labels in dir (IDX1 ubyte, gzip or plain)",
            defaultString: "train-labels-idx1-ubyte.gz"),
        HyperparameterEntry(
            name: "test_images", type: VQMOE_HP_STRING,
            description: "test images in dir (IDX3 ubyte, gzip or plain)",
            defaultString: "t10k-images-idx3-ubyte.gz"),
        HyperparameterEntry(
            name: "test_labels", type: VQMOE_HP_STRING,
            description: "test labels in dir (IDX1 ubyte, gzip or plain)",
            defaultString: "t10k-labels-idx1-ubyte.gz"),
        HyperparameterEntry(
            name: "valid_fraction", type: VQMOE_HP_FLOAT,
            description: "the last fraction of the training images (file order) held out as the valid split",
            defaultValue: 0.1, min: 0, max: 0.5),
        HyperparameterEntry(
            name: "normalize", type: VQMOE_HP_BOOL,
            description: "pixels (x/255 - mean)/std; false: x/255 in [0, 1]",
            defaultValue: 1),
        HyperparameterEntry(
            name: "mean", type: VQMOE_HP_FLOAT,
            description: "pixel mean (of x/255) subtracted when normalize (Fashion-MNIST: 0.2860; MNIST: 0.1307)",
            defaultValue: 0.2860),
        HyperparameterEntry(
            name: "std", type: VQMOE_HP_FLOAT,
            description: "pixel standard deviation divided by when normalize (Fashion-MNIST: 0.3530; MNIST: 0.3081)",
            defaultValue: 0.3530, min: 0),
        HyperparameterEntry(
            name: "n_classes", type: VQMOE_HP_INT,
            description: "number of classes; every label must be < n_classes",
            defaultValue: 10, min: 1, max: 256),
    ]

    /// Read the values the host resolved (defaults for anything missing) and check them.
    init(_ hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        func string(_ name: String, _ fallback: String) -> String {
            vqmoe_hp_string(hp, name, nil).map { String(cString: $0) } ?? fallback
        }
        dir = string("dir", "")
        trainImages = string("train_images", "train-images-idx3-ubyte.gz")
        trainLabels = string("train_labels", "train-labels-idx1-ubyte.gz")
        testImages = string("test_images", "t10k-images-idx3-ubyte.gz")
        testLabels = string("test_labels", "t10k-labels-idx1-ubyte.gz")
        validFraction = vqmoe_hp_float(hp, "valid_fraction", 0.1)
        normalize = vqmoe_hp_bool(hp, "normalize", 1) != 0
        mean = vqmoe_hp_float(hp, "mean", 0.2860)
        std = vqmoe_hp_float(hp, "std", 0.3530)
        nClasses = Int(vqmoe_hp_int(hp, "n_classes", 10))
        guard !dir.isEmpty else { throw .invalid("hyperparameter 'dir' is empty") }
        for (name, value) in [
            ("train_images", trainImages), ("train_labels", trainLabels),
            ("test_images", testImages), ("test_labels", testLabels),
        ] where value.isEmpty {
            throw .invalid("hyperparameter '\(name)' is empty")
        }
        guard validFraction >= 0 && validFraction <= 0.5 else {
            throw .invalid("valid_fraction \(validFraction) must be in [0, 0.5]")
        }
        guard mean.isFinite else { throw .invalid("mean \(mean) must be finite") }
        guard std.isFinite && std > 0 else { throw .invalid("std \(std) must be finite and > 0") }
        guard nClasses >= 1 && nClasses <= 256 else {
            throw .invalid("n_classes \(nClasses) must be in [1, 256] (IDX labels are bytes)")
        }
    }

    /// The full path of a file named by a hyperparameter: `dir/name`, or `name` when absolute.
    func path(_ name: String) -> String { name.hasPrefix("/") ? name : dir + "/" + name }
}
