import Foundation
import VQMoE
import XCTest

/// The inference commands end to end on a run the test trains: `vqmoe sample` (greedy is
/// reproducible and streams the prompt then the tokens; bad options are usage errors),
/// `vqmoe eval --text` (a file's bits per character, every character once; a word model's
/// perplexity), word-level prompts and samples, and
/// `vqmoe bench --sample` (a JSON line with the generation figures).
final class GenerationCommandTests: XCTestCase {
    let vqmoe = "\(buildDir)/vqmoe"

    private func run(_ args: [String]) throws -> (Int32, String) {
        try runProcess(vqmoe, ["--registry", "\(repoRoot)/registry.json"] + args, cwd: repoRoot)
    }

    func testSampleEvalTextAndBenchSample() throws {
        guard let data = DataLocator.defaultRoot() else { throw XCTSkip("no data directory") }
        let dir = try makeTempDir("generate")
        let (s0, o0) = try run([
            "train", "configs/enwik8_vqmoe.json", "--out", "\(dir)/run", "--set", "train.steps=20", "--set",
            "train.eval_every=10", "--set", "model.n_layer=1", "--set", "model.seq_len=32",
        ])
        XCTAssertEqual(s0, 0, o0)

        let greedy = ["sample", "\(dir)/run", "--prompt", "The ", "--tokens", "40", "--temperature", "0"]
        let (s1, a) = try run(greedy)
        let (_, b) = try run(greedy)
        XCTAssertEqual(s1, 0, a)
        XCTAssertEqual(a, b)
        XCTAssertTrue(a.hasPrefix("The "), a)
        XCTAssertTrue(a.hasSuffix("\n") && a.count > 4, a)  // the prompt, the tokens (any bytes), a newline
        let (s2, batch) = try run(["sample", "\(dir)/run", "--prompt", "a", "--tokens", "10", "--batch", "2"])
        XCTAssertEqual(s2, 0, batch)
        XCTAssertTrue(
            batch.contains("--- sample 1 (seed 1, stream 0)") && batch.contains("--- sample 2 (seed 1, stream 1)"))
        for bad in [["--top-p", "0"], ["--temperature", "-1"], ["--tokens", "x"]] {
            let (s, o) = try run(["sample", "\(dir)/run"] + bad)
            XCTAssertEqual(s, 64, "\(bad): \(o)")
        }

        let text = "\(dir)/text.txt"
        try Data(try Data(contentsOf: URL(fileURLWithPath: "\(data)/tinyshakespeare/input.txt")).prefix(2000))
            .write(to: URL(fileURLWithPath: text))
        let (s3, e) = try run(["eval", "\(dir)/run", "--text", text, "--stride", "16"])
        XCTAssertEqual(s3, 0, e)
        XCTAssertTrue(e.contains("\(text): 2000 characters, loss "), e)
        XCTAssertTrue(e.contains("windows of 32, stride 16"), e)
        let (s4, o4) = try run(["eval", "\(dir)/run", "--text", text, "--stride", "33"])
        XCTAssertEqual(s4, 64, o4)

        // The sidecar describes the model as built, and `eval --logits` exports a batch's logits.
        let side = try XCTUnwrap(
            JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "\(dir)/run/best.json")))
                as? [String: Any])
        let arch = try XCTUnwrap(side["model"] as? [String: Any])
        XCTAssertEqual(arch["n_layer"] as? Int, 1)
        XCTAssertEqual((arch["quantizer"] as? [String: Any])?["name"] as? String, "vqvae")
        let (s9, o9) = try run(["eval", "\(dir)/run", "--logits", "\(dir)/logits.safetensors"])
        XCTAssertEqual(s9, 0, o9)
        XCTAssertEqual(try Checkpoint.read(path: "\(dir)/logits.safetensors").tensors["logits"]?.shape.last, 256)
        XCTAssertEqual(try run(["eval", "\(dir)/run", "--logits", "\(dir)/l.safetensors", "--batches", "0"]).0, 64)

        // A word-level model: prompts are words, samples are words with spaces and newlines,
        // and a text is scored in perplexity per word.
        let config = "\(dir)/word.json"
        let json: [String: Any] = [
            "name": "word", "seed": 3,
            "data": ["name": "word", "dir": "", "path": "$DATA/tinyshakespeare/input.txt", "max_vocab": 2000],
            "model": [
                "n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 16,
                "ffn": [
                    "mode": "vqmoe", "d_inner": 64, "n_experts": 4, "router": ["name": "smoe"],
                    "quantizer": ["name": "vqvae"],
                ],
            ],
            "head": ["name": "lm"], "train": ["steps": 10, "batch_size": 4, "eval_every": 10, "eval_batches": 2],
        ]
        try JSONSerialization.data(withJSONObject: json).write(to: URL(fileURLWithPath: config))
        let (s6, o6) = try run(["train", config, "--out", "\(dir)/word"])
        XCTAssertEqual(s6, 0, o6)
        let (s7, w) = try run([
            "sample", "\(dir)/word", "--prompt", "ROMEO: thou art", "--tokens", "30", "--temperature", "0",
        ])
        XCTAssertEqual(s7, 0, w)
        // The prompt's words, then a space before the next word or a newline for <eos>.
        XCTAssertTrue(w.hasPrefix("ROMEO: thou art ") || w.hasPrefix("ROMEO: thou art\n"), w)
        XCTAssertFalse(w.contains("  "), w)
        let (s8, e8) = try run(["eval", "\(dir)/word", "--text", text])
        XCTAssertEqual(s8, 0, e8)
        XCTAssertTrue(e8.contains("tokens (words and <eos>), loss ") && e8.contains("perplexity "), e8)

        let (s5, j) = try run(["bench", "configs/bench/smoe.json", "--sample", "--tokens", "40", "--json"])
        XCTAssertEqual(s5, 0, j)
        let line = try XCTUnwrap(j.split(separator: "\n").last { $0.hasPrefix("{") })
        let report = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        XCTAssertEqual(report["mode"] as? String, "sample")
        XCTAssertEqual(report["tokens"] as? Int, 40)
        XCTAssertGreaterThan(report["tokens_per_s"] as? Double ?? 0, 0)
    }
}
