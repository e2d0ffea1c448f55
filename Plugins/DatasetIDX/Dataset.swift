// One idx dataset instance: the decoded images and labels, the splits, and the batches.
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

private let splitNames = ["train", "valid", "test"]

/// Images of one IDX source: `count` images of `pixelsPerImage` bytes and their labels.
struct ImageSet {
    var pixels: [UInt8]  // (count, H·W)
    var labels: [Int32]  // (count)
    var count: Int { labels.count }
}

final class IDXDataset {
    let host: Host
    let config: IDXConfig
    let who: String
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

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        guard host.api.pointee.rng_next_u64 != nil else { throw .invalid("host API table lacks rng_next_u64") }
        let name = info.pointee.instance_name.map { String(cString: $0) } ?? "idx"
        who = "dataset 'idx' (\(name))"
        do {
            config = try IDXConfig(hp)
        } catch {
            throw PluginFailure(status: error.status, message: "\(who): \(error.message)")
        }
        let c = config
        let loaded: (ImageSet, Int, Int, ImageSet, Int, Int)
        do {
            let (train, trainRows, trainCols) = try IDXDataset.load(
                images: c.path(c.trainImages), labels: c.path(c.trainLabels),
                what: "training", nClasses: c.nClasses)
            let (test, testRows, testCols) = try IDXDataset.load(
                images: c.path(c.testImages), labels: c.path(c.testLabels),
                what: "test", nClasses: c.nClasses)
            loaded = (train, trainRows, trainCols, test, testRows, testCols)
        } catch {
            throw PluginFailure(status: error.status, message: "\(who): \(error.message)")
        }
        let (train, trainRows, trainCols, test, testRows, testCols) = loaded
        guard testRows == trainRows && testCols == trainCols else {
            throw .io(
                "\(who): \(c.path(c.testImages)): test images are \(testRows)x\(testCols) but the training images (\(c.path(c.trainImages))) are \(trainRows)x\(trainCols)"
            )
        }
        rows = trainRows
        cols = trainCols
        trainFile = train
        testFile = test
        // ⌊N·f⌋ with a guard against representation error (0.1 · 60000 must give 6000).
        nValid = min(max(Int((Double(train.count) * c.validFraction + 1e-6).rounded(.down)), 0), train.count)
        nTrain = train.count - nValid
        guard nTrain >= 1 else {
            throw .io(
                "\(who): \(c.path(c.trainImages)) holds \(train.count) images: none left for training after valid_fraction \(c.validFraction)"
            )
        }
        table = (0..<256).map { v in
            let x = Double(v) / 255
            return Float(c.normalize ? (x - c.mean) / c.std : x)
        }
        sampler = EpochSampler(host: host, seed: info.pointee.seed, count: nTrain)
    }

    /// Read an image file and its label file; check they agree and that labels < n_classes.
    /// Returns the images and their (rows, cols).
    static func load(
        images: String, labels: String, what: String,
        nClasses: Int
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

    /// Examples per split (train, valid, test).
    var splitSizes: [Int] { [nTrain, nValid, testFile.count] }

    func info(_ out: UnsafeMutablePointer<vqmoe_dataset_info>?) throws(PluginFailure) {
        guard let out else { throw .invalid("info: out is NULL") }
        try requireSize(out.pointee.struct_size, vqmoe_dataset_info.self, "dataset_info")
        out.pointee.task = VQMOE_TASK_CLASSIFY_IMAGE
        out.pointee.vocab_size = 0
        out.pointee.n_classes = Int64(config.nClasses)
        out.pointee.sample_ndim = 3
        out.pointee.sample_shape = (1, Int64(rows), Int64(cols), 0)
        out.pointee.split_size = (Int64(nTrain), Int64(nValid), Int64(testFile.count))
    }

    /// Batches of an ordered pass: ceil(size / B); train: Int64.max.
    func numBatches(_ split: Int32, _ batchSize: Int64) throws(PluginFailure) -> Int64 {
        guard (0...2).contains(split) else { throw .invalid("\(who): unknown split \(split)") }
        guard batchSize >= 1 else { throw .invalid("\(who): batch_size \(batchSize) must be >= 1") }
        if split == VQMOE_SPLIT_TRAIN { return Int64.max }
        let size = Int64(splitSizes[Int(split)])
        return (size + batchSize - 1) / batchSize
    }

    /// Fill `out` with batch `req.index` of `req.split`: inputs (B,1,H,W) float32, targets (B) int32.
    func readBatch(
        _ req: UnsafePointer<vqmoe_batch_request>?, _ out: UnsafeMutablePointer<vqmoe_batch>?
    ) throws(PluginFailure) {
        guard let req, let out else { throw .invalid("read_batch: request or batch is NULL") }
        try requireSize(req.pointee.struct_size, vqmoe_batch_request.self, "batch_request")
        try requireSize(out.pointee.struct_size, vqmoe_batch.self, "batch")
        let r = req.pointee
        let (split, examples) = try batchExamples(
            r, sampler: sampler, splitSizes: splitSizes, validOffset: nTrain, who: who)
        let file: ImageSet = split == VQMOE_SPLIT_TEST ? testFile : trainFile
        let B = Int(r.batch_size), P = pixelsPerImage
        let inputs = try requireF32(out.pointee.inputs, [B, 1, rows, cols], "\(who): read_batch inputs")  // (B,1,H,W)
        let targets = try requireI32(out.pointee.targets, [B], "\(who): read_batch targets")  // (B)

        let n = examples.count
        table.withUnsafeBufferPointer { lut in
            file.pixels.withUnsafeBufferPointer { px in
                for (row, ex) in examples.enumerated() {
                    let src = px.baseAddress! + ex * P, dst = inputs + row * P
                    for k in 0..<P { dst[k] = lut[Int(src[k])] }
                    targets[row] = file.labels[ex]
                }
            }
        }
        // Padding of a partial eval batch: 0 inputs, VQMOE_PAD_TARGET targets.
        if n < B {
            (inputs + n * P).update(repeating: 0, count: (B - n) * P)
            (targets + n).update(repeating: Int32(VQMOE_PAD_TARGET), count: B - n)
        }
        out.pointee.rows = Int64(n)
    }
}
