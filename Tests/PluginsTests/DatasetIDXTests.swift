import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `idx` dataset plugin (MNIST / Fashion-MNIST IDX files): decoding of gzip and plain
/// files, exact pixel values, splits, epoch permutations, seeking, padded eval batches,
/// every error, the real Fashion-MNIST files, and the generic checker.
final class DatasetIDXTests: XCTestCase {
    var tempDir: URL!

    override func setUpWithError() throws {
        tempDir = FileManager.default.temporaryDirectory.appendingPathComponent("vqmoe-idx-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tempDir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: tempDir)
    }

    // MARK: fixtures

    /// A small IDX data set: `count` images of rows×cols bytes (an LCG, so every image is
    /// distinct) and labels in [0, nClasses).
    struct Fixture {
        var rows: Int, cols: Int
        var pixels: [UInt8]  // (count, rows*cols)
        var labels: [UInt8]  // (count)
        var count: Int { labels.count }
        func image(_ i: Int) -> [UInt8] { Array(pixels[(i * rows * cols)..<((i + 1) * rows * cols)]) }
    }

    static func makeFixture(count: Int, rows: Int = 4, cols: Int = 5, nClasses: Int = 10, seed: UInt64) -> Fixture {
        var x = seed
        func next() -> UInt64 {
            x = x &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return x >> 33
        }
        let pixels = (0..<(count * rows * cols)).map { _ in UInt8(truncatingIfNeeded: next()) }
        let labels = (0..<count).map { _ in UInt8(next() % UInt64(nClasses)) }
        return Fixture(rows: rows, cols: cols, pixels: pixels, labels: labels)
    }

    static func be32(_ v: UInt32) -> [UInt8] {
        [UInt8(v >> 24), UInt8((v >> 16) & 0xff), UInt8((v >> 8) & 0xff), UInt8(v & 0xff)]
    }

    /// IDX image file bytes: magic 0x00000803, count, rows, cols, pixels.
    static func imageFile(_ f: Fixture, magic: UInt32 = 0x0000_0803) -> [UInt8] {
        be32(magic) + be32(UInt32(f.count)) + be32(UInt32(f.rows)) + be32(UInt32(f.cols)) + f.pixels
    }

    /// IDX label file bytes: magic 0x00000801, count, labels.
    static func labelFile(_ f: Fixture, magic: UInt32 = 0x0000_0801) -> [UInt8] {
        be32(magic) + be32(UInt32(f.count)) + f.labels
    }

    /// CRC-32 (IEEE, as gzip uses).
    static func crc32(_ data: [UInt8]) -> UInt32 {
        var crc: UInt32 = 0xffff_ffff
        for b in data {
            crc ^= UInt32(b)
            for _ in 0..<8 { crc = (crc >> 1) ^ (0xedb8_8320 & (0 &- (crc & 1))) }
        }
        return ~crc
    }

    /// A valid gzip file holding `data` in stored (uncompressed) deflate blocks (RFC 1951/1952),
    /// so the plugin's zlib path is exercised without a compressor in the test.
    static func gzip(_ data: [UInt8]) -> [UInt8] {
        var out: [UInt8] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]
        var pos = 0
        repeat {
            let n = min(65535, data.count - pos)
            let final: UInt8 = pos + n == data.count ? 1 : 0
            out.append(final)
            out += [UInt8(n & 0xff), UInt8(n >> 8), UInt8(~n & 0xff), UInt8((~n >> 8) & 0xff)]
            out += data[pos..<(pos + n)]
            pos += n
        } while pos < data.count
        let crc = crc32(data), size = UInt32(truncatingIfNeeded: data.count)
        for v in [crc, size] {
            out += [UInt8(v & 0xff), UInt8((v >> 8) & 0xff), UInt8((v >> 16) & 0xff), UInt8(v >> 24)]
        }
        return out
    }

    @discardableResult
    func write(_ bytes: [UInt8], _ name: String, in dir: URL? = nil) throws -> String {
        let url = (dir ?? tempDir).appendingPathComponent(name)
        try Data(bytes).write(to: url)
        return url.path
    }

