import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `cifar` dataset plugin (CIFAR-10/100 binary version) on synthetic batch files written
/// in the exact record format: plane order, label bytes, splits across files, exact pixel
/// values, epoch permutations, seeking, padded eval batches, every error, and the checker.
final class DatasetCIFARTests: XCTestCase {
    var tempDir: URL!

    override func setUpWithError() throws {
        tempDir = FileManager.default.temporaryDirectory.appendingPathComponent("vqmoe-cifar-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tempDir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: tempDir)
    }

    // MARK: fixtures

    /// One record: coarse label (CIFAR-100 only), fine label, 3072 pixel bytes (R, G, B planes).
    struct Record {
        var coarse: UInt8
        var fine: UInt8
        var pixels: [UInt8]
        func bytes(cifar100: Bool) -> [UInt8] { (cifar100 ? [coarse, fine] : [fine]) + pixels }
    }

    /// `count` records of LCG bytes (distinct images), labels in range for the variant.
    static func makeRecords(_ count: Int, cifar100: Bool, seed: UInt64) -> [Record] {
        var x = seed
        func next() -> UInt64 {
            x = x &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return x >> 33
        }
        return (0..<count).map { _ in
            let fine = UInt8(next() % (cifar100 ? 100 : 10))
            let coarse = UInt8(next() % 20)
            return Record(
                coarse: cifar100 ? coarse : 0, fine: fine,
                pixels: (0..<3072).map { _ in UInt8(truncatingIfNeeded: next()) })
        }
    }

    static func fileBytes(_ records: [Record], cifar100: Bool) -> [UInt8] {
        records.flatMap { $0.bytes(cifar100: cifar100) }
    }

    /// CIFAR-10 fixture: data_batch_1..5.bin with 3, 2, 4, 3, 2 records, test_batch.bin with 5.
    static let cifar10Sizes = [3, 2, 4, 3, 2]

    @discardableResult
    func writeCIFAR10(in dir: URL? = nil, seed: UInt64 = 1) throws -> (train: [Record], test: [Record]) {
        let d = dir ?? tempDir!
        var train: [Record] = []
        for (i, n) in Self.cifar10Sizes.enumerated() {
            let recs = Self.makeRecords(n, cifar100: false, seed: seed &+ UInt64(i) &* 101)
            try Data(Self.fileBytes(recs, cifar100: false)).write(
                to: d.appendingPathComponent("data_batch_\(i + 1).bin"))
            train += recs
        }
        let test = Self.makeRecords(5, cifar100: false, seed: seed &+ 999)
        try Data(Self.fileBytes(test, cifar100: false)).write(to: d.appendingPathComponent("test_batch.bin"))
        return (train, test)
    }

    /// CIFAR-100 fixture: train.bin with 12 records, test.bin with 6.
    @discardableResult
    func writeCIFAR100(in dir: URL? = nil, seed: UInt64 = 2) throws -> (train: [Record], test: [Record]) {
        let d = dir ?? tempDir!
        let train = Self.makeRecords(12, cifar100: true, seed: seed)
        let test = Self.makeRecords(6, cifar100: true, seed: seed &+ 7)
        try Data(Self.fileBytes(train, cifar100: true)).write(to: d.appendingPathComponent("train.bin"))
        try Data(Self.fileBytes(test, cifar100: true)).write(to: d.appendingPathComponent("test.bin"))
        return (train, test)
    }

    func openDataset(_ hp: [String: Any] = [:], seed: UInt64 = 1) throws -> DatasetInstance {
        var values = hp
        if values["dir"] == nil { values["dir"] = tempDir.path }
        let core = try makeInstance(
            try openPlugin("DatasetCIFAR"), dims: ModelDims(), hyperparameters: values, seed: seed)
        return try DatasetInstance(core)
    }

    func errorMessage(_ body: () throws -> Void) -> String {
        do { try body() } catch let e as VQMoEError { return e.message } catch { return "\(error)" }
        XCTFail("expected an error")
        return ""
    }

    static let mean10 = [0.4914, 0.4822, 0.4465], std10 = [0.2470, 0.2435, 0.2616]
    static let mean100 = [0.5071, 0.4865, 0.4409], std100 = [0.2673, 0.2564, 0.2762]

    /// Brute-force decode of a record into (3,32,32) floats: channel c, row h, column w is
    /// pixel byte c·1024 + h·32 + w; v/255, then per-channel (x − mean_c)/std_c.
    static func decode(_ rec: Record, normalize: Bool, mean: [Double], std: [Double]) -> [Float] {
        var out = [Float](repeating: 0, count: 3072)
        for c in 0..<3 {
            for h in 0..<32 {
                for w in 0..<32 {
                    let x = Double(rec.pixels[c * 1024 + h * 32 + w]) / 255.0
                    out[(c * 32 + h) * 32 + w] = Float(normalize ? (x - mean[c]) / std[c] : x)
                }
            }
        }
        return out
    }

    /// Every eval batch equals the brute-force decode, in order, padded at the end.
    func checkEvalSplits(
        _ ds: DatasetInstance, train: [Record], test: [Record], B: Int, normalize: Bool,
        cifar100: Bool, coarse: Bool = false
    ) throws {
        let (mean, std) = cifar100 ? (Self.mean100, Self.std100) : (Self.mean10, Self.std10)
        let nTrain = ds.splitSizes[0]
        for (split, records) in [(Split.valid, Array(train[nTrain...])), (Split.test, test)] {
            let nb = try ds.numBatches(split, batchSize: B)
            XCTAssertEqual(nb, (records.count + B - 1) / B)
            for index in 0..<nb {
                let batch = try XCTUnwrap(ds.read(split, index: index, batchSize: B))
                let rows = min(B, records.count - index * B)
                XCTAssertEqual(batch.rows, rows)
                XCTAssertEqual(batch.inputShape, [B, 3, 32, 32])
                var expected = [Float](repeating: 0, count: B * 3072)
                var targets = [Int32](repeating: -1, count: B)
                for r in 0..<rows {
                    let rec = records[index * B + r]
                    expected.replaceSubrange(
                        (r * 3072)..<((r + 1) * 3072),
                        with: Self.decode(rec, normalize: normalize, mean: mean, std: std))
                    targets[r] = Int32(coarse ? rec.coarse : rec.fine)
                }
                XCTAssertEqual(batch.targets, targets, "\(split.name) batch \(index) targets")
                for k in 0..<expected.count where abs(batch.inputsFloat[k] - expected[k]) > 1e-6 {
                    XCTFail("\(split.name) batch \(index) element \(k): \(batch.inputsFloat[k]) != \(expected[k])")
                    break
                }
            }
            XCTAssertNil(try ds.read(split, index: nb, batchSize: B))
        }
    }

    // MARK: decoding

    func testPlaneOrderAndLabelByte() throws {
        // One record whose pixel (c, h, w) = 50c + 2h + w % 7, label 7 (CIFAR-10).
        var pixels = [UInt8](repeating: 0, count: 3072)
        for c in 0..<3 {
            for h in 0..<32 { for w in 0..<32 { pixels[c * 1024 + h * 32 + w] = UInt8(50 * c + 2 * h + w % 7) } }
        }
        let rec = Record(coarse: 0, fine: 7, pixels: pixels)
        for i in 1...5 {
            try Data(rec.bytes(cifar100: false)).write(to: tempDir.appendingPathComponent("data_batch_\(i).bin"))
        }
        try Data(rec.bytes(cifar100: false)).write(to: tempDir.appendingPathComponent("test_batch.bin"))
        let ds = try openDataset(["normalize": false])
        let b = try XCTUnwrap(ds.read(.test, index: 0, batchSize: 2))
        XCTAssertEqual(b.rows, 1)
        XCTAssertEqual(b.targets, [7, -1])
        for (c, h, w) in [(0, 0, 0), (0, 3, 5), (1, 0, 0), (1, 31, 31), (2, 10, 20)] {
            XCTAssertEqual(
                b.inputsFloat[(c * 32 + h) * 32 + w], Float(Double(50 * c + 2 * h + w % 7) / 255), "(\(c),\(h),\(w))")
        }
        XCTAssertTrue(b.inputsFloat[3072...].allSatisfy { $0 == 0 }, "padding row")
        // Normalised: channel c uses CIFAR-10's mean_c / std_c.
        let n = try XCTUnwrap(try openDataset().read(.test, index: 0, batchSize: 1))
        XCTAssertEqual(n.inputsFloat[0], Float((0.0 - 0.4914) / 0.2470), accuracy: 1e-6)
        XCTAssertEqual(n.inputsFloat[1024], Float((50.0 / 255 - 0.4822) / 0.2435), accuracy: 1e-6)
        XCTAssertEqual(n.inputsFloat[2048], Float((100.0 / 255 - 0.4465) / 0.2616), accuracy: 1e-6)
    }

    func testCIFAR100LabelBytesCoarseThenFine() throws {
        // Records with (coarse, fine) = (3, 57) and (19, 99).
        let recs = [
            Record(coarse: 3, fine: 57, pixels: [UInt8](repeating: 9, count: 3072)),
            Record(coarse: 19, fine: 99, pixels: [UInt8](repeating: 200, count: 3072)),
        ]
        try Data(Self.fileBytes(recs, cifar100: true)).write(to: tempDir.appendingPathComponent("train.bin"))
        try Data(Self.fileBytes(recs, cifar100: true)).write(to: tempDir.appendingPathComponent("test.bin"))
        let fine = try openDataset(["variant": "cifar100", "normalize": false])
        XCTAssertEqual(fine.nClasses, 100)
        let fb = try XCTUnwrap(fine.read(.test, index: 0, batchSize: 2))
        XCTAssertEqual(fb.targets, [57, 99])
        // The label bytes are not pixels: the first pixel is 9/255, not a label.
        XCTAssertEqual(fb.inputsFloat[0], Float(9.0 / 255))
        XCTAssertEqual(fb.inputsFloat[3072 + 3071], Float(200.0 / 255))
        let coarse = try openDataset(["variant": "cifar100", "label": "coarse"])
        XCTAssertEqual(coarse.nClasses, 20)
        XCTAssertEqual(try XCTUnwrap(coarse.read(.test, index: 0, batchSize: 2)).targets, [3, 19])
    }

    func testInfoAndSplitsAcrossBatchFiles() throws {
        try writeCIFAR10()
        let ds = try openDataset()
        XCTAssertEqual(ds.task, VQMOE_TASK_CLASSIFY_IMAGE)
        XCTAssertEqual(ds.nClasses, 10)
        XCTAssertEqual(ds.sampleShape, [3, 32, 32])
        // 14 training records: valid = floor(1.4) = 1.
        XCTAssertEqual(ds.splitSizes, [13, 1, 5])
        XCTAssertEqual(try openDataset(["valid_fraction": 0.25]).splitSizes, [11, 3, 5])
        XCTAssertEqual(try openDataset(["valid_fraction": 0.5]).splitSizes, [7, 7, 5])
        XCTAssertEqual(try openDataset(["valid_fraction": 0.0]).splitSizes, [14, 0, 5])
        XCTAssertEqual(try openDataset(["valid_fraction": 0.0]).numBatches(.valid, batchSize: 4), 0)
        XCTAssertEqual(try ds.numBatches(.train, batchSize: 4), Int.max)
        XCTAssertTrue(ds.core.buffers.isEmpty)
        try writeCIFAR100()
        let c100 = try openDataset(["variant": "cifar100"])
        XCTAssertEqual(c100.splitSizes, [11, 1, 6])
        XCTAssertEqual(c100.nClasses, 100)
    }

    // MARK: eval batches

    func testCIFAR10EvalBatchesMatchABruteForceDecode() throws {
        let (train, test) = try writeCIFAR10()
        // The valid split = the last 5 records of data_batch_1..5 in order (batch 4's last
        // 3, then batch 5's 2).
        try checkEvalSplits(
            try openDataset(["valid_fraction": 0.4]), train: train, test: test, B: 2, normalize: true, cifar100: false)
        try checkEvalSplits(
            try openDataset(["valid_fraction": 0.4, "normalize": false]), train: train, test: test, B: 3,
            normalize: false, cifar100: false)
        try checkEvalSplits(try openDataset(), train: train, test: test, B: 4, normalize: true, cifar100: false)
    }

    func testCIFAR100EvalBatchesMatchABruteForceDecode() throws {
        let (train, test) = try writeCIFAR100()
        try checkEvalSplits(
            try openDataset(["variant": "cifar100", "valid_fraction": 0.3]), train: train, test: test, B: 2,
            normalize: true, cifar100: true)
        try checkEvalSplits(
            try openDataset(["variant": "cifar100", "label": "coarse", "valid_fraction": 0.3]), train: train,
            test: test, B: 4, normalize: true, cifar100: true, coarse: true)
        try checkEvalSplits(
            try openDataset(["variant": "cifar100", "normalize": false]), train: train, test: test, B: 5,
            normalize: false, cifar100: true)
    }

    // MARK: train batches

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

    func testTrainStreamIsASequenceOfSeededPermutations() throws {
        let (train, _) = try writeCIFAR10()
        let seed: UInt64 = 9
        let ds = try openDataset(["normalize": false, "valid_fraction": 0.25], seed: seed)
        let nTrain = ds.splitSizes[0]  // 11
        var lookup: [[UInt8]: Int] = [:]
        for (i, r) in train.enumerated() { lookup[r.pixels] = i }
        XCTAssertEqual(lookup.count, train.count)
        let B = 4
        var stream: [Int] = []
        for index in 0..<9 {  // 36 positions: 3 epochs of 11 and 3 more
            let batch = try XCTUnwrap(ds.read(.train, index: index, batchSize: B))
            XCTAssertEqual(batch.rows, B)
            for r in 0..<B {
                let bytes = (0..<3072).map { UInt8((batch.inputsFloat[r * 3072 + $0] * 255).rounded()) }
                let e = lookup[bytes] ?? -1
                XCTAssertTrue(e >= 0 && e < nTrain, "train batch \(index) row \(r) is not a train-split record (\(e))")
                if e >= 0 { XCTAssertEqual(batch.targets[r], Int32(train[e].fine)) }
                stream.append(e)
            }
        }
        for e in 0..<3 {
            XCTAssertEqual(
                Array(stream[(e * nTrain)..<((e + 1) * nTrain)]), Self.permutation(seed: seed, epoch: e, count: nTrain),
                "epoch \(e)")
        }
        XCTAssertEqual(Array(stream[33..<36]), Array(Self.permutation(seed: seed, epoch: 3, count: nTrain)[0..<3]))
    }

    func testTrainBatchesSeek() throws {
        try writeCIFAR10()
        let ds = try openDataset(seed: 5)
        let b5 = try XCTUnwrap(ds.read(.train, index: 5, batchSize: 3))
        let b2 = try XCTUnwrap(ds.read(.train, index: 2, batchSize: 3))
        XCTAssertEqual(try XCTUnwrap(ds.read(.train, index: 5, batchSize: 3)).inputsFloat, b5.inputsFloat)
        XCTAssertNotEqual(b5.inputsFloat, b2.inputsFloat)
        XCTAssertEqual(try XCTUnwrap(try openDataset(seed: 5).read(.train, index: 5, batchSize: 3)).targets, b5.targets)
        XCTAssertEqual(
            try XCTUnwrap(try openDataset(seed: 5).read(.train, index: 5, batchSize: 3)).inputsFloat, b5.inputsFloat)
        XCTAssertNotEqual(
            try XCTUnwrap(try openDataset(seed: 6).read(.train, index: 5, batchSize: 3)).inputsFloat, b5.inputsFloat)
        // Batch 2 of 6 = batches 4 and 5 of 3 (positions 12..<18, across the epoch boundary at 13).
        let b2of6 = try XCTUnwrap(ds.read(.train, index: 2, batchSize: 6))
        let b4 = try XCTUnwrap(ds.read(.train, index: 4, batchSize: 3))
        XCTAssertEqual(b2of6.inputsFloat, b4.inputsFloat + b5.inputsFloat)
        XCTAssertEqual(b2of6.targets, b4.targets + b5.targets)
        XCTAssertNotNil(try ds.read(.train, index: 123_456_789, batchSize: 2))
    }

    // MARK: errors

    func testMissingFilesSayWhereToGetTheBinaryVersion() throws {
        let dir = tempDir.appendingPathComponent("none").path
        var msg = errorMessage { _ = try openDataset(["dir": dir]) }
        XCTAssertTrue(msg.contains(dir + "/data_batch_1.bin not found"), msg)
        XCTAssertTrue(msg.contains("https://www.cs.toronto.edu/~kriz/cifar.html"), msg)
        XCTAssertTrue(msg.contains("binary version"), msg)
        XCTAssertTrue(msg.contains("cifar-10-batches-bin"), msg)
        XCTAssertTrue(msg.contains("IO"), msg)
        // One batch file missing.
        try writeCIFAR10()
        try FileManager.default.removeItem(at: tempDir.appendingPathComponent("data_batch_3.bin"))
        msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("data_batch_3.bin not found"), msg)
        // The Python version present instead: said so.
        try Data([1, 2, 3]).write(to: tempDir.appendingPathComponent("data_batch_3"))
        msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("Python (pickle) version"), msg)
        // CIFAR-100 files missing: the CIFAR-100 archive and folder are named.
        msg = errorMessage { _ = try openDataset(["variant": "cifar100"]) }
        XCTAssertTrue(msg.contains("/train.bin not found") && msg.contains("cifar-100-binary"), msg)
    }

    func testFileSizeMustBeAMultipleOfTheRecordSize() throws {
        try writeCIFAR10()
        let url = tempDir.appendingPathComponent("data_batch_2.bin")
        var bytes = [UInt8](try Data(contentsOf: url))
        bytes.removeLast(100)
        try Data(bytes).write(to: url)
        var msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(
            msg.contains(
                "data_batch_2.bin: size \(2 * 3073 - 100) bytes is not a multiple of the CIFAR-10 record size 3073"),
            msg)
        // A CIFAR-100 file read as CIFAR-10: the hint names the variant.
        try writeCIFAR10()
        try Data(Self.fileBytes(Self.makeRecords(3, cifar100: true, seed: 4), cifar100: true)).write(
            to: tempDir.appendingPathComponent("test_batch.bin"))
        msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("test_batch.bin: size 9222 bytes") && msg.contains("variant = cifar100"), msg)
        // Empty file.
        try Data().write(to: tempDir.appendingPathComponent("test_batch.bin"))
        msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(msg.contains("test_batch.bin is empty"), msg)
        // CIFAR-100 with a truncated train.bin.
        try writeCIFAR100()
        let t = tempDir.appendingPathComponent("train.bin")
        try Data([UInt8](try Data(contentsOf: t)).dropLast(1)).write(to: t)
        msg = errorMessage { _ = try openDataset(["variant": "cifar100"]) }
        XCTAssertTrue(
            msg.contains("train.bin: size \(12 * 3074 - 1) bytes is not a multiple of the CIFAR-100 record size 3074"),
            msg)
    }

    func testLabelsOutOfRange() throws {
        var (train, test) = try writeCIFAR10()
        test[3].fine = 10
        try Data(Self.fileBytes(test, cifar100: false)).write(to: tempDir.appendingPathComponent("test_batch.bin"))
        var msg = errorMessage { _ = try openDataset() }
        XCTAssertTrue(
            msg.contains("test_batch.bin: record 3 (byte offset \(3 * 3073)): label 10 is outside [0, 10)"), msg)
        (train, test) = try writeCIFAR100()
        train[5].coarse = 20
        try Data(Self.fileBytes(train, cifar100: true)).write(to: tempDir.appendingPathComponent("train.bin"))
        msg = errorMessage { _ = try openDataset(["variant": "cifar100"]) }
        XCTAssertTrue(
            msg.contains("train.bin: record 5 (byte offset \(5 * 3074)): coarse label 20 is outside [0, 20)"), msg)
        train[5].coarse = 1
        train[7].fine = 100
        try Data(Self.fileBytes(train, cifar100: true)).write(to: tempDir.appendingPathComponent("train.bin"))
        msg = errorMessage { _ = try openDataset(["variant": "cifar100", "label": "coarse"]) }
        XCTAssertTrue(
            msg.contains("train.bin: record 7 (byte offset \(7 * 3074 + 1)): fine label 100 is outside [0, 100)"), msg)
    }

    func testBadHyperparameters() throws {
        try writeCIFAR10()
        var msg = errorMessage { _ = try openDataset(["label": "coarse"]) }
        XCTAssertTrue(msg.contains("coarse needs variant = cifar100"), msg)
        msg = errorMessage { _ = try openDataset(["variant": "cifar1000"]) }
        XCTAssertTrue(msg.contains("variant") && msg.contains("cifar1000"), msg)
        msg = errorMessage { _ = try openDataset(["valid_fraction": 0.75]) }
        XCTAssertTrue(msg.contains("valid_fraction"), msg)
    }
}

