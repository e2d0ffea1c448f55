import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `csv` dataset plugin: RFC 4180 parsing (quotes, "" escapes, embedded newlines, CRLF),
/// TSV, classes from categories.json or the train labels, the valid split, byte samples,
/// epoch permutations, errors with path:line, the real BANKING77 counts and the checker.
final class DatasetCSVTests: XCTestCase {
    var tempDir: URL!

    override func setUpWithError() throws {
        tempDir = FileManager.default.temporaryDirectory.appendingPathComponent("vqmoe-csv-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tempDir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: tempDir)
    }

    // MARK: helpers

    /// Write `content` to `name` in the temp dir; returns the path.
    @discardableResult
    func write(_ name: String, _ content: String) throws -> String {
        let url = tempDir.appendingPathComponent(name)
        try Data(content.utf8).write(to: url)
        return url.path
    }

    /// A CSV file with header text,category: every field quoted when it needs it (RFC 4180).
    func csv(_ rows: [(String, String)], header: String = "text,category", eol: String = "\r\n") -> String {
        func field(_ s: String) -> String {
            s.contains(where: { $0 == "," || $0 == "\"" || $0 == "\n" || $0 == "\r" })
                ? "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\"" : s
        }
        return header + eol + rows.map { field($0.0) + "," + field($0.1) + eol }.joined()
    }

    func categories(_ names: [String]) -> String {
        "[" + names.map { "\"\($0)\"" }.joined(separator: ", ") + "]"
    }

    /// `n` distinct rows cycling through `labels`.
    func rows(_ n: Int, labels: [String] = ["alpha", "beta", "gamma"]) -> [(String, String)] {
        (0..<n).map { ("query \($0): " + String(repeating: "z", count: $0 % 5), labels[$0 % labels.count]) }
    }

    /// A dataset over files in the temp dir; hyperparameters override the defaults below.
    func openDataset(
        train: String, test: String, categoriesPath: String? = nil, hp: [String: Any] = [:],
        seqLen: Int = 48, modelSeqLen: Int = 0, seed: UInt64 = 1
    ) throws -> DatasetInstance {
        var values: [String: Any] = ["train_path": train, "test_path": test, "categories_path": categoriesPath ?? ""]
        if seqLen > 0 { values["seq_len"] = seqLen }
        for (k, v) in hp { values[k] = v }
        let core = try makeInstance(
            try openPlugin("DatasetCSV"), dims: ModelDims(seqLen: modelSeqLen),
            hyperparameters: values, seed: seed)
        return try DatasetInstance(core)
    }

    func errorMessage(_ body: () throws -> Void) -> String {
        do { try body() } catch let e as VQMoEError { return e.message } catch { return "\(error)" }
        XCTFail("expected an error")
        return ""
    }

    /// The text a row holds (its first `length` bytes), checking the rest is 0.
    func rowText(_ batch: DatasetInstance.Batch, row: Int, T: Int) -> String {
        let length = Int(batch.lengths[row])
        let x = batch.inputsInt[(row * T)..<(row * T + T)]
        XCTAssertTrue(x.dropFirst(length).allSatisfy { $0 == 0 }, "row \(row) is not padded with 0 after its length")
        // An empty text is one 0 byte of length 1.
        if length == 1 && x.first == 0 { return "" }
        return String(decoding: x.prefix(length).map { UInt8($0) }, as: UTF8.self)
    }

    /// Every (text, label) of an ordered split, checking the padded tail of the last batch.
    func evalPass(_ ds: DatasetInstance, _ split: Split, batchSize B: Int = 4) throws -> [(String, Int32)] {
        let T = ds.sampleShape[0]
        var out: [(String, Int32)] = []
        let n = try ds.numBatches(split, batchSize: B)
        for index in 0..<n {
            let b = try XCTUnwrap(ds.read(split, index: index, batchSize: B))
            for r in 0..<b.rows { out.append((rowText(b, row: r, T: T), b.targets[r])) }
            for r in b.rows..<B {
                XCTAssertEqual(b.targets[r], Int32(VQMOE_PAD_TARGET))
                XCTAssertEqual(b.lengths[r], 1)
                XCTAssertTrue(b.inputsInt[(r * T)..<(r * T + T)].allSatisfy { $0 == 0 })
            }
        }
        XCTAssertNil(try ds.read(split, index: n, batchSize: B))
        return out
    }

    /// Epoch 0 of the train split: positions 0 ..< N in one batch.
    func firstEpoch(_ ds: DatasetInstance) throws -> [(String, Int32)] {
        let n = ds.splitSizes[0], T = ds.sampleShape[0]
        let b = try XCTUnwrap(ds.read(.train, index: 0, batchSize: n))
        return (0..<n).map { (rowText(b, row: $0, T: T), b.targets[$0]) }
    }

    /// The reference epoch order: Fisher–Yates with the host RNG seeded (seed, stream = epoch).
    func referenceOrder(n: Int, seed: UInt64, epoch: Int) -> [Int] {
        var order = Array(0..<n)
        var rng = HostRNG.make(seed: seed, stream: UInt64(epoch))
        var i = n - 1
        while i > 0 {
            order.swapAt(i, Int(HostRNG.next(&rng).multipliedFullWidth(by: UInt64(i + 1)).high))
            i -= 1
        }
        return order
    }

    // MARK: parsing

    /// A classification dataset has no tokenizer: `sample` / `eval --text` say so.
    func testNoTokenizerForClassification() throws {
        let train = try write("train.csv", csv(rows(6)))
        let ds = try openDataset(train: train, test: try write("test.csv", csv(rows(3))))
        XCTAssertTrue(
            errorMessage { _ = try Tokenizer(dataset: ds, vocab: 256) }.contains(
                "has no tokenizer (feature vqmoe.tokenizer/1), so text cannot be turned into this model's tokens"))
    }

    func testQuotedFieldsCommasEscapesAndEmbeddedNewlines() throws {
        // Raw RFC 4180 with CRLF records, an LF inside quotes, a CRLF inside quotes, a blank line,
        // an empty field, a quote inside an unquoted field, a last record without line break.
        let raw =
            "id,text,category\r\n" + "1,\"Hello, world\",greeting\r\n" + "2,\"She said \"\"hi\"\", twice\",greeting\r\n"
            + "3,\"line one\nline two\",farewell\r\n" + "\r\n" + "4,plain text,farewell\r\n" + "5,,greeting\r\n"
            + "6,\"\"\"quoted\"\"\",\"farewell\"\r\n" + "7,\"crlf\r\ninside\",greeting\r\n" + "8,5\" screen, farewell\n"
            + "9,naïve café,  greeting  "
        let test = try write("test.csv", raw)
        let train = try write("train.csv", csv([("hi", "greeting"), ("bye", "farewell")]))
        let cats = try write("cats.json", categories(["greeting", "farewell"]))
        let ds = try openDataset(train: train, test: test, categoriesPath: cats, hp: ["valid_fraction": 0.0])
        XCTAssertEqual(ds.splitSizes, [2, 0, 9])
        XCTAssertEqual(ds.nClasses, 2)
        let got = try evalPass(ds, .test)
        XCTAssertEqual(
            got.map(\.0),
            [
                "Hello, world", "She said \"hi\", twice", "line one\nline two", "plain text", "",
                "\"quoted\"", "crlf\r\ninside", "5\" screen", "naïve café",
            ])
        XCTAssertEqual(got.map(\.1), [0, 0, 1, 1, 0, 1, 0, 1, 0])
        XCTAssertEqual(try ds.numBatches(.valid, batchSize: 4), 0)
        XCTAssertNil(try ds.read(.valid, index: 0, batchSize: 4))
    }

    func testTSVByExtensionAndByHyperparameter() throws {
        let raw = "category\ttext\r\nbeta\t\"tab\tinside\"\r\nalpha\tplain, with comma\r\n"
        let tsv = try write("data.tsv", raw)
        let cats = try write("cats.json", categories(["alpha", "beta"]))
        let ds = try openDataset(train: tsv, test: tsv, categoriesPath: cats, hp: ["valid_fraction": 0.0])
        XCTAssertEqual(try evalPass(ds, .test).map(\.0), ["tab\tinside", "plain, with comma"])
        XCTAssertEqual(try evalPass(ds, .test).map(\.1), [1, 0])
        // The same bytes in a .txt file: delimiter = tab says so.
        let txt = try write("data.txt", raw)
        let ds2 = try openDataset(
            train: txt, test: txt, categoriesPath: cats, hp: ["valid_fraction": 0.0, "delimiter": "tab"])
        XCTAssertEqual(try evalPass(ds2, .test).map(\.0), ["tab\tinside", "plain, with comma"])
        // Forcing comma on the .tsv: one column "category\ttext", listed in the error.
        let msg = errorMessage {
            _ = try self.openDataset(train: tsv, test: tsv, categoriesPath: cats, hp: ["delimiter": "comma"])
        }
        XCTAssertTrue(msg.contains("\(tsv):1: the header has no column 'text' (text_column)"), msg)
        XCTAssertTrue(msg.contains("'category\ttext'") && msg.contains("comma-separated"), msg)
    }

    func testCategoriesFileDefinesTheClassIndices() throws {
        let train = try write("train.csv", csv([("a1", "a"), ("b1", "b"), ("a2", " a ")]))
        let cats = try write("cats.json", "[\"b\", \"c\", \"a\"]")
        let ds = try openDataset(train: train, test: train, categoriesPath: cats, hp: ["valid_fraction": 0.0])
        XCTAssertEqual(ds.nClasses, 3)  // "c" is a class even though unused
        XCTAssertEqual(try evalPass(ds, .test).map(\.1), [2, 0, 2])  // labels are trimmed
    }

    func testClassesAreTheSortedTrainLabelsWithoutACategoriesFile() throws {
        let train = try write("train.csv", csv([("1", "zeta"), ("2", "alpha"), ("3", "Beta"), ("4", "alpha")]))
        let test = try write("test.csv", csv([("5", "Beta"), ("6", "zeta")]))
        let ds = try openDataset(train: train, test: test, hp: ["valid_fraction": 0.0])
        // Byte order: "Beta" < "alpha" < "zeta".
        XCTAssertEqual(ds.nClasses, 3)
        XCTAssertEqual(try evalPass(ds, .test).map(\.1), [0, 2])
        // A test label the train file never uses is an error at its line.
        let bad = try write("bad.csv", csv([("5", "Beta"), ("6", "omega")]))
        let msg = errorMessage { _ = try self.openDataset(train: train, test: bad, hp: ["valid_fraction": 0.0]) }
        XCTAssertTrue(
            msg.contains("\(bad):3: label 'omega' is not one of the 3 classes (the distinct labels of \(train)"), msg)
    }

    // MARK: valid split

    func testValidSplitSpreadTakesEveryTenthRow() throws {
        let all = rows(20)
        let train = try write("train.csv", csv(all))
        let ds = try openDataset(train: train, test: train, hp: ["valid_fraction": 0.1])
        XCTAssertEqual(ds.splitSizes, [18, 2, 20])
        // floor((i+1)/10) > floor(i/10): rows 9 and 19, in file order.
        XCTAssertEqual(try evalPass(ds, .valid).map(\.0), [all[9].0, all[19].0])
        let validSet: Set<Int> = [9, 19]
        XCTAssertEqual(
            Set(try firstEpoch(ds).map(\.0)), Set(all.indices.filter { !validSet.contains($0) }.map { all[$0].0 }))
        // f = 0.25 of 10 rows: floor(2.5) = 2 rows, 3 and 7.
        let ten = try write("ten.csv", csv(Array(all[0..<10])))
        let ds2 = try openDataset(train: ten, test: ten, hp: ["valid_fraction": 0.25])
        XCTAssertEqual(ds2.splitSizes[0...1], [8, 2])
        XCTAssertEqual(try evalPass(ds2, .valid).map(\.0), [all[3].0, all[7].0])
        // f = 0.5 of 3 rows: floor(1.5) = 1 row (row 1); one row alone: no valid row.
        let three = try write("three.csv", csv(Array(all[0..<3])))
        XCTAssertEqual(
            try evalPass(try openDataset(train: three, test: three, hp: ["valid_fraction": 0.5]), .valid).map(\.0),
            [all[1].0])
        let one = try write("one.csv", csv(Array(all[0..<1])))
        XCTAssertEqual(try openDataset(train: one, test: one, hp: ["valid_fraction": 0.5]).splitSizes, [1, 0, 1])
    }

    func testValidSplitTailTakesTheLastRows() throws {
        let all = rows(23)
        let train = try write("train.csv", csv(all))
        let ds = try openDataset(train: train, test: train, hp: ["valid_fraction": 0.1, "valid_rows": "tail"])
        XCTAssertEqual(ds.splitSizes, [21, 2, 23])  // floor(2.3) = 2
        XCTAssertEqual(try evalPass(ds, .valid).map(\.0), [all[21].0, all[22].0])
        XCTAssertEqual(Set(try firstEpoch(ds).map(\.0)), Set(all[0..<21].map(\.0)))
        let ds2 = try openDataset(train: train, test: train, hp: ["valid_fraction": 0.3, "valid_rows": "tail"])
        XCTAssertEqual(ds2.splitSizes[0...1], [17, 6])  // floor(6.9) = 6
    }

    // MARK: samples

    func testBatchesAreBytesPaddedTruncatedWithLengths() throws {
        let test: [(String, String)] = [
            ("short", "a"), ("exactly8", "b"), ("longer than eight", "a"), ("", "b"), ("über", "a"),
        ]
        let train = try write("train.csv", csv([("x", "a"), ("y", "b")]))
        let testPath = try write("test.csv", csv(test))
        let T = 8, B = 2
        let ds = try openDataset(train: train, test: testPath, hp: ["valid_fraction": 0.0], seqLen: T)
        XCTAssertEqual(ds.sampleShape, [T])
        XCTAssertEqual(ds.task, VQMOE_TASK_CLASSIFY_TOKENS)
        XCTAssertEqual(ds.vocabSize, 256)
        XCTAssertEqual(try ds.numBatches(.test, batchSize: B), 3)
        for index in 0..<3 {
            let b = try XCTUnwrap(ds.read(.test, index: index, batchSize: B))
            XCTAssertEqual(b.rows, index < 2 ? 2 : 1)
            for r in 0..<B {
                let i = index * B + r
                let x = Array(b.inputsInt[(r * T)..<(r * T + T)])
                if i < test.count {
                    let bytes = Array(test[i].0.utf8)
                    let n = min(bytes.count, T)
                    XCTAssertEqual(
                        x, bytes[0..<n].map { Int32($0) } + [Int32](repeating: 0, count: T - n), "example \(i)")
                    XCTAssertEqual(b.lengths[r], Int32(max(n, 1)))
                    XCTAssertEqual(b.targets[r], test[i].1 == "a" ? 0 : 1)
                } else {
                    XCTAssertEqual(x, [Int32](repeating: 0, count: T))
                    XCTAssertEqual(b.targets[r], -1)
                    XCTAssertEqual(b.lengths[r], 1)
                }
            }
        }
        let b1 = try XCTUnwrap(ds.read(.test, index: 1, batchSize: B))
        XCTAssertEqual(Array(b1.inputsInt[0..<8]), Array("longer t".utf8).map { Int32($0) })
        XCTAssertEqual(b1.lengths, [8, 1])
        let b2 = try XCTUnwrap(ds.read(.test, index: 2, batchSize: B))
        XCTAssertEqual(Array(b2.inputsInt[0..<8]), [0xC3, 0xBC, 0x62, 0x65, 0x72, 0, 0, 0])
        XCTAssertEqual(b2.lengths, [5, 1])
    }

    func testTrainEpochsArePermutationsAndSeekable() throws {
        let all = rows(13)
        let train = try write("train.csv", csv(all))
        let seed: UInt64 = 11
        let ds = try openDataset(train: train, test: train, hp: ["valid_fraction": 0.0], seed: seed)
        let T = ds.sampleShape[0], B = 5
        // 13 batches of 5 = 65 positions = 5 epochs of 13.
        var stream: [Int] = []
        for index in 0..<13 {
            let b = try XCTUnwrap(ds.read(.train, index: index, batchSize: B))
            XCTAssertEqual(b.rows, B)
            for r in 0..<B {
                let text = rowText(b, row: r, T: T)
                let i = try XCTUnwrap(all.firstIndex { $0.0 == text })
                XCTAssertEqual(b.targets[r], Int32(i % 3))  // alpha, beta, gamma = 0, 1, 2
                stream.append(i)
            }
        }
        for e in 0..<5 {
            let epoch = Array(stream[(e * 13)..<(e * 13 + 13)])
            XCTAssertEqual(epoch.sorted(), Array(0..<13), "epoch \(e) covers each example once")
            XCTAssertEqual(epoch, referenceOrder(n: 13, seed: seed, epoch: e))
        }
        // Seek: out of order, cold, other seed.
        let b9 = try XCTUnwrap(ds.read(.train, index: 9, batchSize: B))
        let cold = try openDataset(train: train, test: train, hp: ["valid_fraction": 0.0], seed: seed)
        XCTAssertEqual(try XCTUnwrap(cold.read(.train, index: 9, batchSize: B)).inputsInt, b9.inputsInt)
        XCTAssertEqual(
            try XCTUnwrap(cold.read(.train, index: 2, batchSize: B)).targets,
            try XCTUnwrap(ds.read(.train, index: 2, batchSize: B)).targets)
        let other = try openDataset(train: train, test: train, hp: ["valid_fraction": 0.0], seed: seed + 1)
        XCTAssertNotEqual(try XCTUnwrap(other.read(.train, index: 9, batchSize: B)).inputsInt, b9.inputsInt)
    }

    // MARK: errors

    func testMissingColumnListsTheHeader() throws {
        let train = try write("train.csv", "id,utterance,intent\n1,hello,greet\n")
        let cats = try write("cats.json", categories(["greet"]))
        var msg = errorMessage { _ = try self.openDataset(train: train, test: train, categoriesPath: cats) }
        XCTAssertTrue(
            msg.contains(
                "\(train):1: the header has no column 'text' (text_column); its 3 columns (comma-separated) are 'id', 'utterance', 'intent'"
            ), msg)
        msg = errorMessage {
            _ = try self.openDataset(train: train, test: train, categoriesPath: cats, hp: ["text_column": "utterance"])
        }
        XCTAssertTrue(
            msg.contains("no column 'category' (label_column)") && msg.contains("'id', 'utterance', 'intent'"), msg)
        let ds = try openDataset(
            train: train, test: train, categoriesPath: cats,
            hp: ["text_column": "utterance", "label_column": "intent", "valid_fraction": 0.0])
        XCTAssertEqual(try evalPass(ds, .test).map(\.0), ["hello"])
    }

    func testWrongFieldCountNamesTheLine() throws {
        // The quoted newline of the second row makes the next rows start on lines 5 and 6 (the bad one).
        let raw = "text,category\n\"ok\",a\n\"two\nlines\",b\nfine,a\nnot, fine,b\n"
        let train = try write("train.csv", raw)
        let msg = errorMessage { _ = try self.openDataset(train: train, test: train) }
        XCTAssertTrue(msg.contains("\(train):6: 3 fields, but the header (line 1) has 2 columns"), msg)
        let short = try write("short.csv", "text,category\nfine,a\nlonely\n")
        let msg2 = errorMessage { _ = try self.openDataset(train: short, test: short) }
        XCTAssertTrue(msg2.contains("\(short):3: 1 fields, but the header (line 1) has 2 columns"), msg2)
    }

    func testLabelNotInTheCategoriesNamesTheLine() throws {
        let train = try write("train.csv", csv([("a", "greeting"), ("multi\nline", "greeting"), ("c", "greting")]))
        let cats = try write("cats.json", categories(["greeting", "farewell"]))
        let msg = errorMessage { _ = try self.openDataset(train: train, test: train, categoriesPath: cats) }
        XCTAssertTrue(
            msg.contains("\(train):5: label 'greting' is not one of the 2 classes (categories_path \(cats))"), msg)
        XCTAssertTrue(msg.contains("IO"), msg)
    }

    func testQuotingErrors() throws {
        let unclosed = try write("unclosed.csv", "text,category\nok,a\n\"never closed,a\nmore,b\n")
        var msg = errorMessage { _ = try self.openDataset(train: unclosed, test: unclosed) }
        XCTAssertTrue(msg.contains("\(unclosed):3: a quoted field opened on this line is never closed"), msg)
        let junk = try write("junk.csv", "text,category\nok,a\n\"quoted\"x,b\n")
        msg = errorMessage { _ = try self.openDataset(train: junk, test: junk) }
        XCTAssertTrue(msg.contains("\(junk):3: unexpected 'x' after the closing quote"), msg)
    }

    func testMissingAndEmptyFiles() throws {
        let good = try write("good.csv", csv([("a", "x")]))
        let missing = tempDir.appendingPathComponent("nope/train.csv").path
        var msg = errorMessage { _ = try self.openDataset(train: missing, test: good) }
        XCTAssertTrue(msg.contains("data file \(missing) not found"), msg)
        XCTAssertTrue(msg.contains("PolyAI-LDN/task-specific-datasets") && msg.contains("shared/data/banking77"), msg)
        msg = errorMessage { _ = try self.openDataset(train: good, test: missing) }
        XCTAssertTrue(msg.contains("data file \(missing) not found"), msg)
        msg = errorMessage { _ = try self.openDataset(train: good, test: good, categoriesPath: missing) }
        XCTAssertTrue(msg.contains("data file \(missing) not found"), msg)
        let empty = try write("empty.csv", "")
        msg = errorMessage { _ = try self.openDataset(train: empty, test: good) }
        XCTAssertTrue(msg.contains("\(empty) is empty"), msg)
        let headerOnly = try write("header.csv", "text,category\r\n")
        msg = errorMessage { _ = try self.openDataset(train: good, test: headerOnly) }
        XCTAssertTrue(msg.contains("\(headerOnly) has a header but no rows"), msg)
        let blank = try write("blank.csv", "\n\r\n\n")
        msg = errorMessage { _ = try self.openDataset(train: blank, test: good) }
        XCTAssertTrue(msg.contains("\(blank) has no header row"), msg)
    }

    func testBadCategoriesFiles() throws {
        let train = try write("train.csv", csv([("a", "x")]))
        let cases: [(String, String)] = [
            ("{\"x\": 1", "is not valid JSON"),
            ("{\"x\": 1}", "expected a JSON array of label strings"),
            ("[\"x\", 3]", "element 1 of the array is not a string"),
            ("[\"x\", \"y\", \"x\"]", "category 'x' appears twice (elements 0 and 2)"),
            ("[]", "the array of categories is empty"),
            ("", "is empty"),
        ]
        for (i, (content, expected)) in cases.enumerated() {
            let path = try write("cats\(i).json", content)
            let msg = errorMessage { _ = try self.openDataset(train: train, test: train, categoriesPath: path) }
            XCTAssertTrue(msg.contains(path) && msg.contains(expected), "\(content): \(msg)")
        }
    }

    func testBadHyperparametersAreRejected() throws {
        let train = try write("train.csv", csv([("a", "x")]))
        var msg = errorMessage { _ = try self.openDataset(train: train, test: train, hp: ["valid_fraction": 0.6]) }
        XCTAssertTrue(msg.contains("valid_fraction"), msg)
        msg = errorMessage { _ = try self.openDataset(train: train, test: train, hp: ["delimiter": "semicolon"]) }
        XCTAssertTrue(msg.contains("semicolon"), msg)
        msg = errorMessage { _ = try self.openDataset(train: train, test: train, hp: ["valid_rows": "random"]) }
        XCTAssertTrue(msg.contains("random"), msg)
        msg = errorMessage { _ = try self.openDataset(train: train, test: train, seqLen: 0, modelSeqLen: 0) }
        XCTAssertTrue(msg.contains("seq_len"), msg)
        XCTAssertEqual(try openDataset(train: train, test: train, seqLen: 0, modelSeqLen: 33).sampleShape, [33])
    }

    // MARK: real data

    func banking77() throws -> String {
        guard let data = sharedDataDirectory() else { throw XCTSkip("../shared/data not present") }
        let dir = data + "/banking77"
        guard FileManager.default.fileExists(atPath: dir + "/train.csv") else { throw XCTSkip("\(dir) not present") }
        return dir
    }

    func testRealBanking77Counts() throws {
        let dir = try banking77()
        let train = dir + "/train.csv", test = dir + "/test.csv", cats = dir + "/categories.json"
        let ds = try openDataset(train: train, test: test, categoriesPath: cats, seqLen: 8)
        // floor(10,003 * 0.1) = 1,000 valid rows.
        XCTAssertEqual(ds.splitSizes, [9_003, 1_000, 3_080])
        XCTAssertEqual(ds.nClasses, 77)
        // The file is sorted by class; spread keeps all 77 classes in both train and valid.
        XCTAssertEqual(Set(try firstEpoch(ds).map(\.1)).count, 77)
        let valid = try evalPass(ds, .valid, batchSize: 64)
        XCTAssertEqual(valid.count, 1_000)
        XCTAssertEqual(Set(valid.map(\.1)), Set(0..<77))
        let testPass = try evalPass(ds, .test, batchSize: 64)
        XCTAssertEqual(testPass.count, 3_080)
        XCTAssertEqual(Set(testPass.map(\.1)), Set(0..<77))
        // valid_rows = tail: the last 1,000 rows hold only classes 69..76.
        let tail = try openDataset(
            train: train, test: test, categoriesPath: cats, hp: ["valid_rows": "tail"], seqLen: 8)
        XCTAssertEqual(tail.splitSizes, [9_003, 1_000, 3_080])
        XCTAssertEqual(Set(try evalPass(tail, .valid, batchSize: 64).map(\.1)), Set(69..<77))
        XCTAssertEqual(Set(try firstEpoch(tail).map(\.1)), Set(0..<70))
        // No categories file: the 77 sorted distinct train labels.
        let derived = try openDataset(train: train, test: test, seqLen: 8)
        XCTAssertEqual(derived.nClasses, 77)
    }

    func testRealBanking77Rows() throws {
        let dir = try banking77()
        // test_path = train.csv gives every train row in file order.
        let ds = try openDataset(
            train: dir + "/train.csv", test: dir + "/train.csv", categoriesPath: dir + "/categories.json",
            seqLen: 512)
        let rows = try evalPass(ds, .test, batchSize: 500)
        XCTAssertEqual(rows.count, 10_003)
        XCTAssertEqual(rows[0].0, "I am still waiting on my card?")
        XCTAssertEqual(rows[0].1, 0)  // card_arrival
        XCTAssertEqual(
            rows[694].0,
            "I'm pretty frustrated about a pound charge that keeps  showing up in my account statement. It's listed in the app as \"pending\", it never changes, and now I'm thinking someone's hacked my account!"
        )
        XCTAssertEqual(rows[694].1, 4)  // extra_charge_on_statement
        XCTAssertEqual(rows[1290].0, "\nI can't seem to be able to use my card\n\n\n")
        XCTAssertEqual(rows[1290].1, 9)  // card_not_working
        XCTAssertEqual(rows[10_002].0, "Which countries are represented?")
        XCTAssertEqual(rows[10_002].1, 76)
        let test = try openDataset(
            train: dir + "/train.csv", test: dir + "/test.csv", categoriesPath: dir + "/categories.json",
            seqLen: 512)
        let first = try XCTUnwrap(test.read(.test, index: 0, batchSize: 1))
        XCTAssertEqual(rowText(first, row: 0, T: 512), "How do I locate my card?")
        XCTAssertEqual(first.targets, [0])
    }

    func testDefaultsResolveUnderTheDataRoot() throws {
        _ = try banking77()
        let data = sharedDataDirectory()!
        let core = try makeInstance(try openPlugin("DatasetCSV"), dims: ModelDims(seqLen: 128, dataRoot: data))
        let ds = try DatasetInstance(core)
        XCTAssertEqual(ds.sampleShape, [128])
        XCTAssertEqual(ds.splitSizes, [9_003, 1_000, 3_080])
        XCTAssertEqual(ds.nClasses, 77)
    }
}

/// The framework's generic plugin check on fixtures (CSV, TSV, tail split, derived classes,
/// a set seq_len) and on the real BANKING77 files.
final class DatasetCSVCheckerTests: XCTestCase {
    func testPluginCheckerPasses() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vqmoe-csv-check-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let labels = ["north", "south", "east"]
        func rows(_ n: Int, _ tag: String) -> [(String, String)] {
            (0..<n).map { ("\($0) \(tag) \"row\", with a comma", labels[$0 % 3]) }
        }
        func csvText(_ rows: [(String, String)], sep: String) -> String {
            "text\(sep)category\n"
                + rows.map { "\"\($0.0.replacingOccurrences(of: "\"", with: "\"\""))\"\(sep)\($0.1)\n" }.joined()
        }
        let train = dir.appendingPathComponent("train.csv"), test = dir.appendingPathComponent("test.csv")
        let trainTSV = dir.appendingPathComponent("train.tsv"), testTSV = dir.appendingPathComponent("test.tsv")
        let cats = dir.appendingPathComponent("cats.json")
        try Data(csvText(rows(40, "train"), sep: ",").utf8).write(to: train)
        try Data(csvText(rows(10, "test"), sep: ",").utf8).write(to: test)
        try Data(csvText(rows(40, "train"), sep: "\t").utf8).write(to: trainTSV)
        try Data(csvText(rows(10, "test"), sep: "\t").utf8).write(to: testTSV)
        try Data("[\"east\", \"north\", \"south\", \"west\"]".utf8).write(to: cats)
        let lib = try openPlugin("DatasetCSV")
        let base: [String: Any] = ["train_path": train.path, "test_path": test.path, "categories_path": cats.path]
        let variants: [[String: Any]] = [
            [:],
            ["train_path": trainTSV.path, "test_path": testTSV.path],
            ["valid_rows": "tail", "valid_fraction": 0.25],
            ["categories_path": "", "seq_len": 64],
            ["valid_fraction": 0.0, "delimiter": "comma"],
        ]
        for v in variants {
            let hp = base.merging(v) { $1 }
            let results = PluginChecker(library: lib, hyperparameters: hp).run()
            XCTAssertTrue(results.allSatisfy(\.passed), "\(v): " + results.map(\.description).joined(separator: "\n"))
            XCTAssertGreaterThanOrEqual(results.count, 10)
        }
        if let data = sharedDataDirectory(), FileManager.default.fileExists(atPath: data + "/banking77/train.csv") {
            // The defaults ($DATA/banking77/...), resolved against the checker's data root.
            let results = PluginChecker(library: lib, hyperparameters: [String: Any]()).run()
            XCTAssertTrue(results.allSatisfy(\.passed), results.map(\.description).joined(separator: "\n"))
        }
    }
}