    /// The four default-named files (gzip) for a train and a test fixture.
    func writeDataSet(train: Fixture, test: Fixture, gzipped: Bool = true) throws {
        let ext = gzipped ? ".gz" : ""
        func z(_ b: [UInt8]) -> [UInt8] { gzipped ? Self.gzip(b) : b }
        try write(z(Self.imageFile(train)), "train-images-idx3-ubyte" + ext)
        try write(z(Self.labelFile(train)), "train-labels-idx1-ubyte" + ext)
        try write(z(Self.imageFile(test)), "t10k-images-idx3-ubyte" + ext)
        try write(z(Self.labelFile(test)), "t10k-labels-idx1-ubyte" + ext)
    }

    let train = DatasetIDXTests.makeFixture(count: 23, seed: 11)
    let test = DatasetIDXTests.makeFixture(count: 7, seed: 22)

    func openDataset(_ hp: [String: Any] = [:], seed: UInt64 = 1) throws -> DatasetInstance {
        var values = hp
        if values["dir"] == nil { values["dir"] = tempDir.path }
        let core = try makeInstance(
            try openPlugin("DatasetIDX"), dims: ModelDims(), hyperparameters: values, seed: seed)
        return try DatasetInstance(core)
    }

    /// The error message of a throwing expression ("" when it did not throw).
    func errorMessage(_ body: () throws -> Void) -> String {
        do { try body() } catch let e as VQMoEError { return e.message } catch { return "\(error)" }
        XCTFail("expected an error")
        return ""
    }

    /// Brute-force pixel value: v/255, then (x − mean)/std when normalising.
    static func pixel(_ v: UInt8, normalize: Bool = true, mean: Double = 0.2860, std: Double = 0.3530) -> Float {
        let x = Double(v) / 255.0
        return Float(normalize ? (x - mean) / std : x)
    }

    /// The Fisher–Yates permutation of epoch `e` the plugin documents (host RNG, stream e).
    static func permutation(seed: UInt64, epoch: Int, count n: Int) -> [Int] {
        var perm = Array(0..<n)
        var rng = HostRNG.make(seed: seed, stream: UInt64(epoch))
        var j = n - 1
        while j >= 1 {
            let k = Int(HostRNG.next(&rng).multipliedFullWidth(by: UInt64(j + 1)).high)
            perm.swapAt(j, k)
            j -= 1
        }
        return perm
    }

    // MARK: info and splits

    func testInfoSplitsAndShapeFromTheFile() throws {
        try writeDataSet(train: train, test: test)
        let ds = try openDataset()
        XCTAssertEqual(ds.task, VQMOE_TASK_CLASSIFY_IMAGE)
        XCTAssertTrue(ds.inputIsFloat)
        XCTAssertEqual(ds.nClasses, 10)
        XCTAssertEqual(ds.sampleShape, [1, 4, 5])
        // 23 training images, valid = floor(2.3) = 2 (the last two), test 7.
        XCTAssertEqual(ds.splitSizes, [21, 2, 7])
        XCTAssertEqual(try ds.numBatches(.train, batchSize: 4), Int.max)
        XCTAssertEqual(try ds.numBatches(.valid, batchSize: 4), 1)
        XCTAssertEqual(try ds.numBatches(.test, batchSize: 3), 3)
        XCTAssertEqual(try openDataset(["valid_fraction": 0.5]).splitSizes, [12, 11, 7])
        XCTAssertEqual(try openDataset(["valid_fraction": 0.3]).splitSizes, [17, 6, 7])
        XCTAssertEqual(try openDataset(["n_classes": 12]).nClasses, 12)
        // No buffers.
        XCTAssertTrue(ds.core.buffers.isEmpty)
    }

    func testZeroValidFractionGivesAnEmptyValidSplit() throws {
        try writeDataSet(train: train, test: test)
        let ds = try openDataset(["valid_fraction": 0.0])
        XCTAssertEqual(ds.splitSizes, [23, 0, 7])
        XCTAssertEqual(try ds.numBatches(.valid, batchSize: 4), 0)
        XCTAssertNil(try ds.read(.valid, index: 0, batchSize: 4))
    }

    // MARK: eval batches: exact pixels, order, padding

