import Foundation
import VQMoE
import XCTest

/// The host's checks on what a dataset plugin hands the model: token inputs inside the
/// vocabulary, targets inside the vocabulary (or VQMOE_PAD_TARGET). Without them a token or
/// target past the table is an out-of-bounds read of the embedding or the loss.
final class DatasetInstanceTests: XCTestCase {
    var dir = ""

    override func setUpWithError() throws {
        dir = try makeTempDir("dataset-instance")
        // 200 bytes of text: every byte value is a lower-case letter or a space (32..122).
        try String(repeating: "the quick brown fox jumps ", count: 8).write(
            toFile: "\(dir)/text.txt", atomically: true, encoding: .utf8)
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(atPath: dir) }

    /// The C dataset template (a byte-level LM) with `edits` applied to its source, built and opened.
    func template(_ name: String, _ edits: [(String, String)]) throws -> DatasetInstance {
        var source = try String(
            contentsOfFile: "\(repoRoot)/Plugins/templates/c/dataset/my_dataset.c", encoding: .utf8)
        for (old, new) in edits {
            XCTAssertTrue(source.contains(old), "the template no longer has `\(old)`")
            source = source.replacingOccurrences(of: old, with: new)
        }
        source = source.replacingOccurrences(of: "\"my_dataset\"", with: "\"\(name)\"")
        try source.write(toFile: "\(dir)/\(name).c", atomically: true, encoding: .utf8)
        try compilePlugin("\(dir)/\(name).c", to: "\(dir)/lib\(name).so")
        let lib = try PluginLibrary.open("\(dir)/lib\(name).so")
        let hp = try ResolvedHyperparameters(
            schema: lib.schema, values: ["path": "\(dir)/text.txt"], keyPath: "data")
        return try DatasetInstance(
            PluginInstance(
                library: lib, instanceName: "data", dims: ModelDims(seqLen: 8), hyperparameters: hp, seed: 1))
    }

    func testTemplateBatchesPass() throws {
        let ds = try template("ok_dataset", [])
        let b = try XCTUnwrap(try ds.read(.train, index: 0, batchSize: 2))
        XCTAssertEqual(b.inputsInt.count, 16)
        XCTAssertTrue(b.inputsInt.allSatisfy { $0 == 32 || (97...122).contains($0) })
    }

    func testTokenOutsideVocabularyIsRefused() throws {
        // Bytes up to 122 against a vocabulary of 100.
        let ds = try template("small_vocab", [("out->vocab_size = 256;", "out->vocab_size = 100;")])
        let message = errorMessage { _ = try ds.read(.train, index: 0, batchSize: 2) }
        XCTAssertTrue(message.contains("dataset 'small_vocab'"), message)
        XCTAssertTrue(message.contains("read_batch(train, 0) gave input token"), message)
        XCTAssertTrue(message.contains("outside the vocabulary [0, 100)"), message)
    }

    func testNegativeTargetIsRefused() throws {
        // Targets -2 - byte: negative and not VQMOE_PAD_TARGET (-1).
        let ds = try template(
            "bad_targets",
            [
                (
                    "io.targets[r * t + i] = r < out->rows ? bytes[at + i + 1]",
                    "io.targets[r * t + i] = r < out->rows ? -2 - bytes[at + i + 1]"
                )
            ])
        let message = errorMessage { _ = try ds.read(.valid, index: 0, batchSize: 2) }
        XCTAssertTrue(message.contains("read_batch(valid, 0) gave target -"), message)
        XCTAssertTrue(message.contains("outside [0, 256) (vocabulary) and not VQMOE_PAD_TARGET"), message)
    }
}
