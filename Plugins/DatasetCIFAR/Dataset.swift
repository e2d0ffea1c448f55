// One cifar dataset instance: the decoded records, the splits, and the batches.
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

private let splitNames = ["train", "valid", "test"]

final class CIFARDataset {
    let host: Host
    let config: CIFARConfig
    let who: String
    /// (C, H, W) of one sample.
    static let channels = 3, height = 32, width = 32
    static let pixelsPerImage = channels * height * width
    /// All training records (train split = [0, nTrain), valid split = [nTrain, count)) and the test records.
    let trainFile: ImageSet
    let testFile: ImageSet
    let nTrain: Int
    let nValid: Int
    /// Float value of byte v in channel c at [c·256 + v] (3·256).
    let table: [Float]
    let sampler: EpochSampler

    init(info: UnsafePointer<vqmoe_create_info>?, hp: UnsafePointer<vqmoe_hparams>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        try requireSize(info.pointee.struct_size, vqmoe_create_info.self, "create_info")
        host = try Host.checked(info.pointee.host)
        guard host.api.pointee.rng_next_u64 != nil else { throw .invalid("host API table lacks rng_next_u64") }
        let name = info.pointee.instance_name.map { String(cString: $0) } ?? "cifar"
        who = "dataset 'cifar' (\(name))"
        do {
            config = try CIFARConfig(hp)
        } catch {
            throw PluginFailure(status: error.status, message: "\(who): \(error.message)")
        }
        let c = config
        var train = ImageSet(), test = ImageSet()
        do {
            for file in c.variant.trainFiles {
                try appendRecords(c.path(file), variant: c.variant, coarse: c.coarse, to: &train)
            }
            try appendRecords(c.path(c.variant.testFile), variant: c.variant, coarse: c.coarse, to: &test)
        } catch {
            throw PluginFailure(status: error.status, message: "\(who): \(error.message)")
        }
        trainFile = train
        testFile = test
        // ⌊N·f⌋ with a guard against representation error (0.1 · 50000 must give 5000).
        nValid = min(max(Int((Double(train.count) * c.validFraction + 1e-6).rounded(.down)), 0), train.count)
        nTrain = train.count - nValid
        guard nTrain >= 1 else {
            throw .io(
                "\(who): \(c.dir) holds \(train.count) training records: none left for training after valid_fraction \(c.validFraction)"
            )
        }
        var t = [Float](repeating: 0, count: 3 * 256)
        for ch in 0..<3 {
            for v in 0..<256 {
                let x = Double(v) / 255
                t[ch * 256 + v] = Float(c.normalize ? (x - c.variant.mean[ch]) / c.variant.std[ch] : x)
            }
        }
        table = t
        sampler = EpochSampler(host: host, seed: info.pointee.seed, count: nTrain)
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
        out.pointee.sample_shape = (Int64(Self.channels), Int64(Self.height), Int64(Self.width), 0)
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

    /// Fill `out` with batch `req.index` of `req.split`: inputs (B,3,32,32) float32, targets (B) int32.
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
        let B = Int(r.batch_size), P = Self.pixelsPerImage, plane = Self.height * Self.width
        let inputs = try requireF32(
            out.pointee.inputs, [B, Self.channels, Self.height, Self.width],
            "\(who): read_batch inputs")  // (B,3,32,32)
        let targets = try requireI32(out.pointee.targets, [B], "\(who): read_batch targets")  // (B)

        let n = examples.count
        table.withUnsafeBufferPointer { lut in
            file.pixels.withUnsafeBufferPointer { px in
                for (row, ex) in examples.enumerated() {
                    let src = px.baseAddress! + ex * P, dst = inputs + row * P
                    for ch in 0..<Self.channels {
                        let t = lut.baseAddress! + ch * 256, s = src + ch * plane, d = dst + ch * plane
                        for k in 0..<plane { d[k] = t[Int(s[k])] }
                    }
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