    /// Every eval batch equals a brute-force decode of the fixture: split order, the partial
    /// last batch padded with 0 inputs and -1 targets, nil past the end.
    func checkEvalSplits(_ ds: DatasetInstance, B: Int, normalize: Bool, mean: Double, std: Double) throws {
        let P = train.rows * train.cols
        let nTrain = ds.splitSizes[0]
        for (split, fixture, offset) in [(Split.valid, train, nTrain), (Split.test, test, 0)] {
            let size = ds.splitSizes[Int(split.rawValue)]
            let nb = try ds.numBatches(split, batchSize: B)
            XCTAssertEqual(nb, (size + B - 1) / B)
            for index in 0..<nb {
                let batch = try XCTUnwrap(ds.read(split, index: index, batchSize: B))
                let rows = min(B, size - index * B)
                XCTAssertEqual(batch.rows, rows, "\(split.name) batch \(index)")
                XCTAssertEqual(batch.inputShape, [B, 1, train.rows, train.cols])
                XCTAssertEqual(batch.targetShape, [B])
                XCTAssertTrue(batch.lengths.isEmpty)
                var expected = [Float](repeating: 0, count: B * P)
                var targets = [Int32](repeating: -1, count: B)
                for r in 0..<rows {
                    let ex = offset + index * B + r
                    let img = fixture.image(ex)
                    for k in 0..<P {
                        expected[r * P + k] = Self.pixel(img[k], normalize: normalize, mean: mean, std: std)
                    }
                    targets[r] = Int32(fixture.labels[ex])
                }
                XCTAssertEqual(batch.targets, targets, "\(split.name) batch \(index) targets")
                XCTAssertEqual(batch.inputsFloat.count, expected.count)
                for k in 0..<expected.count where abs(batch.inputsFloat[k] - expected[k]) > 1e-6 {
                    XCTFail("\(split.name) batch \(index) element \(k): \(batch.inputsFloat[k]) != \(expected[k])")
                    break
                }
            }
            XCTAssertNil(try ds.read(split, index: nb, batchSize: B))
            XCTAssertNil(try ds.read(split, index: nb + 50, batchSize: B))
        }
    }

    func testEvalBatchesMatchABruteForceDecodeNormalized() throws {
        try writeDataSet(train: train, test: test)
        try checkEvalSplits(try openDataset(), B: 3, normalize: true, mean: 0.2860, std: 0.3530)
        // A hand-checked value: byte 255 -> (1 - 0.2860) / 0.3530 = 2.0226629.
        let ds = try openDataset(["valid_fraction": 0.5])
        try checkEvalSplits(ds, B: 4, normalize: true, mean: 0.2860, std: 0.3530)
        XCTAssertEqual(Self.pixel(255), 2.0226629, accuracy: 1e-6)
        XCTAssertEqual(Self.pixel(0), -0.8101983, accuracy: 1e-6)
    }

    func testEvalBatchesUnnormalizedAndCustomStatistics() throws {
        try writeDataSet(train: train, test: test)
        try checkEvalSplits(try openDataset(["normalize": false]), B: 5, normalize: false, mean: 0, std: 1)
        // MNIST's statistics.
        try checkEvalSplits(
            try openDataset(["mean": 0.1307, "std": 0.3081]), B: 2, normalize: true, mean: 0.1307, std: 0.3081)
        // Unnormalised values are exactly v/255 in [0, 1].
        let batch = try XCTUnwrap(try openDataset(["normalize": false]).read(.test, index: 0, batchSize: 7))
        XCTAssertEqual(batch.inputsFloat[0], Float(Double(test.pixels[0]) / 255))
        XCTAssertTrue(batch.inputsFloat.allSatisfy { $0 >= 0 && $0 <= 1 })
    }

