import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `word` dataset plugin: WikiText-style tokenisation (words + <eos> per line), the
/// train-split vocabulary, OOV metrics, dir / path sources, batches and errors.
final class DatasetWordTests: XCTestCase {
    var tempDir: URL!

    override func setUpWithError() throws {
        tempDir = FileManager.default.temporaryDirectory.appendingPathComponent("vqmoe-word-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: tempDir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: tempDir)
    }

    // MARK: helpers

    /// Write `text` (UTF-8) or raw bytes to `name` under the temp dir; returns the path.
    @discardableResult
    func write(_ text: String, _ name: String) throws -> String { try write(Array(text.utf8), name) }

    @discardableResult
    func write(_ bytes: [UInt8], _ name: String) throws -> String {
        let url = tempDir.appendingPathComponent(name)
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        try Data(bytes).write(to: url)
        return url.path
    }

    /// A WikiText-format folder `name` holding the three splits.
    func writeWikiText(_ name: String, train: String, valid: String, test: String) throws -> String {
        try write(train, "\(name)/wiki.train.tokens")
        try write(valid, "\(name)/wiki.valid.tokens")
        try write(test, "\(name)/wiki.test.tokens")
        return tempDir.appendingPathComponent(name).path
    }

    func openDataset(_ hp: [String: Any], seqLen: Int, modelSeqLen: Int = 0, seed: UInt64 = 1) throws -> DatasetInstance
    {
        var values = hp
        if values["dir"] == nil { values["dir"] = "" }
        if seqLen > 0 { values["seq_len"] = seqLen }
        let core = try makeInstance(
            try openPlugin("DatasetWord"), dims: ModelDims(seqLen: modelSeqLen), hyperparameters: values, seed: seed)
        return try DatasetInstance(core)
    }

    /// The error message of a throwing expression ("" when it did not throw).
    func errorMessage(_ body: () throws -> Void) -> String {
        do { try body() } catch let e as VQMoEError { return e.message } catch { return "\(error)" }
        XCTFail("expected an error")
        return ""
    }

    /// All token ids of a valid/test split, read through its ordered batches.
    func evalStream(_ ds: DatasetInstance, _ split: Split, batchSize: Int = 3) throws -> [Int32] {
        let T = ds.sampleShape[0]
        var out: [Int32] = [], last: Int32 = -1
        for index in 0..<(try ds.numBatches(split, batchSize: batchSize)) {
            let b = try XCTUnwrap(ds.read(split, index: index, batchSize: batchSize))
            for r in 0..<b.rows {
                for t in 0..<T where b.targets[r * T + t] != -1 {
                    out.append(b.inputsInt[r * T + t])
                    last = b.targets[r * T + t]
                }
            }
        }
        return ds.splitSizes[Int(split.rawValue)] >= 2 ? out + [last] : []
    }

    /// All token ids of the train split: one window of seq_len train_len - 1 (only start 0).
    func trainStream(_ hp: [String: Any]) throws -> [Int32] {
        let n = try openDataset(hp, seqLen: 1).splitSizes[0]
        let ds = try openDataset(hp, seqLen: n - 1)
        let b = try XCTUnwrap(ds.read(.train, index: 0, batchSize: 1))
        return b.inputsInt + [b.targets[n - 2]]
    }

    // MARK: a reference tokeniser and vocabulary (plain loops, Python's rules)

    /// Words of every line + "<eos>": lines end at "\n", "\r\n", "\r"; words are separated by
    /// Unicode White_Space and \x1c-\x1f (Python's str.split()). Words stay byte strings.
    func referenceTokens(_ text: String) -> [[UInt8]] {
        let eos = Array("<eos>".utf8)
        var tokens: [[UInt8]] = []
        var word = "", inLine = false
        var scalars = Array(text.unicodeScalars)[...]
        func endWord() { if !word.isEmpty { tokens.append(Array(word.utf8)); word = "" } }
        while let u = scalars.popFirst() {
            inLine = true
            if u == "\n" || u == "\r" {
                if u == "\r" && scalars.first == "\n" { scalars.removeFirst() }
                endWord(); tokens.append(eos); inLine = false
            } else if u.properties.isWhitespace || (0x1C...0x1F).contains(u.value) {
                endWord()
            } else {
                word.unicodeScalars.append(u)
            }
        }
        if inLine { endWord(); tokens.append(eos) }
        return tokens
    }

    /// "<unk>", "<eos>", then the train words with count >= minCount by descending count,
    /// ties in byte order, at most maxVocab entries (0 = all).
    func referenceVocab(_ train: [[UInt8]], minCount: Int = 1, maxVocab: Int = 0) -> [[UInt8]] {
        var counts: [[UInt8]: Int] = [:]
        for w in train { counts[w, default: 0] += 1 }
        let specials = [Array("<unk>".utf8), Array("<eos>".utf8)]
        var words = counts.keys.filter { !specials.contains($0) && counts[$0]! >= minCount }
        words.sort { a, b in counts[a]! != counts[b]! ? counts[a]! > counts[b]! : a.lexicographicallyPrecedes(b) }
        if maxVocab > 0 && words.count > maxVocab - 2 { words = Array(words.prefix(maxVocab - 2)) }
        return specials + words
    }

    func ids(_ tokens: [[UInt8]], _ vocab: [[UInt8]]) -> [Int32] {
        var index: [[UInt8]: Int32] = [:]
        for (i, w) in vocab.enumerated() { index[w] = Int32(i) }
        return tokens.map { index[$0] ?? 0 }
    }

    /// Tokens mapped to <unk> whose text was not "<unk>", over all tokens.
    func oovRate(_ tokens: [[UInt8]], _ vocab: [[UInt8]]) -> Double {
        let known = Set(vocab)
        return Double(tokens.filter { !known.contains($0) && $0 != Array("<unk>".utf8) }.count) / Double(tokens.count)
    }

    /// A deterministic corpus: `lines` lines of 0-11 Zipf-ish words (some lines empty).
    func syntheticCorpus(lines: Int, seed: UInt64 = 7) -> String {
        let words = [
            "the", "of", "and", "to", "a", "in", "was", "The", "@-@", ",", ".", "<unk>", "river", "song",
            "album", "café", "Ōtsuki", "1999", "season", "game", "war", "city", "band", "new", "first",
        ]
        var x = seed
        func next() -> Int { x = x &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407; return Int(x >> 33) }
        var out = ""
        for _ in 0..<lines {
            let n = next() % 12
            var line: [String] = []
            for _ in 0..<n {
                // A mix: a few frequent words, a long tail of rare made-up ones.
                let r = next() % 100
                line.append(r < 80 ? words[(r * r) % words.count] : "w\(next() % 20_000)")
            }
            out += (next() % 3 == 0 ? " " : "") + line.joined(separator: next() % 2 == 0 ? " " : "  ") + " \n"
        }
        return out
    }

    // MARK: tokenisation and vocabulary

    func testHandCheckedTokensVocabularyAndOOV() throws {
        // train: b a c a / (empty) / b <unk>  -> counts a 2, b 2, c 1: <unk> 0, <eos> 1, a 2, b 3, c 4.
        let dir = try writeWikiText("wt", train: "b a c a\n\nb <unk>\n", valid: "a d <unk>\nc", test: "e e\n")
        let hp: [String: Any] = ["dir": dir]
        let ds = try openDataset(hp, seqLen: 2)
        XCTAssertTrue(ds.isLM)
        XCTAssertEqual(ds.vocabSize, 5)
        XCTAssertEqual(ds.nClasses, 0)
        XCTAssertEqual(ds.sampleShape, [2])
        // The empty line is a lone <eos>; a last line without "\n" still ends with <eos>.
        XCTAssertEqual(ds.splitSizes, [9, 6, 3])
        XCTAssertEqual(try trainStream(hp), [3, 2, 4, 2, 1, 1, 3, 0, 1])
        XCTAssertEqual(try evalStream(ds, .valid), [2, 0, 0, 1, 4, 1])
        XCTAssertEqual(try evalStream(ds, .test), [0, 0, 1])
        // OOV: "d" of valid (the literal <unk> does not count), both "e" of test.
        let m = try ds.core.metrics()
        XCTAssertEqual(m["oov_rate_valid"]?.first ?? -1, 1.0 / 6.0, accuracy: 1e-12)
        XCTAssertEqual(m["oov_rate_test"]?.first ?? -1, 2.0 / 3.0, accuracy: 1e-12)
        XCTAssertEqual(m["oov_rate_train"], [0])
        XCTAssertEqual(m["vocab_size"], [5])

        // min_count 2: "c" (once) leaves the vocabulary and becomes <unk> everywhere.
        let hp2: [String: Any] = ["dir": dir, "min_count": 2]
        let ds2 = try openDataset(hp2, seqLen: 2)
        XCTAssertEqual(ds2.vocabSize, 4)
        XCTAssertEqual(try trainStream(hp2), [3, 2, 0, 2, 1, 1, 3, 0, 1])
        XCTAssertEqual(try evalStream(ds2, .valid), [2, 0, 0, 1, 0, 1])
        let m2 = try ds2.core.metrics()
        XCTAssertEqual(m2["oov_rate_train"]?.first ?? -1, 1.0 / 9.0, accuracy: 1e-12)
        XCTAssertEqual(m2["oov_rate_valid"]?.first ?? -1, 2.0 / 6.0, accuracy: 1e-12)

        // max_vocab 3: <unk>, <eos> and the first of the tied a / b in byte order ("a").
        let hp3: [String: Any] = ["dir": dir, "max_vocab": 3]
        XCTAssertEqual(try openDataset(hp3, seqLen: 2).vocabSize, 3)
        XCTAssertEqual(try trainStream(hp3), [0, 2, 0, 2, 1, 1, 0, 0, 1])
    }

    func testPythonWhitespaceNewlinesAndByteOrderTies() throws {
        // NBSP, tab, ideographic space, VT and \x1c separate words; "\r\n" and "\r" end lines;
        // the zero-width space U+200B does not; precomposed and decomposed é are different words.
        let text = "Zeta\u{00A0}alpha\tbeta\u{3000}gamma\u{0B}delta\u{1C}eps\r\nx\ry\u{200B}z \u{00E9} e\u{0301} ab a"
        let path = try write(text, "ws.txt")
        let hp: [String: Any] = ["path": path, "train_fraction": 1.0, "valid_fraction": 0.0]
        let ds = try openDataset(hp, seqLen: 2)
        XCTAssertEqual(ds.splitSizes, [15, 0, 0])
        // Every word once: byte order. "Zeta" (0x5A) before "a"; "eps" before "e\u{301}" (0x70 < 0xCC).
        // (Compared as bytes: Swift's String == would equate the two spellings of é.)
        let order = [
            "Zeta", "a", "ab", "alpha", "beta", "delta", "eps", "e\u{0301}", "gamma", "x", "y\u{200B}z", "\u{00E9}",
        ]
        .map { Array($0.utf8) }
        XCTAssertEqual(ds.vocabSize, 2 + order.count)
        let id = { (w: String) in Int32(2 + order.firstIndex(of: Array(w.utf8))!) }
        XCTAssertEqual(
            try trainStream(hp),
            ["Zeta", "alpha", "beta", "gamma", "delta", "eps"].map(id) + [1, id("x"), 1]
                + ["y\u{200B}z", "\u{00E9}", "e\u{0301}", "ab", "a"].map(id) + [1])
        // The reference tokeniser agrees.
        let ref = referenceTokens(text)
        XCTAssertEqual(ref.count, 15)
        XCTAssertEqual(try trainStream(hp), ids(ref, referenceVocab(ref)))
    }

    func testSyntheticCorpusMatchesReference() throws {
        let text = syntheticCorpus(lines: 3000)
        let path = try write(text, "corpus.txt")
        let tokens = referenceTokens(text)
        let n = tokens.count
        let trainEnd = Int((Double(n) * 0.9 + 1e-6).rounded(.down)),
            validEnd = Int((Double(n) * 0.95 + 1e-6).rounded(.down))
        let train = Array(tokens[..<trainEnd]), valid = Array(tokens[trainEnd..<validEnd]),
            test = Array(tokens[validEnd...])
        for (minCount, maxVocab) in [(1, 0), (3, 0), (1, 50), (2, 20)] {
            let hp: [String: Any] = ["path": path, "min_count": minCount, "max_vocab": maxVocab]
            let vocab = referenceVocab(train, minCount: minCount, maxVocab: maxVocab)
            let ds = try openDataset(hp, seqLen: 16)
            XCTAssertEqual(ds.splitSizes, [train.count, valid.count, test.count])
            XCTAssertEqual(ds.vocabSize, vocab.count, "min_count \(minCount) max_vocab \(maxVocab)")
            XCTAssertEqual(try trainStream(hp), ids(train, vocab))
            XCTAssertEqual(try evalStream(ds, .valid, batchSize: 5), ids(valid, vocab))
            XCTAssertEqual(try evalStream(ds, .test, batchSize: 2), ids(test, vocab))
            let m = try ds.core.metrics()
            for (name, split) in [("train", train), ("valid", valid), ("test", test)] {
                XCTAssertEqual(m["oov_rate_\(name)"]?.first ?? -1, oovRate(split, vocab), accuracy: 1e-12)
            }
        }
        // The tail of made-up words makes valid/test OOVs real.
        XCTAssertGreaterThan(oovRate(valid, referenceVocab(train)), 0)
    }

    // MARK: sources

    func testDirIsPreferredAndPathIsTheFallback() throws {
        let dir = try writeWikiText("wt", train: "a b c d e f\n", valid: "a b\n", test: "c\nd\n")
        let single = try write(String(repeating: "x y z\n", count: 40), "single.txt")
        // Both: dir wins.
        XCTAssertEqual(try openDataset(["dir": dir, "path": single], seqLen: 2).splitSizes, [7, 3, 4])
        // dir empty: path, split 90/5/5 by tokens (160 tokens).
        XCTAssertEqual(try openDataset(["dir": "", "path": single], seqLen: 2).splitSizes, [144, 8, 8])
        // dir without the files (missing folder, or only some files): path.
        let none = tempDir.appendingPathComponent("nowhere").path
        XCTAssertEqual(try openDataset(["dir": none, "path": single], seqLen: 2).splitSizes, [144, 8, 8])
        try write("a b\n", "partial/wiki.train.tokens")
        let partial = tempDir.appendingPathComponent("partial").path
        XCTAssertEqual(try openDataset(["dir": partial, "path": single], seqLen: 2).splitSizes, [144, 8, 8])
        // Errors say which source was read and why.
        let msg = errorMessage { _ = try openDataset(["dir": partial, "path": single], seqLen: 500) }
        XCTAssertTrue(
            msg.contains("path \(single)") && msg.contains("lacks wiki.valid.tokens, wiki.test.tokens")
                && msg.contains("train split has 144 tokens"), msg)
        let msg2 = errorMessage { _ = try openDataset(["dir": dir], seqLen: 50) }
        XCTAssertTrue(msg2.contains("dir \(dir)") && msg2.contains("train split has 7 tokens"), msg2)
    }

    func testDefaultDirResolvesUnderTheDataRoot() throws {
        // dir defaults to "$DATA/wikitext-103".
        let root = tempDir.appendingPathComponent("data").path
        _ = try writeWikiText("data/wikitext-103", train: "one two three four\n", valid: "one two\n", test: "four\n")
        let core = try makeInstance(try openPlugin("DatasetWord"), dims: ModelDims(seqLen: 3, dataRoot: root))
        let ds = try DatasetInstance(core)
        XCTAssertEqual(ds.splitSizes, [5, 3, 2])
        XCTAssertEqual(ds.vocabSize, 6)
        XCTAssertEqual(ds.sampleShape, [3])
    }

    // MARK: batches

    func testTrainWindowsAreStreamWindowsAndSeekable() throws {
        let text = syntheticCorpus(lines: 400, seed: 3)
        let path = try write(text, "c.txt")
        let hp: [String: Any] = ["path": path]
        let stream = try trainStream(hp)
        let T = 12, B = 6
        let ds = try openDataset(hp, seqLen: T, seed: 5)
        var starts = Set<Int>()
        for index in 0..<5 {
            let b = try XCTUnwrap(ds.read(.train, index: index, batchSize: B))
            XCTAssertEqual(b.rows, B)
            for r in 0..<B {
                let x = Array(b.inputsInt[(r * T)..<(r * T + T)]), y = Array(b.targets[(r * T)..<(r * T + T)])
                let s = (0...(stream.count - T - 1)).first { s in
                    Array(stream[s..<(s + T)]) == x && Array(stream[(s + 1)...(s + T)]) == y
                }
                XCTAssertNotNil(s, "batch \(index) row \(r) is not a train window")
                if let s { starts.insert(s) }
            }
        }
        XCTAssertGreaterThan(starts.count, 20)
        // Same index, same batch (also from a fresh instance: a resumed run); other index or seed differs.
        let b2 = try XCTUnwrap(ds.read(.train, index: 2, batchSize: 4))
        XCTAssertEqual(try XCTUnwrap(ds.read(.train, index: 2, batchSize: 4)).inputsInt, b2.inputsInt)
        XCTAssertEqual(
            try XCTUnwrap(openDataset(hp, seqLen: T, seed: 5).read(.train, index: 2, batchSize: 4)).inputsInt,
            b2.inputsInt)
        XCTAssertNotEqual(try XCTUnwrap(ds.read(.train, index: 3, batchSize: 4)).inputsInt, b2.inputsInt)
        XCTAssertNotEqual(
            try XCTUnwrap(openDataset(hp, seqLen: T, seed: 6).read(.train, index: 2, batchSize: 4)).inputsInt,
            b2.inputsInt)
        XCTAssertNotNil(try ds.read(.train, index: 1_000_000_000, batchSize: 2))
        XCTAssertEqual(try ds.numBatches(.train, batchSize: 4), Int.max)
    }

    func testTrainStartsStayInsideTheSplit() throws {
        // train_len = T + 2: starts 0 and 1 only.
        let dir = try writeWikiText("wt", train: "a b c d e f g\n", valid: "a b\n", test: "a\n")  // 8 tokens
        let ds = try openDataset(["dir": dir], seqLen: 6)
        var firsts = Set<Int32>()
        for index in 0..<20 {
            let b = try XCTUnwrap(ds.read(.train, index: index, batchSize: 4))
            for r in 0..<4 {
                firsts.insert(b.inputsInt[r * 6])
                // The last target: "g" (start 0) or the line's <eos> (start 1), never past the split.
                XCTAssertTrue([Int32(8), 1].contains(b.targets[r * 6 + 5]), "\(b.targets)")
            }
        }
        // All words once: byte order a..g = 2..8; <eos> 1. Starts 0 ("a" = 2) and 1 ("b" = 3).
        XCTAssertEqual(firsts, [2, 3])
    }

    func testEvalBatchesAreOrderedWindowsWithPaddedTail() throws {
        // valid: 10 tokens, T = 4 -> ceil(9 / 4) = 3 windows -> B = 2: 2 batches, the last with 1 row of 1 position.
        let dir = try writeWikiText("wt", train: "p q r s t u v w\n", valid: "p q r s t u v w x\n", test: "")
        let ds = try openDataset(["dir": dir], seqLen: 4)
        XCTAssertEqual(ds.splitSizes, [9, 10, 0])
        XCTAssertEqual(try ds.numBatches(.valid, batchSize: 2), 2)
        // p..w = 2..9 (byte order), x -> <unk>, <eos> 1.
        let b0 = try XCTUnwrap(ds.read(.valid, index: 0, batchSize: 2))
        XCTAssertEqual(b0.rows, 2)
        XCTAssertEqual(b0.inputsInt, [2, 3, 4, 5, 6, 7, 8, 9])
        XCTAssertEqual(b0.targets, [3, 4, 5, 6, 7, 8, 9, 0])
        let b1 = try XCTUnwrap(ds.read(.valid, index: 1, batchSize: 2))
        XCTAssertEqual(b1.rows, 1)
        XCTAssertEqual(b1.inputsInt, [0, 0, 0, 0, 0, 0, 0, 0])
        XCTAssertEqual(b1.targets, [1, -1, -1, -1, -1, -1, -1, -1])
        XCTAssertNil(try ds.read(.valid, index: 2, batchSize: 2))
        // An empty test file: no batches.
        XCTAssertEqual(try ds.numBatches(.test, batchSize: 2), 0)
        XCTAssertNil(try ds.read(.test, index: 0, batchSize: 2))
        XCTAssertEqual(try ds.core.metrics()["oov_rate_test"], [0])
    }

    /// order = streams (Transformer-XL): row b of batch i is segment i of stream b of the split's
    /// token stream, S = ⌊(len − 1) / B⌋ per stream; the valid pass ends with a padded segment.
    func testStreamOrder() throws {
        let text = syntheticCorpus(lines: 200, seed: 4)
        let path = try write(text, "s.txt")
        let stream = try trainStream(["path": path])
        let T = 5, B = 3
        let ds = try openDataset(["path": path, "order": "streams"], seqLen: T)
        XCTAssertTrue(ds.streams)
        let S = (stream.count - 1) / B
        for index in [0, 1, S / T, S / T + 1] {
            let b = try XCTUnwrap(ds.read(.train, index: index, batchSize: B))
            let seg = index % (S / T)
            for r in 0..<B {
                let start = r * S + seg * T
                XCTAssertEqual(
                    Array(b.inputsInt[(r * T)..<(r * T + T)]), Array(stream[start..<(start + T)]),
                    "train batch \(index) row \(r)")
                XCTAssertEqual(Array(b.targets[(r * T)..<(r * T + T)]), Array(stream[(start + 1)...(start + T)]))
            }
        }
        let n = try ds.numBatches(.valid, batchSize: B), Sv = (ds.splitSizes[1] - 1) / B
        XCTAssertEqual(n, (Sv + T - 1) / T)
        var real = 0
        for index in 0..<n {
            real += try XCTUnwrap(ds.read(.valid, index: index, batchSize: B)).targets.filter { $0 != -1 }.count
        }
        XCTAssertEqual(real, B * Sv)
        XCTAssertNil(try ds.read(.valid, index: n, batchSize: B))
        XCTAssertFalse(try openDataset(["path": path], seqLen: T).streams)
    }

    // MARK: errors

    func testErrorsNameTheFileAndTheSource() throws {
        // No data at all: the missing files, the empty path, and where WikiText comes from.
        let none = tempDir.appendingPathComponent("wikitext-103").path
        var msg = errorMessage { _ = try openDataset(["dir": none], seqLen: 4) }
        XCTAssertTrue(
            msg.contains("\(none)/wiki.train.tokens") && msg.contains("'path' is empty")
                && msg.contains("wikitext-103-v1.zip"), msg)
        msg = errorMessage { _ = try openDataset([:], seqLen: 4) }
        XCTAssertTrue(msg.contains("dir is empty") && msg.contains("'path' is empty"), msg)
        // A missing path.
        let gone = tempDir.appendingPathComponent("gone.txt").path
        msg = errorMessage { _ = try openDataset(["dir": none, "path": gone], seqLen: 4) }
        XCTAssertTrue(
            msg.contains("\(gone) not found") && msg.contains("lacks wiki.train.tokens") && msg.contains("IO"), msg)
        // Malformed UTF-8: file and line.
        let bad = try writeWikiText("bad", train: "good line\nstill good\n", valid: "a\n", test: "a\n")
        // 0xC3 0x41: malformed
        try write(Array("good line\n\nbad ".utf8) + [0xC3, 0x41, 0x0A], "bad/wiki.train.tokens")
        msg = errorMessage { _ = try openDataset(["dir": bad], seqLen: 1) }
        XCTAssertTrue(msg.contains("\(bad)/wiki.train.tokens:3: malformed UTF-8") && msg.contains("column 5"), msg)
        // Empty files.
        let emptyTrain = try writeWikiText("e", train: "", valid: "a\n", test: "a\n")
        msg = errorMessage { _ = try openDataset(["dir": emptyTrain], seqLen: 1) }
        XCTAssertTrue(msg.contains("\(emptyTrain)/wiki.train.tokens is empty"), msg)
        let emptyPath = try write("", "empty.txt")
        msg = errorMessage { _ = try openDataset(["path": emptyPath], seqLen: 1) }
        XCTAssertTrue(msg.contains("\(emptyPath) is empty"), msg)
        // A one-token valid split has no (input, target) pair.
        let oneValid = try writeWikiText("one", train: "a b c d\n", valid: "\n", test: "a b\n")
        msg = errorMessage { _ = try openDataset(["dir": oneValid], seqLen: 2) }
        XCTAssertTrue(msg.contains("valid split has 1 token"), msg)
        // Hyperparameters: the plugin's own checks and the schema's.
        let ok = try writeWikiText("ok", train: "a b c d\n", valid: "a b\n", test: "a b\n")
        msg = errorMessage { _ = try openDataset(["dir": ok, "max_vocab": 1], seqLen: 2) }
        XCTAssertTrue(msg.contains("max_vocab 1") && msg.contains(">= 2"), msg)
        msg = errorMessage { _ = try openDataset(["dir": ok, "min_count": 0], seqLen: 2) }
        XCTAssertTrue(msg.contains("min_count") && msg.contains("minimum"), msg)
        msg = errorMessage { _ = try openDataset(["dir": ok], seqLen: 0, modelSeqLen: 0) }
        XCTAssertTrue(msg.contains("seq_len"), msg)
        msg = errorMessage {
            _ = try openDataset(["path": emptyPath, "train_fraction": 0.9, "valid_fraction": 0.5], seqLen: 2)
        }
        XCTAssertTrue(msg.contains("exceeds 1"), msg)
    }

    func testSchema() throws {
        let lib = try openPlugin("DatasetWord")
        XCTAssertEqual(lib.name, "word")
        XCTAssertEqual(lib.version, "1.1.0")
        XCTAssertEqual(
            lib.schema.map(\.name),
            ["dir", "path", "train_fraction", "valid_fraction", "seq_len", "min_count", "max_vocab", "order"])
        let dir = try XCTUnwrap(lib.schema.first { $0.name == "dir" })
        XCTAssertEqual(dir.defaultString, "$DATA/wikitext-103")
        XCTAssertTrue(dir.isPath && dir.optional)
        let path = try XCTUnwrap(lib.schema.first { $0.name == "path" })
        XCTAssertTrue(path.isPath && path.optional && path.defaultString.isEmpty)
    }

    // MARK: the tokenizer ("vqmoe.tokenizer/1")

    func testTokenizerEncodesLikeTheCorpusAndDecodesWithSpacing() throws {
        // Vocabulary as in testHandCheckedTokensVocabularyAndOOV: <unk> 0, <eos> 1, a 2, b 3, c 4.
        let train = "b a c a\n\nb <unk>\n", valid = "a d <unk>\nc", test = "e e\n"
        let dir = try writeWikiText("wt", train: train, valid: valid, test: test)
        let ds = try openDataset(["dir": dir], seqLen: 2)
        let tok = try Tokenizer(dataset: ds, vocab: ds.vocabSize)
        XCTAssertEqual(tok.unit, .word)
        // A split's file encodes to that split's tokens: unknown words are <unk>, a last line
        // without a newline still ends in <eos>.
        XCTAssertEqual(try tok.encode(bytes: Array(train.utf8)), try trainStream(["dir": dir]))
        XCTAssertEqual(try tok.encode(bytes: Array(valid.utf8)), try evalStream(ds, .valid))
        XCTAssertEqual(try tok.encode(bytes: Array(test.utf8)), try evalStream(ds, .test))
        XCTAssertEqual(try tok.encode(bytes: []), [])
        // Decoding: a space before each word but the first of a line, <eos> as a newline.
        XCTAssertEqual(String(decoding: try tok.decode([3, 2, 4, 1, 1, 2, 0, 1]), as: UTF8.self), "b a c\n\na <unk>\n")
        XCTAssertEqual(try tok.decode(2, after: 3), Array(" a".utf8))
        XCTAssertEqual(try tok.decode(2, after: 1), Array("a".utf8))
        XCTAssertEqual(try tok.decode(2, after: -1), Array("a".utf8))
        // A prompt continues its last line: no <eos> unless it ends in a line break.
        XCTAssertEqual(try tok.encode(prompt: "a  b\tzzz"), [2, 3, 0])
        XCTAssertEqual(try tok.encode(prompt: "a b\n"), [2, 3, 1])
        XCTAssertEqual(try tok.encode(prompt: "\n"), [1])
        XCTAssertEqual(
            errorMessage { _ = try tok.decode(5, after: -1) },
            "dataset 'word' (test.word) failed in tokenizer decode: INVALID_ARGUMENT: token 5 is outside the vocabulary [0, 5)"
        )
        XCTAssertTrue(
            errorMessage { _ = try tok.encode(bytes: [0x61, 0x20, 0xFF]) }.contains(
                "the text:1: malformed UTF-8 (byte 0xff at column 3, file offset 2)"))
    }

    // MARK: real data

    func testRealTinyShakespeareThroughPath() throws {
        guard let dir = sharedDataDirectory() else { throw XCTSkip("../shared/data not present") }
        let path = dir + "/tinyshakespeare/input.txt"
        guard FileManager.default.fileExists(atPath: path) else { throw XCTSkip("\(path) not present") }
        let hp: [String: Any] = ["path": path]
        let ds = try openDataset(hp, seqLen: 64)
        // 40,000 lines, 202,651 words + 40,000 <eos> = 242,651 tokens; 90/5/5 by tokens.
        XCTAssertEqual(ds.splitSizes, [218_385, 12_133, 12_133])
        XCTAssertEqual(ds.vocabSize, 23_865)
        let m = try ds.core.metrics()
        XCTAssertEqual(m["oov_rate_valid"]?.first ?? -1, 1049.0 / 12_133.0, accuracy: 1e-12)
        XCTAssertEqual(m["oov_rate_test"]?.first ?? -1, 1282.0 / 12_133.0, accuracy: 1e-12)
        XCTAssertEqual(m["oov_rate_train"], [0])

        // Round trip: ids -> words (through the reference vocabulary) is each line's
        // whitespace split + <eos>, with OOV words of valid/test read as <unk>.
        let text = try String(contentsOfFile: path, encoding: .utf8)
        var words: [String] = []
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).dropLast() {
            words += line.split(whereSeparator: { $0 == " " || $0 == "\t" }).map(String.init) + ["<eos>"]
        }
        XCTAssertEqual(words.count, 242_651)
        let tokens = words.map { Array($0.utf8) }
        XCTAssertEqual(referenceTokens(text), tokens)
        let vocab = referenceVocab(Array(tokens[..<218_385]))
        XCTAssertEqual(vocab.count, 23_865)
        XCTAssertEqual(vocab[2...5].map { String(decoding: $0, as: UTF8.self) }, ["the", "I", "to", "and"])
        let decode = { (ids: [Int32]) in ids.map { String(decoding: vocab[Int($0)], as: UTF8.self) } }
        let known = Set(vocab.map { String(decoding: $0, as: UTF8.self) })
        XCTAssertEqual(decode(try trainStream(hp)), Array(words[..<218_385]))
        var streams = try trainStream(hp)
        for (split, range) in [(Split.valid, 218_385..<230_518), (Split.test, 230_518..<242_651)] {
            let expected = words[range].map { known.contains($0) ? $0 : "<unk>" }
            let ids = try evalStream(ds, split, batchSize: 16)
            XCTAssertEqual(decode(ids), expected, split.name)
            streams += ids
        }

        // The tokenizer: the whole file encodes to the three splits' tokens, and decodes to
        // its lines with single spaces between words (unknown words as <unk>).
        let tok = try Tokenizer(dataset: ds, vocab: ds.vocabSize)
        let ids = try tok.encode(bytes: Array(text.utf8))
        XCTAssertEqual(ids, streams)
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false).dropLast().map { line in
            line.split(whereSeparator: { $0 == " " || $0 == "\t" }).map { known.contains(String($0)) ? $0 : "<unk>" }
                .joined(separator: " ")
        }
        XCTAssertEqual(String(decoding: try tok.decode(ids), as: UTF8.self), lines.joined(separator: "\n") + "\n")
    }
}

