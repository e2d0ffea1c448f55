// The `cifar` dataset plugin: CIFAR-10 / CIFAR-100, binary version (CIFARFile.swift).
//
// Splits: the training records (CIFAR-10: data_batch_1..5.bin in that order; CIFAR-100:
// train.bin) minus the last ⌊N·valid_fraction⌋ are the train split, those last records (in
// file order) the valid split; the test file is the test split.
// Batches (pure functions of (instance seed, split, index, batch size)):
//   train       batch i = stream positions [i·B, (i+1)·B) of an endless sequence of epochs,
//               each a seeded permutation of the train split (EpochSampler).
//   valid/test  batch i = records [i·B, min((i+1)·B, size)) in order; the last batch may be
//               partial (rows = real samples, the rest 0 inputs and VQMOE_PAD_TARGET targets);
//               VQMOE_ERR_END_OF_DATA past ceil(size / B) batches.
// Pixels: inputs (B, 3, 32, 32), channel c = the record's c-th plane (R, G, B), value
// v/255, or (v/255 − mean_c)/std_c with `normalize`, through a 3×256 table.
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

final class CIFARDataset: DatasetPlugin {
    static let name = "cifar", version = "1.0.0"
    static let summary =
        "CIFAR-10 / CIFAR-100 binary version (Krizhevsky 2009): (3,32,32) float32 pixels, per-channel (x/255 - mean)/std, "
        + "fine or coarse CIFAR-100 labels, last valid_fraction of the training records as the valid split"
    static let hyperparameters: [Hyper] = [
        .string(
            "dir", "$DATA/cifar-10-batches-bin", path: true,
            "folder of the binary version: data_batch_{1..5}.bin + test_batch.bin (CIFAR-10) or train.bin + test.bin (CIFAR-100); $DATA and $ROOT are expanded"
        ),
        .string(
            "variant", "cifar10", choices: ["cifar10", "cifar100"],
            "cifar10 (10 classes, 1 label byte per record) or cifar100 (2 label bytes: coarse, fine)"),
        .string(
            "label", "fine", choices: ["fine", "coarse"],
            "CIFAR-100 label: fine (100 classes) or coarse (20 superclasses); CIFAR-10 has only fine"),
        .float(
            "valid_fraction", 0.1, min: 0, max: 0.5,
            "the last fraction of the training records (file order) held out as the valid split"),
        .bool(
            "normalize", true,
            "per-channel (x/255 - mean)/std with the variant's training-set statistics; false: x/255"),
    ]

    /// (C, H, W) of one sample.
    static let channels = 3, height = 32, width = 32
    static let pixelsPerImage = channels * height * width
    /// Classes of the chosen label: 10, 100 (fine) or 20 (coarse).
    let nClasses: Int
    /// All training records (train split = [0, nTrain), valid split = [nTrain, count)) and the test records.
    let trainFile: ImageSet
    let testFile: ImageSet
    let nTrain: Int
    let nValid: Int
    /// Float value of byte v in channel c at [c·256 + v] (3·256).
    let table: [Float]
    let sampler: EpochSampler

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        let who = Self.who(model), dir = hp.string("dir"), variant = CIFARVariant(rawValue: hp.string("variant"))!
        let coarse = hp.string("label") == "coarse", validFraction = hp.double("valid_fraction")
        guard !(coarse && variant == .cifar10) else {
            throw .invalid(
                "\(who): label = coarse needs variant = cifar100 (CIFAR-10 records have a single label byte)")
        }
        nClasses = variant == .cifar10 ? 10 : (coarse ? 20 : 100)
        var train = ImageSet(), test = ImageSet()
        try prefixed(who) { () throws(PluginFailure) in
            for file in variant.trainFiles {
                try appendRecords(dir + "/" + file, variant: variant, coarse: coarse, to: &train)
            }
            try appendRecords(dir + "/" + variant.testFile, variant: variant, coarse: coarse, to: &test)
        }
        (trainFile, testFile) = (train, test)
        // ⌊N·f⌋ with a guard against representation error (0.1 · 50000 must give 5000).
        nValid = fractionOf(train.count, validFraction)
        nTrain = train.count - nValid
        guard nTrain >= 1 else {
            throw .io(
                "\(who): \(dir) holds \(train.count) training records: none left for training after valid_fraction \(validFraction)"
            )
        }
        var t = [Float](repeating: 0, count: 3 * 256)
        for ch in 0..<3 {
            for v in 0..<256 {
                let x = Double(v) / 255
                t[ch * 256 + v] = Float(hp.bool("normalize") ? (x - variant.mean[ch]) / variant.std[ch] : x)
            }
        }
        table = t
        sampler = try EpochSampler(host: model.host, seed: model.seed, count: nTrain, who: who)
    }

    var info: DatasetInfo {
        DatasetInfo(
            .classifyImage(classes: nClasses), sample: [Self.channels, Self.height, Self.width],
            splits: [nTrain, nValid, testFile.count])
    }

    /// Inputs (B,3,32,32) float32 through the table, targets (B) int32.
    func read(_ b: Batch) throws(PluginFailure) -> Int {
        let examples = try b.examples(sampler, validOffset: nTrain)
        let file = b.split == .test ? testFile : trainFile
        let P = Self.pixelsPerImage, plane = Self.height * Self.width
        table.withUnsafeBufferPointer { lut in
            file.pixels.withUnsafeBufferPointer { px in
                for (row, ex) in examples.enumerated() {
                    let src = px.baseAddress! + ex * P, dst = b.pixels + row * P
                    for ch in 0..<Self.channels {
                        let t = lut.baseAddress! + ch * 256, s = src + ch * plane, d = dst + ch * plane
                        for k in 0..<plane { d[k] = t[Int(s[k])] }
                    }
                    b.targets[row] = file.labels[ex]
                }
            }
        }
        return examples.count
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(CIFARDataset.self, host)
}