    func testPlainFilesAndGzSuffixFallback() throws {
        // Uncompressed files under the default (.gz) names' stems: found by dropping ".gz".
        try writeDataSet(train: train, test: test, gzipped: false)
        try checkEvalSplits(try openDataset(), B: 4, normalize: true, mean: 0.2860, std: 0.3530)
        // Names without ".gz" when only the .gz files exist: found by adding ".gz".
        let gzDir = tempDir.appendingPathComponent("gz")
        try FileManager.default.createDirectory(at: gzDir, withIntermediateDirectories: true)
        try write(Self.gzip(Self.imageFile(train)), "train-images-idx3-ubyte.gz", in: gzDir)
        try write(Self.gzip(Self.labelFile(train)), "train-labels-idx1-ubyte.gz", in: gzDir)
        try write(Self.gzip(Self.imageFile(test)), "t10k-images-idx3-ubyte.gz", in: gzDir)
        try write(Self.gzip(Self.labelFile(test)), "t10k-labels-idx1-ubyte.gz", in: gzDir)
        let ds = try openDataset([
            "dir": gzDir.path, "train_images": "train-images-idx3-ubyte",
            "train_labels": "train-labels-idx1-ubyte", "test_images": "t10k-images-idx3-ubyte",
            "test_labels": "t10k-labels-idx1-ubyte",
        ])
        try checkEvalSplits(ds, B: 4, normalize: true, mean: 0.2860, std: 0.3530)
        // Absolute file names are used as they are.
        let abs = try openDataset([
            "dir": "/nonexistent", "train_images": gzDir.path + "/train-images-idx3-ubyte.gz",
            "train_labels": gzDir.path + "/train-labels-idx1-ubyte.gz",
            "test_images": gzDir.path + "/t10k-images-idx3-ubyte.gz",
            "test_labels": gzDir.path + "/t10k-labels-idx1-ubyte.gz",
        ])
        XCTAssertEqual(abs.splitSizes, [21, 2, 7])
    }

    func testLargeGzipFileSpanningManyBlocks() throws {
        // 300 images of 28x28 = 235,200 bytes: several stored blocks, several read chunks.
        let big = Self.makeFixture(count: 300, rows: 28, cols: 28, seed: 5)
        let small = Self.makeFixture(count: 3, rows: 28, cols: 28, seed: 6)
        try writeDataSet(train: big, test: small)
        let ds = try openDataset(["normalize": false])
        XCTAssertEqual(ds.sampleShape, [1, 28, 28])
        XCTAssertEqual(ds.splitSizes, [270, 30, 3])
        let last = try XCTUnwrap(ds.read(.valid, index: 2, batchSize: 10))
        XCTAssertEqual(last.rows, 10)
        let img = big.image(299)
        XCTAssertEqual(Array(last.inputsFloat[(9 * 784)..<(10 * 784)]), img.map { Float(Double($0) / 255) })
        XCTAssertEqual(last.targets[9], Int32(big.labels[299]))
    }

    // MARK: train batches: epochs, permutation, seeking

    /// The training example each row of a batch holds (matched by its pixels; normalize off).
    func exampleIndices(_ batch: DatasetInstance.Batch, _ lookup: [[UInt8]: Int]) -> [Int] {
        let P = train.rows * train.cols
        return (0..<batch.rows).map { r in
            let bytes = (0..<P).map { UInt8((batch.inputsFloat[r * P + $0] * 255).rounded()) }
            return lookup[bytes] ?? -1
        }
    }

    func testTrainStreamIsASequenceOfSeededPermutations() throws {
        try writeDataSet(train: train, test: test)
        let seed: UInt64 = 42
        let ds = try openDataset(["normalize": false], seed: seed)
        let nTrain = ds.splitSizes[0]  // 21
        var lookup: [[UInt8]: Int] = [:]
        for i in 0..<train.count { lookup[train.image(i)] = i }
        XCTAssertEqual(lookup.count, train.count, "fixture images must be distinct")
        // 13 batches of 5 = 65 stream positions = 3 epochs of 21 and 2 more.
        let B = 5
        var stream: [Int] = []
        for index in 0..<13 {
            let batch = try XCTUnwrap(ds.read(.train, index: index, batchSize: B))
            XCTAssertEqual(batch.rows, B)
            let ex = exampleIndices(batch, lookup)
            for (r, e) in ex.enumerated() {
                XCTAssertTrue(e >= 0 && e < nTrain, "train batch \(index) row \(r) is not a train-split image (\(e))")
                if e >= 0 { XCTAssertEqual(batch.targets[r], Int32(train.labels[e])) }
            }
            stream += ex
        }
        // Each epoch is a permutation of the train split, and exactly the documented shuffle.
        for e in 0..<3 {
            let epoch = Array(stream[(e * nTrain)..<((e + 1) * nTrain)])
            XCTAssertEqual(epoch.sorted(), Array(0..<nTrain), "epoch \(e) is not a permutation")
            XCTAssertEqual(epoch, Self.permutation(seed: seed, epoch: e, count: nTrain), "epoch \(e)")
        }
        XCTAssertEqual(Array(stream[63..<65]), Array(Self.permutation(seed: seed, epoch: 3, count: nTrain)[0..<2]))
        XCTAssertNotEqual(Array(stream[0..<nTrain]), Array(stream[nTrain..<(2 * nTrain)]), "epochs are reshuffled")
    }