/// The framework's generic plugin check, default and non-default modes.
final class DatasetWordCheckerTests: XCTestCase {
    func testPluginCheckerPasses() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vqmoe-word-check-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let text = String(
            repeating: "To be , or not to be , that is the question :\nWhether 'tis nobler in the mind\n\n", count: 20)
        let file = dir.appendingPathComponent("text.txt")
        try Data(text.utf8).write(to: file)
        let wt = dir.appendingPathComponent("wt")
        try FileManager.default.createDirectory(at: wt, withIntermediateDirectories: true)
        for (name, body) in [
            ("train", text), ("valid", "To be or not\nthe unknown question\n"), ("test", "nobler mind\n"),
        ] {
            try Data(body.utf8).write(to: wt.appendingPathComponent("wiki.\(name).tokens"))
        }
        let modes: [[String: Any]] = [
            ["path": file.path],
            ["path": file.path, "min_count": 20, "max_vocab": 8, "train_fraction": 0.8, "valid_fraction": 0.2],
            ["dir": wt.path, "seq_len": 3],
        ]
        for hp in modes {
            let results = PluginChecker(library: try openPlugin("DatasetWord"), hyperparameters: hp).run()
            XCTAssertTrue(results.allSatisfy(\.passed), "\(hp)\n" + results.map(\.description).joined(separator: "\n"))
            XCTAssertGreaterThanOrEqual(results.count, 10)
        }
    }
}
