// The `idx` dataset plugin: MNIST / Fashion-MNIST in IDX format (IDXFile.swift).
//
// Splits: the training file's first N − ⌊N·valid_fraction⌋ images are the train split, the
// rest (in file order) the valid split; the test files are the test split.
// Batches (pure functions of (instance seed, split, index, batch size)):
//   train       batch i = stream positions [i·B, (i+1)·B) of an endless sequence of epochs,
//               each a seeded permutation of the train split (EpochSampler).
//   valid/test  batch i = examples [i·B, min((i+1)·B, size)) in order; the last batch may be
//               partial (rows = real samples, the rest 0 inputs and VQMOE_PAD_TARGET targets);
//               VQMOE_ERR_END_OF_DATA past ceil(size / B) batches.
// Pixels: v/255, or (v/255 − mean)/std with `normalize`, through a 256-entry table.
import PluginKit
import VQMoEABI

/// Images of one IDX source: `count` images of `pixelsPerImage` bytes and their labels.
struct ImageSet {
    var pixels: [UInt8]  // (count, H·W)
    var labels: [Int32]  // (count)
    var count: Int { labels.count }
}

final class IDXDataset: DatasetPlugin {
    static let name = "idx", version = "1.0.0"
    static let summary =
        "MNIST / Fashion-MNIST images in IDX format (LeCun et al.; Fashion-MNIST: Zalando Research, MIT), gzip or plain: "
        + "(1,H,W) float32 pixels (x/255 - mean)/std, last valid_fraction of the training file as the valid split"
    static let hyperparameters: [Hyper] = [
        .string(
            "dir", "$DATA/fashion-mnist", path: true, "folder holding the IDX files (the host expands $DATA and $ROOT)"),
        .string(
            "train_images", "train-images-idx3-ubyte.gz",
            "training images in dir (IDX3 ubyte, gzip or plain; '.gz' added or dropped when missing)"),
        .string("train_labels", "train-labels-idx1-ubyte.gz", "training labels in dir (IDX1 ubyte, gzip or plain)"),
        .string("test_images", "t10k-images-idx3-ubyte.gz", "test images in dir (IDX3 ubyte, gzip or plain)"),
        .string("test_labels", "t10k-labels-idx1-ubyte.gz", "test labels in dir (IDX1 ubyte, gzip or plain)"),
        .float(
            "valid_fraction", 0.1, min: 0, max: 0.5,
            "the last fraction of the training images (file order) held out as the valid split"),
        .bool("normalize", true, "pixels (x/255 - mean)/std; false: x/255 in [0, 1]"),
        .float(
            "mean", 0.2860,
            "pixel mean (of x/255) subtracted when normalize (Fashion-MNIST: 0.2860; MNIST: 0.1307)"),
        .float(
            "std", 0.3530, min: 0,
            "pixel standard deviation divided by when normalize (Fashion-MNIST: 0.3530; MNIST: 0.3081)"),
        .int("n_classes", 10, min: 1, max: 256, "number of classes; every label must be < n_classes"),
    ]

    let nClasses: Int
    /// (C, H, W) of one sample; C = 1.
    let rows: Int
    let cols: Int
    var pixelsPerImage: Int { rows * cols }
    /// The training file (train split = [0, nTrain), valid split = [nTrain, count)) and the test file.
    let trainFile: ImageSet
    let testFile: ImageSet
    let nTrain: Int
    let nValid: Int
    /// Float value of each byte value (256).
    let table: [Float]
    let sampler: EpochSampler

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        let who = Self.who(model), dir = hp.string("dir"), std = hp.double("std"), mean = hp.double("mean")
        guard std > 0 else { throw .invalid("\(who): std \(std) must be finite and > 0") }
        let classes = hp.int("n_classes")
        nClasses = classes
        // A file named by a hyperparameter: `dir/name`, or `name` when absolute.
        let path = { (name: String) in
            let n = hp.string(name); return n.hasPrefix("/") ? n : dir + "/" + n
        }
        let (train, trainRows, trainCols) = try prefixed(who) { () throws(PluginFailure) in
            try Self.load(images: path("train_images"), labels: path("train_labels"), what: "training", classes)
        }
        let (test, testRows, testCols) = try prefixed(who) { () throws(PluginFailure) in
            try Self.load(images: path("test_images"), labels: path("test_labels"), what: "test", classes)
        }
        guard testRows == trainRows && testCols == trainCols else {
            throw .io(
                "\(who): \(path("test_images")): test images are \(testRows)x\(testCols) but the training images (\(path("train_images"))) are \(trainRows)x\(trainCols)"
            )
        }
        (rows, cols, trainFile, testFile) = (trainRows, trainCols, train, test)
        // ⌊N·f⌋ with a guard against representation error (0.1 · 60000 must give 6000).
        nValid = fractionOf(train.count, hp.double("valid_fraction"))
        nTrain = train.count - nValid
        guard nTrain >= 1 else {
            throw .io(
                "\(who): \(path("train_images")) holds \(train.count) images: none left for training after valid_fraction \(hp.double("valid_fraction"))"
            )
        }
        let normalize = hp.bool("normalize")
        table = (0..<256).map { v in
            let x = Double(v) / 255
            return Float(normalize ? (x - mean) / std : x)
        }
        sampler = try EpochSampler(host: model.host, seed: model.seed, count: nTrain, who: who)
    }

    /// Read an image file and its label file; check they agree and that labels < n_classes.
    /// Returns the images and their (rows, cols).
    static func load(
        images: String, labels: String, what: String, _ nClasses: Int
    ) throws(PluginFailure) -> (ImageSet, Int, Int) {
        let img = try readIDX(images, what: "\(what) images", magic: idxImageMagic)
        let lab = try readIDX(labels, what: "\(what) labels", magic: idxLabelMagic)
        let (n, h, w) = (img.dims[0], img.dims[1], img.dims[2])
        guard lab.dims[0] == n else {
            throw .io("\(lab.path): \(lab.dims[0]) labels but \(img.path) holds \(n) images (the counts must match)")
        }
        var out = [Int32](repeating: 0, count: n)
        for i in 0..<n {
            let y = Int(lab.bytes[i])
            guard y < nClasses else {
                throw .io("\(lab.path): label \(y) of item \(i) is outside [0, \(nClasses)) (n_classes = \(nClasses))")
            }
            out[i] = Int32(y)
        }
        return (ImageSet(pixels: img.bytes, labels: out), h, w)
    }

    var info: DatasetInfo {
        DatasetInfo(
            .classifyImage(classes: nClasses), sample: [1, rows, cols], splits: [nTrain, nValid, testFile.count])
    }

    /// Inputs (B,1,H,W) float32 through the table, targets (B) int32.
    func read(_ b: Batch) throws(PluginFailure) -> Int {
        let examples = try b.examples(sampler, validOffset: nTrain), P = pixelsPerImage
        let file = b.split == .test ? testFile : trainFile
        table.withUnsafeBufferPointer { lut in
            file.pixels.withUnsafeBufferPointer { px in
                for (row, ex) in examples.enumerated() {
                    let src = px.baseAddress! + ex * P, dst = b.pixels + row * P
                    for k in 0..<P { dst[k] = lut[Int(src[k])] }
                    b.targets[row] = file.labels[ex]
                }
            }
        }
        return examples.count
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(IDXDataset.self, host)
}