    func testTrainBatchesSeekAndDependOnlyOnStreamPositions() throws {
        try writeDataSet(train: train, test: test)
        let ds = try openDataset(seed: 7)
        let b7 = try XCTUnwrap(ds.read(.train, index: 7, batchSize: 4))
        let b3 = try XCTUnwrap(ds.read(.train, index: 3, batchSize: 4))
        let b7again = try XCTUnwrap(ds.read(.train, index: 7, batchSize: 4))
        XCTAssertEqual(b7.inputsFloat, b7again.inputsFloat)
        XCTAssertEqual(b7.targets, b7again.targets)
        XCTAssertNotEqual(b7.inputsFloat, b3.inputsFloat)
        // A resumed run (fresh instance, same seed) reads the same batch; another seed differs.
        XCTAssertEqual(
            try XCTUnwrap(try openDataset(seed: 7).read(.train, index: 7, batchSize: 4)).inputsFloat, b7.inputsFloat)
        XCTAssertNotEqual(
            try XCTUnwrap(try openDataset(seed: 8).read(.train, index: 7, batchSize: 4)).inputsFloat, b7.inputsFloat)
        // Batch 1 of 8 = batches 2 and 3 of 4 (positions 8..<16), across an epoch boundary too.
        let b8 = try XCTUnwrap(ds.read(.train, index: 1, batchSize: 8))
        let b2 = try XCTUnwrap(ds.read(.train, index: 2, batchSize: 4))
        XCTAssertEqual(b8.inputsFloat, b2.inputsFloat + b3.inputsFloat)
        XCTAssertEqual(b8.targets, b2.targets + b3.targets)
        let b4of5 = try XCTUnwrap(ds.read(.train, index: 4, batchSize: 5))  // positions 20..<25
        let p20 = try XCTUnwrap(ds.read(.train, index: 20, batchSize: 1))
        let p24 = try XCTUnwrap(ds.read(.train, index: 24, batchSize: 1))
        XCTAssertEqual(Array(b4of5.inputsFloat[0..<20]), p20.inputsFloat)
        XCTAssertEqual(Array(b4of5.inputsFloat[80..<100]), p24.inputsFloat)
        // A batch larger than the split wraps into the next epochs; large indices are valid.
        let huge = try XCTUnwrap(ds.read(.train, index: 0, batchSize: 50))
        XCTAssertEqual(huge.rows, 50)
        XCTAssertNotNil(try ds.read(.train, index: 1_000_000_000, batchSize: 4))
    }

    // MARK: errors