/// The framework's generic plugin check on synthetic batch files, every mode.
final class DatasetCIFARCheckerTests: XCTestCase {
    func testPluginCheckerPasses() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "vqmoe-cifar-check-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        for (i, n) in DatasetCIFARTests.cifar10Sizes.enumerated() {
            let recs = DatasetCIFARTests.makeRecords(n, cifar100: false, seed: UInt64(i + 1))
            try Data(DatasetCIFARTests.fileBytes(recs, cifar100: false)).write(
                to: dir.appendingPathComponent("data_batch_\(i + 1).bin"))
        }
        try Data(
            DatasetCIFARTests.fileBytes(DatasetCIFARTests.makeRecords(5, cifar100: false, seed: 50), cifar100: false)
        )
        .write(to: dir.appendingPathComponent("test_batch.bin"))
        try Data(
            DatasetCIFARTests.fileBytes(DatasetCIFARTests.makeRecords(12, cifar100: true, seed: 60), cifar100: true)
        )
        .write(to: dir.appendingPathComponent("train.bin"))
        try Data(
            DatasetCIFARTests.fileBytes(DatasetCIFARTests.makeRecords(6, cifar100: true, seed: 70), cifar100: true)
        )
        .write(to: dir.appendingPathComponent("test.bin"))
        let modes: [[String: Any]] = [
            [:], ["normalize": false], ["valid_fraction": 0.0], ["variant": "cifar100"],
            ["variant": "cifar100", "label": "coarse", "valid_fraction": 0.5],
        ]
        for extra in modes {
            var hp = extra
            hp["dir"] = dir.path
            let results = PluginChecker(library: try openPlugin("DatasetCIFAR"), hyperparameters: hp).run()
            XCTAssertTrue(
                results.allSatisfy(\.passed), "\(extra): " + results.map(\.description).joined(separator: "\n"))
            XCTAssertGreaterThanOrEqual(results.count, 10)
        }
    }
}
