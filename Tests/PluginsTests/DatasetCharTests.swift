import Foundation
import VQMoE
import XCTest

/// The `char` dataset plugin: splits, train windows, ordered eval windows, seeking, errors.
final class DatasetCharTests: XCTestCase {
    var tempDir: URL!

    override func setUpWithError() throws {
        tempDir = FileManager.default.temporaryDirectory.appendingPathComponent("vqmoe-char-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tempDir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: tempDir)
    }

    /// Known, non-periodic bytes (an LCG), so a window pins down its start.
    func fixtureBytes(_ n: Int, seed: UInt64 = 12345) -> [UInt8] {
        var x = seed
        return (0..<n).map { _ in
            x = x &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
            return UInt8(truncatingIfNeeded: x >> 33)
        }
    }

    /// Write `bytes` to a fresh file in the temp dir and return its path.
    func writeFixture(_ bytes: [UInt8], name: String = "corpus.bin") throws -> String {
        let url = tempDir.appendingPathComponent(name)
        try Data(bytes).write(to: url)
        return url.path
    }

    func openDataset(
        path: String, seqLen: Int, hp: [String: Any] = [:], modelSeqLen: Int = 0,
        seed: UInt64 = 1
    ) throws -> DatasetInstance {
        let lib = try openPlugin("DatasetChar")
        var values = hp
        values["path"] = path
        if seqLen > 0 { values["seq_len"] = seqLen }
        let core = try makeInstance(lib, dims: ModelDims(seqLen: modelSeqLen), hyperparameters: values, seed: seed)
        return try DatasetInstance(core)
    }

    /// The error message of a throwing expression ("" when it did not throw).
    func errorMessage(_ body: () throws -> Void) -> String {
        do { try body() } catch let e as VQMoEError { return e.message } catch { return "\(error)" }
        XCTFail("expected an error")
        return ""
    }

    /// Expected (inputs, targets, rows) of ordered eval batch `index` over `split` bytes.
    func expectedEval(_ split: [UInt8], T: Int, B: Int, index: Int) -> ([Int32], [Int32], Int) {
        var inputs = [Int32](repeating: 0, count: B * T)
        var targets = [Int32](repeating: -1, count: B * T)
        let windows = split.count >= 2 ? (split.count - 1 + T - 1) / T : 0
        let rows = min(B, windows - index * B)
        for r in 0..<max(rows, 0) {
            let w = index * B + r
            for t in 0..<T {
                let p = w * T + t
                if p + 1 < split.count {
                    inputs[r * T + t] = Int32(split[p])
                    targets[r * T + t] = Int32(split[p + 1])
                }
            }
        }
        return (inputs, targets, rows)
    }

    /// x == file[s ..< s+T] and y == file[s+1 ... s+T].
    func isWindow(_ bytes: [UInt8], start s: Int, _ x: [Int32], _ y: [Int32]) -> Bool {
        for t in 0..<x.count {
            if Int32(bytes[s + t]) != x[t] || Int32(bytes[s + t + 1]) != y[t] { return false }
        }
        return true
    }

    // MARK: info and splits

    func testInfoAndSplitSizes() throws {
        let path = try writeFixture(fixtureBytes(1000))
        let ds = try openDataset(path: path, seqLen: 16)
        XCTAssertTrue(ds.isLM)
        XCTAssertEqual(ds.vocabSize, 256)
        XCTAssertEqual(ds.nClasses, 0)
        XCTAssertEqual(ds.sampleShape, [16])
        XCTAssertEqual(ds.splitSizes, [900, 50, 50])
        XCTAssertEqual(try ds.numBatches(.train, batchSize: 4), Int.max)
        // Uneven sizes: floor of the cumulative fractions, the test split takes the rest.
        let ds2 = try openDataset(
            path: path, seqLen: 8,
            hp: ["train_fraction": 0.8, "valid_fraction": 0.1])
        XCTAssertEqual(ds2.splitSizes, [800, 100, 100])
        let odd = try writeFixture(fixtureBytes(1003), name: "odd.bin")
        let ds3 = try openDataset(path: odd, seqLen: 8, hp: ["train_fraction": 0.8, "valid_fraction": 0.1])
        XCTAssertEqual(ds3.splitSizes, [802, 100, 101])
        XCTAssertEqual(ds3.splitSizes.reduce(0, +), 1003)
    }

    func testSeqLenFromModelAndHyperparameter() throws {
        let path = try writeFixture(fixtureBytes(500))
        XCTAssertEqual(try openDataset(path: path, seqLen: 0, modelSeqLen: 24).sampleShape, [24])
        XCTAssertEqual(try openDataset(path: path, seqLen: 12, modelSeqLen: 24).sampleShape, [12])
        let msg = errorMessage { _ = try openDataset(path: path, seqLen: 0, modelSeqLen: 0) }
        XCTAssertTrue(msg.contains("seq_len"), msg)
    }

    func testZeroSizeTestSplitHasNoBatches() throws {
        // nanoGPT's tiny Shakespeare split: 90/10/0.
        let path = try writeFixture(fixtureBytes(1000))
        let ds = try openDataset(path: path, seqLen: 16, hp: ["train_fraction": 0.9, "valid_fraction": 0.1])
        XCTAssertEqual(ds.splitSizes, [900, 100, 0])
        XCTAssertEqual(try ds.numBatches(.test, batchSize: 4), 0)
        XCTAssertNil(try ds.read(.test, index: 0, batchSize: 4))
    }

    // MARK: train batches

    func testTrainWindowsAreFileBytesAtSomeStart() throws {
        let bytes = fixtureBytes(1000)
        let path = try writeFixture(bytes)
        let T = 16, B = 8
        let ds = try openDataset(path: path, seqLen: T)
        let trainLen = ds.splitSizes[0]
        var starts = Set<Int>()
        for index in 0..<6 {
            let batch = try XCTUnwrap(ds.read(.train, index: index, batchSize: B))
            XCTAssertEqual(batch.rows, B)
            XCTAssertEqual(batch.inputShape, [B, T])
            XCTAssertEqual(batch.targetShape, [B, T])
            for r in 0..<B {
                let x = Array(batch.inputsInt[(r * T)..<(r * T + T)])
                let y = Array(batch.targets[(r * T)..<(r * T + T)])
                // Targets are the inputs shifted by one.
                XCTAssertEqual(Array(y.dropLast()), Array(x.dropFirst()))
                // Both are the file at one start in [0, train_len - T - 1].
                let s = (0...(trainLen - T - 1)).first { (s: Int) -> Bool in isWindow(bytes, start: s, x, y) }
                XCTAssertNotNil(s, "batch \(index) row \(r) is not a train window of the file")
                if let s { starts.insert(s) }
            }
        }
        // 48 windows from 885 possible starts: random, so (almost surely) many distinct.
        XCTAssertGreaterThan(starts.count, 30)
    }

    func testTrainWindowsReachTheEndOfTheTrainSplitOnly() throws {
        // train_len = T + 2: only starts 0 and 1 are legal; targets never leave the split.
        let bytes = fixtureBytes(100)
        let path = try writeFixture(bytes)
        let T = 8
        let ds = try openDataset(path: path, seqLen: T, hp: ["train_fraction": 0.1, "valid_fraction": 0.5])
        XCTAssertEqual(ds.splitSizes[0], 10)
        var seen = Set<Int32>()
        for index in 0..<20 {
            let batch = try XCTUnwrap(ds.read(.train, index: index, batchSize: 4))
            for r in 0..<4 {
                let first = batch.inputsInt[r * T]
                XCTAssertTrue(first == Int32(bytes[0]) || first == Int32(bytes[1]))
                seen.insert(first)
                XCTAssertLessThanOrEqual(batch.targets[r * T + T - 1], 255)
                let lastTarget = batch.targets[r * T + T - 1]
                XCTAssertTrue(lastTarget == Int32(bytes[8]) || lastTarget == Int32(bytes[9]))
            }
        }
        XCTAssertEqual(seen.count, 2, "both legal starts should occur in 80 draws")
    }

    func testTrainIndexIsSeekable() throws {
        let path = try writeFixture(fixtureBytes(2000))
        let ds = try openDataset(path: path, seqLen: 32, seed: 7)
        let b7 = try XCTUnwrap(ds.read(.train, index: 7, batchSize: 4))
        let b3 = try XCTUnwrap(ds.read(.train, index: 3, batchSize: 4))
        let b7again = try XCTUnwrap(ds.read(.train, index: 7, batchSize: 4))
        XCTAssertEqual(b7.inputsInt, b7again.inputsInt)
        XCTAssertEqual(b7.targets, b7again.targets)
        XCTAssertNotEqual(b7.inputsInt, b3.inputsInt)
        let b8 = try XCTUnwrap(ds.read(.train, index: 8, batchSize: 4))
        XCTAssertNotEqual(b7.inputsInt, b8.inputsInt)
        // A fresh instance with the same seed (a resumed run) reads the same batch.
        let resumed = try openDataset(path: path, seqLen: 32, seed: 7)
        XCTAssertEqual(try XCTUnwrap(resumed.read(.train, index: 7, batchSize: 4)).inputsInt, b7.inputsInt)
        // Another seed, another sample.
        let other = try openDataset(path: path, seqLen: 32, seed: 8)
        XCTAssertNotEqual(try XCTUnwrap(other.read(.train, index: 7, batchSize: 4)).inputsInt, b7.inputsInt)
        // Large indices are valid too.
        XCTAssertNotNil(try ds.read(.train, index: 1_000_000_000, batchSize: 4))
    }

    // MARK: valid / test batches

    func testEvalBatchesAreOrderedWindowsWithPaddedTail() throws {
        let bytes = fixtureBytes(1000)
        let path = try writeFixture(bytes)
        let T = 16, B = 3
        let ds = try openDataset(path: path, seqLen: T)
        for (split, range) in [(Split.valid, 900..<950), (Split.test, 950..<1000)] {
            let splitBytes = Array(bytes[range])
            // 50 bytes -> ceil(49 / 16) = 4 windows -> ceil(4 / 3) = 2 batches.
            XCTAssertEqual(try ds.numBatches(split, batchSize: B), 2)
            for index in 0..<2 {
                let batch = try XCTUnwrap(ds.read(split, index: index, batchSize: B))
                let (x, y, rows) = expectedEval(splitBytes, T: T, B: B, index: index)
                XCTAssertEqual(batch.rows, rows)
                XCTAssertEqual(batch.inputsInt, x, "\(split.name) batch \(index) inputs")
                XCTAssertEqual(batch.targets, y, "\(split.name) batch \(index) targets")
            }
            // The last batch: 1 real window holding 1 position (split position 48 -> 49).
            let last = try XCTUnwrap(ds.read(split, index: 1, batchSize: B))
            XCTAssertEqual(last.rows, 1)
            XCTAssertEqual(last.inputsInt[0], Int32(splitBytes[48]))
            XCTAssertEqual(last.targets[0], Int32(splitBytes[49]))
            XCTAssertTrue(last.targets[1...].allSatisfy { $0 == -1 })
            XCTAssertTrue(last.inputsInt[1...].allSatisfy { $0 == 0 })
            // First batch, first window: split bytes 0..<16 -> 1...16.
            let first = try XCTUnwrap(ds.read(split, index: 0, batchSize: B))
            XCTAssertEqual(first.rows, 3)
            XCTAssertEqual(Array(first.inputsInt[0..<T]), splitBytes[0..<T].map { Int32($0) })
            XCTAssertEqual(Array(first.targets[0..<T]), splitBytes[1...T].map { Int32($0) })
            // Past the end: END_OF_DATA, which the host wrapper turns into nil.
            XCTAssertNil(try ds.read(split, index: 2, batchSize: B))
            XCTAssertNil(try ds.read(split, index: 100, batchSize: B))
        }
    }

    func testEvalPassCoversEverySplitPositionOnce() throws {
        let bytes = fixtureBytes(3001)
        let path = try writeFixture(bytes)
        let T = 10, B = 4
        let ds = try openDataset(path: path, seqLen: T)
        let (start, len) = (ds.splitSizes[0], ds.splitSizes[1])
        let n = try ds.numBatches(.valid, batchSize: B)
        XCTAssertEqual(n, ((len - 1 + T - 1) / T + B - 1) / B)
        var inputs: [Int32] = [], targets: [Int32] = []
        for index in 0..<n {
            let batch = try XCTUnwrap(ds.read(.valid, index: index, batchSize: B))
            for r in 0..<batch.rows {
                for t in 0..<T where batch.targets[r * T + t] != -1 {
                    inputs.append(batch.inputsInt[r * T + t])
                    targets.append(batch.targets[r * T + t])
                }
            }
        }
        XCTAssertEqual(inputs, bytes[start..<(start + len - 1)].map { Int32($0) })
        XCTAssertEqual(targets, bytes[(start + 1)..<(start + len)].map { Int32($0) })
        XCTAssertNil(try ds.read(.valid, index: n, batchSize: B))
    }

    // MARK: stream order (Transformer-XL)

    /// order = streams: row b of batch i is segment i of stream b (b·S + i·T ...), S = ⌊(len−1)/B⌋;
    /// consecutive batches continue each row; train wraps after ⌊S/T⌋ whole segments; an eval
    /// pass covers the first B·S positions once, the last segment padded.
    func testStreamOrderContinuesEveryRow() throws {
        let bytes = fixtureBytes(1000)
        let path = try writeFixture(bytes)
        let T = 8, B = 3
        let ds = try openDataset(path: path, seqLen: T, hp: ["order": "streams"])
        XCTAssertTrue(ds.streams)
        XCTAssertFalse(try openDataset(path: path, seqLen: T).streams)
        // train: 900 bytes -> S = 299 per stream, 37 whole segments, then the stream starts again.
        let S = 899 / B
        for index in [0, 1, 36, 37, 38] {
            let batch = try XCTUnwrap(ds.read(.train, index: index, batchSize: B))
            XCTAssertEqual(batch.rows, B)
            let seg = index % (S / T)
            for b in 0..<B {
                let x = Array(batch.inputsInt[(b * T)..<((b + 1) * T)]),
                    y = Array(batch.targets[(b * T)..<((b + 1) * T)])
                XCTAssertTrue(isWindow(bytes, start: b * S + seg * T, x, y), "train batch \(index) row \(b)")
            }
        }
        // valid: 50 bytes -> S = 16 per stream -> 2 segments; no padding (16 = 2 T).
        let (start, len) = (ds.splitSizes[0], ds.splitSizes[1])
        let Sv = (len - 1) / B
        XCTAssertEqual(try ds.numBatches(.valid, batchSize: B), (Sv + T - 1) / T)
        var covered: [Int32] = []
        for index in 0..<(try ds.numBatches(.valid, batchSize: B)) {
            let batch = try XCTUnwrap(ds.read(.valid, index: index, batchSize: B))
            for b in 0..<B {
                for t in 0..<T {
                    let p = b * Sv + index * T + t
                    if index * T + t < Sv {
                        XCTAssertEqual(batch.inputsInt[b * T + t], Int32(bytes[start + p]))
                        XCTAssertEqual(batch.targets[b * T + t], Int32(bytes[start + p + 1]))
                        covered.append(batch.targets[b * T + t])
                    } else {
                        XCTAssertEqual(batch.targets[b * T + t], -1)
                    }
                }
            }
        }
        XCTAssertEqual(covered.count, B * Sv)
        // A batch size leaving less than one segment per train stream is an error.
        let msg = errorMessage { _ = try ds.read(.train, index: 0, batchSize: 200) }
        XCTAssertTrue(msg.contains("order=streams") && msg.contains("batch_size"), msg)
        // The last valid segment of a split that does not divide into T is padded.
        let odd = try openDataset(path: path, seqLen: 6, hp: ["order": "streams"])
        let lastIndex = try odd.numBatches(.valid, batchSize: B) - 1
        let last = try XCTUnwrap(odd.read(.valid, index: lastIndex, batchSize: B))
        let real = Sv - lastIndex * 6
        XCTAssertEqual(Array(last.targets[0..<real]), (0..<real).map { Int32(bytes[start + lastIndex * 6 + $0 + 1]) })
        XCTAssertTrue(last.targets[real..<6].allSatisfy { $0 == -1 })
    }

    // MARK: errors

    func testMissingFileNamesThePathAndTheSource() throws {
        let path = tempDir.appendingPathComponent("nope/enwik8-mini").path
        let msg = errorMessage { _ = try openDataset(path: path, seqLen: 8) }
        XCTAssertTrue(msg.contains(path), msg)
        XCTAssertTrue(msg.contains("gensim"), msg)
        XCTAssertTrue(msg.contains("IO"), msg)
    }

    func testEmptyFileIsAnError() throws {
        let path = try writeFixture([], name: "empty.txt")
        let msg = errorMessage { _ = try openDataset(path: path, seqLen: 8) }
        XCTAssertTrue(msg.contains(path) && msg.contains("empty"), msg)
    }

    func testTooShortSplitsAreErrors() throws {
        // 20 bytes -> train 18 < seq_len 32 + 1.
        let path = try writeFixture(fixtureBytes(20), name: "short.txt")
        var msg = errorMessage { _ = try openDataset(path: path, seqLen: 32) }
        XCTAssertTrue(msg.contains(path) && msg.contains("train") && msg.contains("18"), msg)
        // 100 bytes at 0.9 / 0.01: a 1-byte valid split has no (input, target) pair.
        let p2 = try writeFixture(fixtureBytes(100), name: "short2.txt")
        msg = errorMessage {
            _ = try openDataset(path: p2, seqLen: 8, hp: ["train_fraction": 0.9, "valid_fraction": 0.01])
        }
        XCTAssertTrue(msg.contains(p2) && msg.contains("valid"), msg)
    }

    func testFractionsOverOneAreRejected() throws {
        let path = try writeFixture(fixtureBytes(100))
        let msg = errorMessage {
            _ = try openDataset(path: path, seqLen: 8, hp: ["train_fraction": 0.9, "valid_fraction": 0.5])
        }
        XCTAssertTrue(msg.contains("exceeds 1"), msg)
    }

    // MARK: real data

    func testRealEnwik8MiniSplitsNinetyFiveFive() throws {
        guard let dir = sharedDataDirectory() else { throw XCTSkip("../shared/data not present") }
        let path = dir + "/enwik8-mini/enwik8-mini"
        guard FileManager.default.fileExists(atPath: path) else { throw XCTSkip("\(path) not present") }
        let ds = try openDataset(path: path, seqLen: 128)
        let n = 6_089_746
        XCTAssertEqual(ds.splitSizes.reduce(0, +), n)
        // floor(0.9 n), floor(0.95 n) - floor(0.9 n), rest
        XCTAssertEqual(ds.splitSizes, [5_480_771, 304_487, 304_488])
        XCTAssertEqual(ds.vocabSize, 256)
        // The first valid window is the file right after the train split.
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
        let batch = try XCTUnwrap(ds.read(.valid, index: 0, batchSize: 2))
        XCTAssertEqual(Array(batch.inputsInt[0..<128]), bytes[5_480_771..<(5_480_771 + 128)].map { Int32($0) })
        XCTAssertEqual(try ds.numBatches(.test, batchSize: 16), ((304_488 - 1 + 127) / 128 + 15) / 16)
    }

    func testDefaultPathResolvesUnderTheDataRoot() throws {
        guard let dir = sharedDataDirectory() else { throw XCTSkip("../shared/data not present") }
        guard FileManager.default.fileExists(atPath: dir + "/enwik8-mini/enwik8-mini") else {
            throw XCTSkip("enwik8-mini not present")
        }
        // No hyperparameters: path = "$DATA/enwik8-mini/enwik8-mini", seq_len = the model's.
        let core = try makeInstance(try openPlugin("DatasetChar"), dims: ModelDims(seqLen: 64, dataRoot: dir))
        let ds = try DatasetInstance(core)
        XCTAssertEqual(ds.sampleShape, [64])
        XCTAssertEqual(ds.splitSizes, [5_480_771, 304_487, 304_488])
    }

    /// "vqmoe.tokenizer/1": bytes are tokens; with compact_vocab text8 maps space → 0 and
    /// a…z → 1…26 both ways and refuses anything else.
    func testTokenizer() throws {
        let path = try writeFixture(Array(String(repeating: "the quick brown fox ", count: 20).utf8))
        let bytes = try openDataset(path: path, seqLen: 8)
        let tok = try Tokenizer(dataset: bytes, vocab: 256)
        XCTAssertEqual(tok.unit, .character)
        XCTAssertEqual(try tok.encode(bytes: Array("Hé\n".utf8)), [72, 195, 169, 10])
        XCTAssertEqual(try tok.encode(prompt: "Hé\n"), [72, 195, 169, 10])  // a newline is a byte, not an end of line
        XCTAssertEqual(try tok.decode([72, 195, 169]), Array("Hé".utf8))
        XCTAssertEqual(
            errorMessage { _ = try tok.decode(256, after: -1) },
            "dataset 'char' (test.char) failed in tokenizer decode: INVALID_ARGUMENT: token 256 is outside the vocabulary [0, 256)"
        )

        let text8 = try Tokenizer(
            dataset: try openDataset(path: path, seqLen: 8, hp: ["compact_vocab": true]), vocab: 27)
        XCTAssertEqual(try text8.encode(prompt: "az b"), [1, 26, 0, 2])
        XCTAssertEqual(try text8.decode([1, 26, 0, 2]), Array("az b".utf8))
        XCTAssertEqual(
            errorMessage { _ = try text8.encode(bytes: Array("aB".utf8)) },
            "dataset 'char' (test.char) failed in tokenizer encode: INVALID_ARGUMENT: the text has byte 0x42 at offset 1: this model's vocabulary (compact_vocab, text8) is a-z and space"
        )
        // A model whose vocabulary is smaller than the dataset's: out-of-range tokens are refused.
        XCTAssertTrue(
            errorMessage { _ = try Tokenizer(dataset: bytes, vocab: 100).encode(prompt: "z") }.contains(
                "gave token 122, outside the vocabulary [0, 100)"))
    }

    func testRealTinyShakespeareMatchesNanoGPTSplit() throws {
        guard let dir = sharedDataDirectory() else { throw XCTSkip("../shared/data not present") }
        let path = dir + "/tinyshakespeare/input.txt"
        guard FileManager.default.fileExists(atPath: path) else { throw XCTSkip("\(path) not present") }
        let ds = try openDataset(path: path, seqLen: 64, hp: ["train_fraction": 0.9, "valid_fraction": 0.1])
        // nanoGPT: n = 1,115,394; train = int(n * 0.9) = 1,003,854; val = the rest.
        XCTAssertEqual(ds.splitSizes, [1_003_854, 111_540, 0])
    }
}

/// The framework's generic plugin check (seek, ranges, end of eval splits) on a fixture.
final class DatasetCharCheckerTests: XCTestCase {
    func testPluginCheckerPasses() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vqmoe-char-check-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let url = dir.appendingPathComponent("text.txt")
        try Data(String(repeating: "To be, or not to be, that is the question. ", count: 40).utf8).write(to: url)
        let results = PluginChecker(library: try openPlugin("DatasetChar"), hyperparameters: ["path": url.path]).run()
        XCTAssertTrue(results.allSatisfy(\.passed), results.map(\.description).joined(separator: "\n"))
    }
}