    func testMissingFileNamesThePathsAndWhereToGetTheData() throws {
        let dir = tempDir.appendingPathComponent("none").path
        let msg = errorMessage { _ = try openDataset(["dir": dir]) }
        XCTAssertTrue(msg.contains(dir + "/train-images-idx3-ubyte.gz"), msg)
        XCTAssertTrue(msg.contains("also tried " + dir + "/train-images-idx3-ubyte)"), msg)
        XCTAssertTrue(msg.contains("not found"), msg)
        XCTAssertTrue(msg.contains("shared/data/fashion-mnist"), msg)
        XCTAssertTrue(msg.contains("dataset-fashion-mnist"), msg)
        XCTAssertTrue(msg.contains("github.com/zalandoresearch/fashion-mnist"), msg)
        XCTAssertTrue(msg.contains("IO"), msg)
        // Only the test labels missing.
        try writeDataSet(train: train, test: test)
        try FileManager.default.removeItem(atPath: tempDir.appendingPathComponent("t10k-labels-idx1-ubyte.gz").path)
        let msg2 = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg2.contains("test labels file") && msg2.contains("t10k-labels-idx1-ubyte.gz"), msg2)
    }

    func testBadMagicNumbers() throws {
        try writeDataSet(train: train, test: test)
        // The label file named as the image file.
        var msg = errorMessage { _ = try openDataset(["train_images": "train-labels-idx1-ubyte.gz"]) }
        XCTAssertTrue(
            msg.contains("train-labels-idx1-ubyte.gz: bad magic 0x00000801 (expected 0x00000803: an IDX image file)"),
            msg)
        XCTAssertTrue(msg.contains("swapped"), msg)
        msg = errorMessage { _ = try openDataset(["test_labels": "t10k-images-idx3-ubyte.gz"]) }
        XCTAssertTrue(
            msg.contains("t10k-images-idx3-ubyte.gz: bad magic 0x00000803 (expected 0x00000801: an IDX label file)"),
            msg)
        // Not IDX at all.
        try write(Self.gzip(Array("hello, world, not idx".utf8)), "train-images-idx3-ubyte.gz")
        msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("bad magic 0x68656c6c (expected 0x00000803"), msg)
        // An IDX file of another element type (0x0D = float).
        try write(Self.gzip(Self.imageFile(train, magic: 0x0000_0D03)), "train-images-idx3-ubyte.gz")
        msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("bad magic 0x00000d03"), msg)
    }

    func testTruncatedFiles() throws {
        try writeDataSet(train: train, test: test)
        // Image data cut short (a valid gzip stream of too few bytes).
        let full = Self.imageFile(train)
        try write(Self.gzip(Array(full.dropLast(7))), "train-images-idx3-ubyte.gz")
        var msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("train-images-idx3-ubyte.gz: truncated: expected 460 bytes"), msg)
        XCTAssertTrue(msg.contains("has 453"), msg)
        // Header cut short.
        try write(Array(full[0..<10]), "train-images-idx3-ubyte.gz")
        msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("truncated: expected a 16-byte IDX header"), msg)
        // A gzip stream cut in the middle (zlib reports it).
        let gz = Self.gzip(full)
        try write(Array(gz[0..<(gz.count / 2)]), "train-images-idx3-ubyte.gz")
        msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("train-images-idx3-ubyte.gz"), msg)
        XCTAssertTrue(msg.contains("truncated: the gzip stream is cut short (unexpected end of file)"), msg)
        // A damaged gzip file (wrong CRC-32 in the trailer): zlib's message.
        var damaged = gz
        damaged[damaged.count - 8] ^= 0xff
        try write(damaged, "train-images-idx3-ubyte.gz")
        msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("train-images-idx3-ubyte.gz: cannot decompress: incorrect data check"), msg)
        // Plain label file cut short.
        try writeDataSet(train: train, test: test)
        try write(Array(Self.labelFile(test).dropLast(1)), "t10k-labels-idx1-ubyte.gz")
        msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("t10k-labels-idx1-ubyte.gz: truncated: expected 7 bytes"), msg)
        // Trailing bytes after the declared data.
        try write(Self.gzip(full + [1, 2, 3]), "train-images-idx3-ubyte.gz")
        msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("trailing data"), msg)
    }

    func testCountsDimensionsAndLabelsAreChecked() throws {
        try writeDataSet(train: train, test: test)
        // Label count != image count.
        var fewer = train
        fewer.labels.removeLast()
        try write(Self.gzip(Self.labelFile(fewer)), "train-labels-idx1-ubyte.gz")
        var msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("train-labels-idx1-ubyte.gz: 22 labels but") && msg.contains("holds 23 images"), msg)
        // A label >= n_classes.
        try writeDataSet(train: train, test: test)
        var bad = test
        bad.labels[4] = 10
        try write(Self.gzip(Self.labelFile(bad)), "t10k-labels-idx1-ubyte.gz")
        msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("t10k-labels-idx1-ubyte.gz: label 10 of item 4 is outside [0, 10)"), msg)
        // Same with a smaller n_classes.
        try writeDataSet(train: train, test: test)
        let maxLabel = Int(train.labels.max()!)
        msg = errorMessage { _ = try openDataset(["n_classes": maxLabel]) }
        XCTAssertTrue(msg.contains("label \(maxLabel) of item \(train.labels.firstIndex(of: UInt8(maxLabel))!)"), msg)
        // Test images of another size than the training images.
        let other = Self.makeFixture(count: 7, rows: 5, cols: 4, seed: 3)
        try write(Self.gzip(Self.imageFile(other)), "t10k-images-idx3-ubyte.gz")
        msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("test images are 5x4 but the training images") && msg.contains("4x5"), msg)
        // A zero dimension.
        var header = Self.imageFile(train)
        header[12..<16] = [0, 0, 0, 0]
        try write(Self.gzip(header), "t10k-images-idx3-ubyte.gz")
        msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("dimension 2 of the IDX header is 0"), msg)
    }

    func testBadHyperparameters() throws {
        try writeDataSet(train: train, test: test)
        var msg = errorMessage { _ = try openDataset(["std": 0.0]) }
        XCTAssertTrue(msg.contains("std") && msg.contains("> 0"), msg)
        msg = errorMessage { _ = try openDataset(["valid_fraction": 0.6]) }
        XCTAssertTrue(msg.contains("valid_fraction"), msg)
        msg = errorMessage { _ = try openDataset(["n_classes": 0]) }
        XCTAssertTrue(msg.contains("n_classes"), msg)
        msg = errorMessage { _ = try openDataset(["train_images": ""]) }
        XCTAssertTrue(msg.contains("train_images"), msg)
        // One image and valid_fraction 0.5: floor(0.5) = 0 held out, so still 1 to train on.
        let one = Self.makeFixture(count: 1, seed: 9)
        try writeDataSet(train: one, test: test)
        XCTAssertEqual(try openDataset(["valid_fraction": 0.5]).splitSizes, [1, 0, 7])
    }

    // MARK: real data

    func testRealFashionMNIST() throws {
        guard let root = sharedDataDirectory() else { throw XCTSkip("../shared/data not present") }
        let dir = root + "/fashion-mnist"
        guard FileManager.default.fileExists(atPath: dir + "/train-images-idx3-ubyte.gz") else {
            throw XCTSkip("\(dir) not present")
        }
        let seed: UInt64 = 3
        let ds = try openDataset(["dir": dir, "normalize": false], seed: seed)
        XCTAssertEqual(ds.sampleShape, [1, 28, 28])
        XCTAssertEqual(ds.nClasses, 10)
        XCTAssertEqual(ds.splitSizes, [54_000, 6_000, 10_000])
        XCTAssertEqual(try ds.numBatches(.valid, batchSize: 128), 47)
        XCTAssertEqual(try ds.numBatches(.test, batchSize: 128), 79)
        func pixelSum(_ b: DatasetInstance.Batch, row: Int) -> Int {
            (0..<784).reduce(0) { $0 + Int((b.inputsFloat[row * 784 + $1] * 255).rounded()) }
        }
        // The first training image (label 9, an ankle boot; pixel sum 76,247) sits at the
        // position of 0 in epoch 0's permutation.
        let perm = Self.permutation(seed: seed, epoch: 0, count: 54_000)
        let q = try XCTUnwrap(perm.firstIndex(of: 0))
        let B = 32
        let batch = try XCTUnwrap(ds.read(.train, index: q / B, batchSize: B))
        XCTAssertEqual(batch.targets[q % B], 9)
        XCTAssertEqual(pixelSum(batch, row: q % B), 76_247)
        // The valid split starts at training image 54,000 (label 7, sum 17,219); the test split
        // at the first test image (label 9, sum 33,456).
        let valid = try XCTUnwrap(ds.read(.valid, index: 0, batchSize: 4))
        XCTAssertEqual(valid.targets[0], 7)
        XCTAssertEqual(pixelSum(valid, row: 0), 17_219)
        let testBatch = try XCTUnwrap(ds.read(.test, index: 0, batchSize: 4))
        XCTAssertEqual(testBatch.targets[0], 9)
        XCTAssertEqual(pixelSum(testBatch, row: 0), 33_456)
        // The last test batch of 128 holds 10,000 - 78·128 = 16 images.
        XCTAssertEqual(try XCTUnwrap(ds.read(.test, index: 78, batchSize: 128)).rows, 16)
        // Normalised with the default statistics, the test set has mean ~0 and std ~1.
        let norm = try openDataset(["dir": dir])
        var sum = 0.0, sumSq = 0.0, n = 0.0
        let testBatches = try norm.numBatches(.test, batchSize: 1000)
        for index in 0..<testBatches {
            let b = try XCTUnwrap(norm.read(.test, index: index, batchSize: 1000))
            for v in b.inputsFloat { sum += Double(v); sumSq += Double(v) * Double(v) }
            n += Double(b.inputsFloat.count)
        }
        let mean = sum / n, std = (sumSq / n - mean * mean).squareRoot()
        XCTAssertEqual(mean, 0, accuracy: 0.02)
        XCTAssertEqual(std, 1, accuracy: 0.02)
        // An ordered pass over the valid split reads all 6,000 images, labels in range.
        var validCount = 0
        let validBatches = try ds.numBatches(.valid, batchSize: 500)
        for index in 0..<validBatches {
            let b = try XCTUnwrap(ds.read(.valid, index: index, batchSize: 500))
            validCount += b.rows
            XCTAssertTrue(b.targets.allSatisfy { $0 >= 0 && $0 < 10 })
        }
        XCTAssertEqual(validCount, 6_000)
    }

    func testDefaultDirResolvesUnderTheDataRoot() throws {
        guard let root = sharedDataDirectory() else { throw XCTSkip("../shared/data not present") }
        guard FileManager.default.fileExists(atPath: root + "/fashion-mnist/train-images-idx3-ubyte.gz") else {
            throw XCTSkip("fashion-mnist not present")
        }
        // No hyperparameters: dir = "$DATA/fashion-mnist".
        let core = try makeInstance(try openPlugin("DatasetIDX"), dims: ModelDims(dataRoot: root))
        XCTAssertEqual(try DatasetInstance(core).splitSizes, [54_000, 6_000, 10_000])
    }
}

