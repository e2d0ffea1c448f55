import Foundation
import VQMoE
import XCTest

/// `vqmoe eval --text`: scoring a text equals the dataset's own evaluation when the text is that
/// split (GPT-2 with stride = seq_len: its non-overlapping windows; Transformer-XL: its ordered
/// stream with memory), and every character is scored once at any stride.
final class TextScoreTests: XCTestCase {
    let seqLen = 16

    /// A trainer over the first 1,000 bytes of enwik8-mini split 800/100/100, and the test split's bytes.
    func setup(xl: Bool, batch: Int) throws -> (Trainer, [Int32]) {
        guard let root = DataLocator.defaultRoot() else { throw XCTSkip("no data directory (run scripts/get-data.sh)") }
        let bytes = try Data(contentsOf: URL(fileURLWithPath: "\(root)/enwik8-mini/enwik8-mini")).prefix(1000)
        let file = NSTemporaryDirectory() + "text-\(UUID().uuidString).txt"
        try bytes.write(to: URL(fileURLWithPath: file))
        var model: [String: Any] = [
            "n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": seqLen, "init_std": 0.3,
            "ffn": [
                "mode": "vqmoe", "d_inner": 48, "n_experts": 4, "router": ["name": "smoe"],
                "quantizer": ["name": "vqvae"],
            ],
        ]
        var data: [String: Any] = ["name": "char", "path": file, "train_fraction": 0.8, "valid_fraction": 0.1]
        if xl {
            model["backbone"] = "transformer_xl"
            model["mem_len"] = 8
            data["order"] = "streams"
        }
        let json: [String: Any] = [
            "name": "score", "seed": 4, "data": data, "model": model, "head": ["name": "lm"],
            "train": ["steps": 1, "batch_size": batch],
        ]
        let registry = try Registry.load(
            registryPath: "\(engineRepoRoot)/registry.json", binDir: Registry.executableDirectory(), searchPath: [])
        let trainer = try Trainer(
            config: try RunConfig(json: json), registry: registry, outDir: NSTemporaryDirectory(), quiet: true)
        return (trainer, bytes.suffix(100).map(Int32.init))
    }

    func testStrideSeqLenEqualsTheSplitsEvaluation() throws {
        let (trainer, test) = try setup(xl: false, batch: 3)
        let split = try trainer.evaluate(.test)
        let text = try TextScore.score(model: trainer.model, tokens: test, stride: seqLen, batch: 4)
        XCTAssertEqual(text.count, 99)
        XCTAssertEqual(split.count, 99)
        XCTAssertEqual(text.lossSum / 99, split.loss, accuracy: 1e-5 * split.loss)
        // Overlapping windows: still every character once, with more context, so a different loss.
        let half = try TextScore.score(model: trainer.model, tokens: test, stride: seqLen / 2, batch: 4)
        XCTAssertEqual(half.count, 99)
        XCTAssertNotEqual(half.lossSum, text.lossSum)
        XCTAssertEqual(try TextScore.score(model: trainer.model, tokens: test, stride: 3, batch: 1).count, 99)
    }

    func testTransformerXLEqualsTheStreamsEvaluation() throws {
        let (trainer, test) = try setup(xl: true, batch: 1)
        let split = try trainer.evaluate(.test)
        let text = try TextScore.score(model: trainer.model, tokens: test, stride: seqLen)
        XCTAssertEqual(text.count, split.count)
        XCTAssertEqual(text.lossSum / Double(text.count), split.loss, accuracy: 1e-5 * split.loss)
    }

    func testBadStrideAndShortText() throws {
        let (trainer, test) = try setup(xl: false, batch: 1)
        XCTAssertThrowsError(try TextScore.score(model: trainer.model, tokens: test, stride: seqLen + 1))
        XCTAssertThrowsError(try TextScore.score(model: trainer.model, tokens: [5], stride: 4))
        XCTAssertThrowsError(try TextScore.score(model: trainer.model, tokens: [5, 300], stride: 4))
    }
}
