import Foundation
import VQMoE
import XCTest

/// What a loader outside the engine reads: the `model` entry of a checkpoint sidecar
/// (`Architecture`: every default resolved) and `vqmoe eval --logits` (`Trainer.exportLogits`:
/// the inputs, targets and logits of the first batches, Transformer-XL's memory carried).
final class ExportLogitsTests: XCTestCase {
    func trainer(xl: Bool) throws -> Trainer {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory (run scripts/get-data.sh)") }
        var model: [String: Any] = [
            "n_layer": 2, "n_head": 2, "d_model": 16, "seq_len": 8, "init_std": 0.3,
            "ffn": [
                "mode": "vqmoe", "d_inner": 24, "n_experts": 4, "router": ["name": "smoe"],
                "quantizer": ["name": "rvq", "levels": 2], "discrete_input": "ste",
            ],
        ]
        var data: [String: Any] = ["name": "char", "path": "$DATA/enwik8-mini/enwik8-mini"]
        if xl {
            model["backbone"] = "transformer_xl"
            model["mem_len"] = 8
            data["order"] = "streams"
        }
        let json: [String: Any] = [
            "name": "export", "seed": 5, "data": data, "model": model, "head": ["name": "lm"],
            "train": ["steps": 3, "batch_size": 3],
        ]
        let registry = try Registry.load(
            registryPath: "\(engineRepoRoot)/registry.json", binDir: Registry.executableDirectory(), searchPath: [])
        return try Trainer(
            config: try RunConfig(json: json), registry: registry, outDir: NSTemporaryDirectory(), quiet: true)
    }

    /// The architecture names the backbone, the FFN composition and every hyperparameter of
    /// every plugin, the defaults the config left out included.
    func testArchitectureResolvesEveryDefault() throws {
        let arch = Architecture(try trainer(xl: true).model).json
        XCTAssertEqual(arch["backbone"] as? String, "transformer_xl")
        XCTAssertEqual(arch["attention"] as? String, "relative")
        XCTAssertEqual(arch["mem_len"] as? Int, 8)
        let ffn = try XCTUnwrap(arch["ffn"] as? [String: Any])
        XCTAssertEqual(ffn["paths"] as? [String], ["routed", "discrete"])
        XCTAssertEqual(ffn["gated"] as? Bool, true)
        XCTAssertEqual(ffn["discrete_input"] as? String, "ste")
        XCTAssertEqual(ffn["activation"] as? String, "gelu")
        let router = try XCTUnwrap(arch["router"] as? [String: Any])
        XCTAssertEqual(router["name"] as? String, "smoe")
        let rhp = try XCTUnwrap(router["hyperparameters"] as? [String: Any])
        XCTAssertEqual(rhp["k"] as? Int, 2)  // the schema default, not in the config
        XCTAssertEqual(rhp["weights"] as? String, "kept")
        let quantizer = try XCTUnwrap(arch["quantizer"] as? [String: Any])
        XCTAssertEqual((quantizer["hyperparameters"] as? [String: Any])?["levels"] as? Int, 2)
        XCTAssertEqual((quantizer["create_info"] as? [String: Any])?["n_codes"] as? Int, 4)
        let head = try XCTUnwrap(arch["head"] as? [String: Any])
        XCTAssertEqual(head["n_out"] as? Int, 256)
        XCTAssertEqual(head["per_token"] as? Bool, true)
        XCTAssertTrue(JSONSerialization.isValidJSONObject(arch))
    }

    /// The exported logits give, by cross-entropy on the exported targets, the loss of an
    /// evaluation over the same batches (Transformer-XL: the second batch over the first one's
    /// memory, so it fails when the memory is not carried).
    func testExportedLogitsAreTheEvaluation() throws {
        for xl in [false, true] {
            let t = try trainer(xl: xl)
            let path = NSTemporaryDirectory() + "logits-\(UUID().uuidString).safetensors"
            try t.exportLogits(.test, batches: 2, path: path)
            let file = try Checkpoint.read(path: path)
            XCTAssertEqual(file.metadata["batches"], "2")
            XCTAssertEqual(file.tensors["inputs"]?.shape, [6, 8])
            XCTAssertEqual(file.tensors["targets"]?.shape, [6, 8])
            let logits = try XCTUnwrap(file.tensors["logits"])
            XCTAssertEqual(logits.shape, [48, 256])
            let z = logits.data.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
            let y = file.tensors["targets"]!.data.withUnsafeBytes { Array($0.bindMemory(to: Int32.self)) }
            var sum = 0.0
            for r in 0..<48 {
                let row = z[(r * 256)..<((r + 1) * 256)].map(Double.init)
                let m = row.max()!
                sum += m + log(row.reduce(0) { $0 + exp($1 - m) }) - row[Int(y[r])]
            }
            let eval = try t.evaluate(.test, maxBatches: 2)
            XCTAssertEqual(eval.count, 48)
            XCTAssertEqual(sum / 48, eval.loss, accuracy: 1e-5 * eval.loss, "xl \(xl)")
        }
    }
}