/// The framework's generic plugin check on a fixture, for the default and non-default modes.
final class DatasetIDXCheckerTests: XCTestCase {
    func testPluginCheckerPasses() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vqmoe-idx-check-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let train = DatasetIDXTests.makeFixture(count: 30, seed: 1),
            test = DatasetIDXTests.makeFixture(count: 9, seed: 2)
        let files: [(String, [UInt8])] = [
            ("train-images-idx3-ubyte.gz", DatasetIDXTests.gzip(DatasetIDXTests.imageFile(train))),
            ("train-labels-idx1-ubyte.gz", DatasetIDXTests.gzip(DatasetIDXTests.labelFile(train))),
            ("t10k-images-idx3-ubyte.gz", DatasetIDXTests.gzip(DatasetIDXTests.imageFile(test))),
            ("t10k-labels-idx1-ubyte.gz", DatasetIDXTests.gzip(DatasetIDXTests.labelFile(test))),
        ]
        for (name, bytes) in files { try Data(bytes).write(to: dir.appendingPathComponent(name)) }
        for extra: [String: Any] in [
            [:], ["normalize": false], ["valid_fraction": 0.0], ["valid_fraction": 0.5, "mean": 0.1307, "std": 0.3081],
        ] {
            var hp = extra
            hp["dir"] = dir.path
            let results = PluginChecker(library: try openPlugin("DatasetIDX"), hyperparameters: hp).run()
            XCTAssertTrue(
                results.allSatisfy(\.passed), "\(extra): " + results.map(\.description).joined(separator: "\n"))
            XCTAssertGreaterThanOrEqual(results.count, 10)
        }
    }
}
