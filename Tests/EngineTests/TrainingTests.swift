import Foundation
import VQMoE
import XCTest

let engineRepoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().path

/// Configs, schedule, clipping, checkpoints and a short real training run.
final class TrainingTests: XCTestCase {
    func registry() throws -> Registry {
        try Registry.load(
            registryPath: "\(engineRepoRoot)/registry.json", binDir: Registry.executableDirectory(), searchPath: [])
    }

    /// A tiny enwik8-mini config (the real data; skipped where it cannot be found).
    func tinyConfig(_ mode: String, _ extra: [String: Any] = [:]) throws -> [String: Any] {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory (run scripts/get-data.sh)") }
        var ffn: [String: Any] = ["mode": mode, "d_inner": 64]
        if mode != "dense" { ffn["n_experts"] = 4; ffn["router"] = ["name": "smoe", "k": 2] }
        if mode == "vqmoe" {  // plain VQ-VAE: a trained codebook (vqvae's defaults make it an EMA state)
            ffn["quantizer"] = ["name": "vqvae", "ema": false, "kmeans_init": false, "dead_code_threshold": 0.0]
        }
        var cfg: [String: Any] = [
            "name": "tiny_\(mode)", "seed": 3,
            "data": ["name": "char", "path": "$DATA/enwik8-mini/enwik8-mini"],
            "model": ["n_layer": 2, "n_head": 2, "d_model": 32, "seq_len": 32, "ffn": ffn],
            "head": ["name": "lm"],
            "train": [
                "steps": 60, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "eval_every": 30, "eval_batches": 4,
                "log_every": 10,
            ],
        ]
        for (k, v) in extra { try setPath(&cfg, k, v) }
        return cfg
    }

    func setPath(_ obj: inout [String: Any], _ path: String, _ value: Any) throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("cfg-\(UUID().uuidString).json").path
        try JSONSerialization.data(withJSONObject: obj).write(to: URL(fileURLWithPath: file))
        obj = try ConfigReader.load(file: file, overrides: [path: value])
    }

    /// A run's metrics.jsonl lines without the wall-clock field, keys sorted (resume comparisons).
    func curve(_ dir: String) throws -> [String] {
        try String(contentsOfFile: "\(dir)/metrics.jsonl", encoding: .utf8).split(separator: "\n").map { line in
            var o = try JSONSerialization.jsonObject(with: Data(line.utf8)) as! [String: Any]
            o.removeValue(forKey: "tokens_per_s")
            return String(
                decoding: try JSONSerialization.data(withJSONObject: o, options: [.sortedKeys]), as: UTF8.self)
        }
    }

    func configError(_ json: [String: Any]) -> String {
        do {
            let cfg = try RunConfig(json: json)
            _ = try ModelBuilder(config: cfg, registry: try registry()).build()
            XCTFail("accepted a bad config")
        } catch let e as VQMoEError { return e.message } catch { XCTFail("\(error)") }
        return ""
    }

    func testConfigErrorsNameTheKeyPath() throws {
        let base = try tinyConfig("smoe")
        func with(_ k: String, _ v: Any) throws -> [String: Any] { var c = base; try setPath(&c, k, v); return c }
        XCTAssertEqual(
            configError(try with("train.stpes", 5)),
            "train.stpes: unknown key; known: steps, eps, beta1, beta2, lr, threads, min_lr, schedule, optimizer, parallel, batch_size, log_every, eval_batches, eval_every, grad_clip, warmup_steps, tensorboard, weight_decay, checkpoint_every"
        )
        XCTAssertEqual(
            configError(try with("model.n_layer", "four")), "model.n_layer: expected an integer, got \"four\"")
        // `--set` keys are names joined by single dots: an empty segment is an error, not skipped.
        for key in ["model..d_model", ".model.d_model", "model.d_model."] {
            XCTAssertThrowsError(try with(key, 16), key) {
                XCTAssertEqual(
                    ($0 as? VQMoEError)?.message,
                    "--set \(key): empty key segment (keys are names joined by single dots)")
            }
        }
        XCTAssertEqual(configError(try with("train.lr", -1)), "train.lr: -1.0 is below the minimum 0.0")
        XCTAssertEqual(
            configError(try with("model.ffn.mode", "moe")),
            "model.ffn.mode: 'moe' is not one of smoe, vqmoe, dense, shared, vqmoe_finetune")
        XCTAssertEqual(configError(try with("model.ffn.router.k", 0)), "model.ffn.router.k: 0 is below the minimum 1")
        XCTAssertEqual(
            configError(try with("model.ffn.router.kk", 2)),
            "model.ffn.router.kk: unknown hyperparameter; known: k, bias, weights, init_std, balance_weight")
        XCTAssertTrue(
            configError(try with("model.ffn.router.name", "smeo")).hasPrefix(
                "model.ffn.router.name: unknown router 'smeo'; known routers: smoe"))
        XCTAssertEqual(
            configError(try with("model.d_model", 33)), "model.d_model (33) must be divisible by model.n_head (2)")
        // LFQ needs a power-of-two codebook: refused at create with the plugin and the reason.
        var lfq = try with("model.ffn.quantizer", ["name": "lfq"])
        try setPath(&lfq, "model.ffn.mode", "vqmoe")
        try setPath(&lfq, "model.ffn.n_codes", 12)
        let lfqMessage = configError(lfq)
        XCTAssertTrue(
            lfqMessage.contains("'lfq'") && lfqMessage.contains("K = 12") && lfqMessage.contains("power of two"),
            lfqMessage)
        var noRouter = base
        var model = noRouter["model"] as! [String: Any]
        var ffn = model["ffn"] as! [String: Any]
        ffn.removeValue(forKey: "router")
        model["ffn"] = ffn
        noRouter["model"] = model
        XCTAssertTrue(configError(noRouter).hasPrefix("model.ffn.router: mode 'smoe' needs a router"))
    }

    /// metrics.jsonl never drops a line: a non-finite number is written as null; resuming keeps
    /// only the lines of the steps the checkpoint covers.
    func testMetricsLogWritesNonFiniteAsNull() throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("metrics-\(UUID().uuidString).jsonl")
            .path
        var log: MetricsLog? = try MetricsLog(path: path, keepingStepsBelow: nil)
        var record = TrainRecord(
            step: 3, loss: .nan, taskLoss: 2, bpc: .infinity, auxLoss: 0, vqLoss: 0, lr: 1e-3, gradNorm: 1,
            tokensPerSecond: 10)
        record.codeCounts = [[1, .nan]]
        try log?.append(record)
        try log?.append(
            EvalRecord(step: 9, split: .valid, result: EvalResult(loss: 1, count: 4, accuracy: 0.5), isLM: true))
        XCTAssertEqual(log?.nonFiniteLines, 1)  // the event is counted (and reported once on stderr)
        log = nil
        let lines = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n")
        XCTAssertEqual(lines.count, 2)
        let o = try XCTUnwrap(JSONSerialization.jsonObject(with: Data(lines[0].utf8)) as? [String: Any])
        XCTAssertTrue(o["loss"] is NSNull && o["bpc"] is NSNull, "\(o)")
        XCTAssertEqual(o["task_loss"] as? Double, 2)
        XCTAssertTrue((o["code_counts"] as? [[Any]])?[0][1] is NSNull, "\(o)")
        _ = try MetricsLog(path: path, keepingStepsBelow: 5)
        XCTAssertEqual(try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n").count, 1)
    }

    /// Every run writes one TensorBoard event file per process (a resumed run a second one);
    /// `train.tensorboard = false` writes none, and --force removes them with the run.
    func testTensorBoardEventFilesFollowTheRun() throws {
        var json = try tinyConfig("smoe")
        try setPath(&json, "train.steps", 4)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("tb-\(UUID().uuidString)").path
        func events() throws -> [String] {
            try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasPrefix("events.out.tfevents.") }
        }
        let cfg = try RunConfig(json: json)
        _ = try Trainer(config: cfg, registry: try registry(), outDir: dir, quiet: true).run(stopAfter: 2)
        XCTAssertEqual(try events().count, 1)
        _ = try Trainer(config: cfg, registry: try registry(), outDir: dir, quiet: true).run(resume: true)
        XCTAssertEqual(try events().count, 2)
        try setPath(&json, "train.tensorboard", false)
        _ = try Trainer(config: try RunConfig(json: json), registry: try registry(), outDir: dir, quiet: true).run(
            force: true)
        XCTAssertEqual(try events(), [])
        XCTAssertTrue(FileManager.default.fileExists(atPath: "\(dir)/metrics.jsonl"))
    }

    /// The model's n_codes is the codebook size: a quantizer reporting another K is refused with
    /// the fix; `codebook_size = 0` (the default) takes n_codes.
    func testQuantizerCodebookMustMatchNCodes() throws {
        var json = try tinyConfig("vqmoe")
        try setPath(&json, "model.ffn.quantizer.codebook_size", 1000)
        XCTAssertEqual(
            configError(json),
            "model.ffn.quantizer: 'vqvae' reports K = 1000 codes but model.ffn.n_codes is 4: set model.ffn.n_codes = 1000 "
                + "(a codebook_size of 0 takes the model's n_codes)")
        try setPath(&json, "model.ffn.n_codes", 1000)
        XCTAssertNoThrow(try ModelBuilder(config: try RunConfig(json: json), registry: try registry()).build())
    }

    /// finetune.freeze: absent → router and quantizer plus every parameter a plugin flags
    /// VQMOE_BUF_FREEZE_FT (the VQ-VAE codebook is); given → that list alone.
    func testFreezeDefaults() throws {
        var json = try tinyConfig("vqmoe")
        json["finetune"] = ["from": "x"]
        let absent = try XCTUnwrap(try RunConfig(json: json).finetune)
        XCTAssertTrue(absent.freezeIsDefault)
        XCTAssertEqual(absent.freeze, ["router", "quantizer"])
        json["finetune"] = ["from": "x", "freeze": ["experts"]]
        XCTAssertFalse(try XCTUnwrap(try RunConfig(json: json).finetune).freezeIsDefault)
        let model = try ModelBuilder(config: try RunConfig(json: json), registry: try registry()).build().model
        let flagged = model.parameters.filter(\.freezeWhenFineTuning).map(\.name)
        XCTAssertEqual(flagged, ["layers.0.ffn.quantizer.codebook", "layers.1.ffn.quantizer.codebook"])
    }

    func testLearningRateSchedule() {
        var c = TrainConfig()
        c.steps = 100; c.lr = 1e-3; c.minLR = 1e-4; c.warmupSteps = 9
        XCTAssertEqual(learningRate(step: 0, config: c), 1e-4, accuracy: 1e-9)  // (0+1)/(9+1)·lr
        XCTAssertEqual(learningRate(step: 8, config: c), 9e-4, accuracy: 1e-9)
        XCTAssertEqual(learningRate(step: 9, config: c), 1e-3, accuracy: 1e-9)  // cosine starts at lr
        XCTAssertEqual(
            learningRate(step: 9 + 91 / 2, config: c), 1e-4 + 0.5 * 9e-4 * (1 + cos(Float.pi * 45 / 91)), accuracy: 1e-8
        )
        XCTAssertEqual(learningRate(step: 100, config: c), 1e-4, accuracy: 1e-9)
        c.schedule = .constant
        XCTAssertEqual(learningRate(step: 50, config: c), 1e-3)
    }

    func testGradientClippingByGlobalNorm() {
        let a = Parameter(name: "a", shape: [2]), b = Parameter(name: "b", shape: [1])
        a.grad[0] = 3; a.grad[1] = 0; b.grad[0] = 4
        XCTAssertEqual(clipGradients([a, b], maxNorm: 10), 5)
        XCTAssertEqual(a.grad[0], 3)  // below the limit: unchanged
        XCTAssertEqual(clipGradients([a, b], maxNorm: 1), 5)
        XCTAssertEqual(a.grad[0], 0.6, accuracy: 1e-5)
        XCTAssertEqual(b.grad[0], 0.8, accuracy: 1e-5)
    }

    func testCheckpointRoundTripAndCorruption() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ck-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let cfg = try RunConfig(json: tinyConfig("vqmoe", ["model.ffn.quantizer.ema": true]))
        let trainer = try Trainer(config: cfg, registry: try registry(), outDir: dir, quiet: true)
        for s in 0..<3 { _ = try trainer.trainStep(s) }
        try trainer.saveCheckpoint("ck", step: 3)
        let path = "\(dir)/ck.safetensors"
        let loaded = try Checkpoint.read(path: path)
        XCTAssertNotNil(
            loaded.tensors["layers.0.ffn.quantizer.codebook"] == nil
                ? loaded.tensors["state.layers.0.ffn.quantizer.codebook"]
                : loaded.tensors["layers.0.ffn.quantizer.codebook"])
        XCTAssertNotNil(loaded.tensors["state.layers.1.ffn.quantizer.ema_count"])
        XCTAssertNotNil(loaded.tensors["optimizer.m.wte"])
        // A second model gets the same weights and state back.
        let other = try Trainer(config: cfg, registry: try registry(), outDir: dir, quiet: true)
        try other.model.load(loaded, optimizer: other.optimizer, path: path)
        for (p, q) in zip(trainer.model.parameters, other.model.parameters) {
            XCTAssertEqual(
                Array(UnsafeBufferPointer(start: p.data, count: p.count)),
                Array(UnsafeBufferPointer(start: q.data, count: q.count)), p.name)
        }
        // Truncated and altered files are refused.
        var bytes = try Data(contentsOf: URL(fileURLWithPath: path))
        try bytes.prefix(bytes.count - 10).write(to: URL(fileURLWithPath: "\(dir)/trunc.safetensors"))
        XCTAssertThrowsError(try Checkpoint.read(path: "\(dir)/trunc.safetensors")) {
            XCTAssertTrue(($0 as! VQMoEError).message.hasSuffix("bytes): truncated?"), "\($0)")
        }
        try bytes.prefix(5).write(to: URL(fileURLWithPath: "\(dir)/short.safetensors"))
        XCTAssertThrowsError(try Checkpoint.read(path: "\(dir)/short.safetensors")) {
            XCTAssertTrue(($0 as! VQMoEError).message.contains("file too short"), "\($0)")
        }
        bytes[bytes.count - 3] ^= 0x40
        try bytes.write(to: URL(fileURLWithPath: "\(dir)/altered.safetensors"))
        XCTAssertThrowsError(try Checkpoint.read(path: "\(dir)/altered.safetensors")) {
            XCTAssertTrue(($0 as! VQMoEError).message.contains("truncated or altered"), "\($0)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(path).tmp-\(getpid())"))
        try checkHeaderValidation(dir, original: try Data(contentsOf: URL(fileURLWithPath: path)))
    }

    /// A safetensors file from a header object and a data section (header padded to 8 bytes).
    func safetensors(_ header: [String: Any], body: Data, length: UInt64? = nil) throws -> Data {
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while json.count % 8 != 0 { json.append(0x20) }
        var len = (length ?? UInt64(json.count)).littleEndian
        var file = Data()
        withUnsafeBytes(of: &len) { file.append(contentsOf: $0) }
        return file + json + body
    }

    /// The checksum covers the header (an edited offset or shape is refused), every size in the
    /// header is checked against the file before use, and format-1 files (data-only checksum)
    /// still load.
    func checkHeaderValidation(_ dir: String, original: Data) throws {
        let len = Int(original.prefix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) })
        var header = try JSONSerialization.jsonObject(with: original.subdata(in: 8..<(8 + len))) as! [String: Any]
        let body = original.subdata(in: (8 + len)..<original.count)
        func refused(_ file: Data, _ expected: String, _ line: UInt = #line) throws {
            let p = "\(dir)/edited.safetensors"
            try file.write(to: URL(fileURLWithPath: p))
            XCTAssertThrowsError(try Checkpoint.read(path: p), line: line) {
                let m = ($0 as? VQMoEError)?.message ?? "\($0)"
                XCTAssertTrue(m.contains(expected), m, line: line)
            }
        }
        // Swap the data of two tensors of one size: valid JSON, valid offsets, wrong weights.
        let names = header.keys.filter { $0.hasPrefix("layers.0.ln1.") }.sorted()
        XCTAssertEqual(names, ["layers.0.ln1.bias", "layers.0.ln1.weight"])
        var a = header[names[0]] as! [String: Any], b = header[names[1]] as! [String: Any]
        (a["data_offsets"], b["data_offsets"]) = (b["data_offsets"], a["data_offsets"])
        var swapped = header
        (swapped[names[0]], swapped[names[1]]) = (a, b)
        try refused(try safetensors(swapped, body: body), "checksum mismatch: the header or the data")
        // A header length near 2^63, and one past the file: refused, nothing allocated.
        try refused(try safetensors(header, body: body, length: 1 << 63 - 8), "does not fit the file")
        try refused(try safetensors(header, body: body, length: UInt64(original.count)), "does not fit the file")
        func edited(_ name: String, _ key: String, _ value: Any) -> [String: Any] {
            var h = header, e = h[name] as! [String: Any]
            e[key] = value
            h[name] = e
            return h
        }
        let off = (header["wte"] as! [String: Any])["data_offsets"] as! [Int]
        try refused(try safetensors(edited("wte", "data_offsets", [-8, off[1]]), body: body), "outside the data")
        try refused(
            try safetensors(edited("wte", "shape", [1 << 40, 1 << 40]), body: body), "larger than the file's data")
        try refused(try safetensors(edited("wte", "shape", [-1, 4]), body: body), "negative dimension")
        try refused(try safetensors(edited("wte", "dtype", "F16"), body: body), "has dtype F16; known:")
        try refused(try safetensors(edited("wte", "shape", [1]), body: body), "needs 4 bytes, data_offsets")
        try refused(try safetensors(header, body: body + Data([0, 0, 0, 0])), "4 bytes after the last tensor")
        // Format 1: the checksum is of the data alone; such files keep loading.
        var meta = header["__metadata__"] as! [String: String]
        (meta["format"], meta["sha256"]) = ("vqmoe-checkpoint-1", SHA256.hex(of: [UInt8](body)))
        header["__metadata__"] = meta
        try safetensors(header, body: body).write(to: URL(fileURLWithPath: "\(dir)/v1.safetensors"))
        XCTAssertEqual(try Checkpoint.read(path: "\(dir)/v1.safetensors").tensors.count, header.count - 1)
    }

    /// A damaged sidecar is named with what is wrong, never Foundation's raw error text.
    func testDamagedSidecarIsNamed() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("side-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        for (text, expected) in [
            ("{bad", "not a JSON object (truncated or overwritten?)"), ("{}", "missing key 'format'"),
            (#"{"format": "x", "step": "3"}"#, "'step' has the wrong type"),
        ] {
            try text.write(toFile: "\(dir)/last.json", atomically: true, encoding: .utf8)
            XCTAssertThrowsError(try CheckpointSidecar.read("\(dir)/last.json")) {
                XCTAssertEqual(
                    ($0 as? VQMoEError)?.message, "\(dir)/last.json: not a vqmoe checkpoint sidecar: \(expected)")
            }
        }
    }

    /// last.json and last.safetensors from different saves (a crash between the two writes)
    /// are refused on resume, naming both steps.
    func testResumeRefusesUnpairedCheckpointFiles() throws {
        var json = try tinyConfig("smoe")
        try setPath(&json, "train.steps", 8)
        try setPath(&json, "train.checkpoint_every", 2)
        let cfg = try RunConfig(json: json)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("pair-\(UUID().uuidString)").path
        _ = try Trainer(config: cfg, registry: try registry(), outDir: dir, quiet: true).run(stopAfter: 2)
        let oldSidecar = try Data(contentsOf: URL(fileURLWithPath: "\(dir)/last.json"))
        _ = try Trainer(config: cfg, registry: try registry(), outDir: dir, quiet: true).run(resume: true, stopAfter: 4)
        try oldSidecar.write(to: URL(fileURLWithPath: "\(dir)/last.json"))
        XCTAssertThrowsError(
            try Trainer(config: cfg, registry: try registry(), outDir: dir, quiet: true).run(resume: true)
        ) {
            XCTAssertEqual(
                ($0 as? VQMoEError)?.message,
                "\(dir)/last.json (step 2) and \(dir)/last.safetensors (step 4) were not written by the same save (a "
                    + "crash or a full disk between the two writes?): refusing to resume from a mixed state. Start "
                    + "again (--force), or fine-tune from best.safetensors")
        }
    }

    /// A short end-to-end run on real data for each FFN mode: the loss falls, every output is
    /// written, and the test split is evaluated with the best checkpoint.
    func testShortTrainingOnEnwik8Mini() throws {
        for mode in ["dense", "smoe", "vqmoe"] {
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("run-\(mode)-\(UUID().uuidString)")
                .path
            let cfg = try RunConfig(json: tinyConfig(mode))
            let trainer = try Trainer(config: cfg, registry: try registry(), outDir: dir, quiet: true)
            let r = try trainer.run()
            let lines = try String(contentsOfFile: "\(dir)/metrics.jsonl", encoding: .utf8).split(separator: "\n")
                .map { try JSONSerialization.jsonObject(with: Data($0.utf8)) as! [String: Any] }
            let train = lines.filter { $0["split"] as? String == "train" }
            let first = train.first!["task_loss"] as! Double, last = train.last!["task_loss"] as! Double
            XCTAssertEqual(first, log(256), accuracy: 0.1, mode)  // uniform over bytes at init
            XCTAssertLessThan(last, first - 1.0, "\(mode): \(first) -> \(last)")
            XCTAssertEqual(lines.filter { $0["split"] as? String == "valid" }.count, 2, mode)
            XCTAssertNotNil(r.test, mode)
            XCTAssertLessThan(r.test!.bpc, 6.5, mode)
            if mode != "dense" { XCTAssertEqual((train.last!["expert_load"] as! [[Double]]).count, 2, mode) }
            if mode == "vqmoe" { XCTAssertGreaterThan(train.last!["vq_loss"] as! Double, 0) }
            for file in ["best.safetensors", "best.json", "config.json", "result.json"] {
                XCTAssertTrue(FileManager.default.fileExists(atPath: "\(dir)/\(file)"), "\(mode): \(file)")
            }
        }
    }

    /// An interrupted-and-resumed run's loss curve equals the uninterrupted one, step for step
    /// (dropout, an EMA quantizer with k-means-free state, Adam moments, schedule).
    func testResumeIsBitIdentical() throws {
        let json = try tinyConfig("vqmoe", ["model.ffn.quantizer.ema": true])
        var cfgJSON = json
        try setPath(&cfgJSON, "model.dropout", 0.1)
        try setPath(&cfgJSON, "train.steps", 16)
        try setPath(&cfgJSON, "train.eval_every", 5)
        try setPath(&cfgJSON, "train.log_every", 1)
        let cfg = try RunConfig(json: cfgJSON)
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("resume-\(UUID().uuidString)").path
        _ = try Trainer(config: cfg, registry: try registry(), outDir: "\(tmp)/a", quiet: true).run()
        let first = try Trainer(config: cfg, registry: try registry(), outDir: "\(tmp)/b", quiet: true).run(
            stopAfter: 7)
        XCTAssertTrue(first.interrupted)
        XCTAssertTrue(FileManager.default.fileExists(atPath: "\(tmp)/b/last.safetensors"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(tmp)/b/result.json"))
        let resumed = try Trainer(config: cfg, registry: try registry(), outDir: "\(tmp)/b", quiet: true).run(
            resume: true)
        XCTAssertFalse(resumed.interrupted)
        let a = try curve("\(tmp)/a"), b = try curve("\(tmp)/b")
        XCTAssertEqual(a.count, b.count)
        for (i, (x, y)) in zip(a, b).enumerated() { XCTAssertEqual(x, y, "metrics line \(i)") }
        XCTAssertEqual(
            resumed.test?.loss,
            try XCTUnwrap(Trainer(config: cfg, registry: try registry(), outDir: "\(tmp)/a", quiet: true))
                .evaluateCheckpoint("best", .test).loss)
    }

    /// Every built-in quantizer at its defaults (vqvae, vqgan_cos, rvq: EMA codebooks, k-means
    /// init, dead-code restart, all checkpointed state) resumes bit-identically, and the k-means
    /// flag and EMA state are in the checkpoint.
    func testResumeIsBitIdenticalWithCodebookUpkeepAtDefaults() throws {
        for quantizer in ["vqvae", "vqgan_cos", "rvq"] {
            var cfgJSON = try tinyConfig("vqmoe")
            try setPath(&cfgJSON, "model.ffn.quantizer", ["name": quantizer])
            try setPath(&cfgJSON, "train.steps", 12)
            try setPath(&cfgJSON, "train.eval_every", 4)
            try setPath(&cfgJSON, "train.log_every", 1)
            let cfg = try RunConfig(json: cfgJSON)
            let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("upkeep-\(UUID().uuidString)").path
            _ = try Trainer(config: cfg, registry: try registry(), outDir: "\(tmp)/a", quiet: true).run()
            _ = try Trainer(config: cfg, registry: try registry(), outDir: "\(tmp)/b", quiet: true).run(stopAfter: 5)
            let ck = try Checkpoint.read(path: "\(tmp)/b/last.safetensors")
            for name in ["initialized", "ema_count", "ema_sum", "codebook"] {
                XCTAssertNotNil(ck.tensors["state.layers.0.ffn.quantizer.\(name)"], "\(quantizer): \(name) is state")
            }
            _ = try Trainer(config: cfg, registry: try registry(), outDir: "\(tmp)/b", quiet: true).run(resume: true)
            XCTAssertEqual(try curve("\(tmp)/a"), try curve("\(tmp)/b"), quantizer)
        }
    }

    /// Lion trains (the loss falls), keeps its one moment per parameter in the checkpoint
    /// (`optimizer.m.*`, no `optimizer.v.*`), and an interrupted-and-resumed Lion run equals the
    /// uninterrupted one.
    func testLionTrainsAndResumesBitIdentical() throws {
        var json = try tinyConfig("smoe")
        try setPath(&json, "train.optimizer", "lion")
        try setPath(&json, "train.lr", 1e-3)
        try setPath(&json, "train.weight_decay", 0.1)
        try setPath(&json, "train.steps", 16)
        try setPath(&json, "train.eval_every", 5)
        try setPath(&json, "train.log_every", 1)
        let cfg = try RunConfig(json: json)
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("lion-\(UUID().uuidString)").path
        let full = try Trainer(config: cfg, registry: try registry(), outDir: "\(tmp)/a", quiet: true)
        XCTAssertTrue(full.optimizer is LionOptimizer)
        _ = try full.run()
        _ = try Trainer(config: cfg, registry: try registry(), outDir: "\(tmp)/b", quiet: true).run(stopAfter: 7)
        let last = try Checkpoint.read(path: "\(tmp)/b/last.safetensors")
        XCTAssertNotNil(last.tensors["optimizer.m.wte"])
        XCTAssertNil(last.tensors["optimizer.v.wte"])
        _ = try Trainer(config: cfg, registry: try registry(), outDir: "\(tmp)/b", quiet: true).run(resume: true)
        XCTAssertEqual(try curve("\(tmp)/a"), try curve("\(tmp)/b"))
        let train = try String(contentsOfFile: "\(tmp)/a/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            .compactMap { try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            .filter { $0["split"] as? String == "train" }.compactMap { $0["task_loss"] as? Double }
        XCTAssertLessThan(train.last!, train.first! - 0.3, "\(train)")
    }

    /// The libffi bridge trains like any plugin: the `hash` router (token ids; k = 2 taken from the
    /// smoe config it replaces: the hashed expert and the next), the `lsh` router, and the `lsh_code`
    /// quantizer in a VQMoE layer, 20 steps each on enwik8-mini.
    func testFFIComponentsTrain() throws {
        let cases: [(String, [String: Any])] = [
            ("hash", ["model.ffn.router.name": "hash"]),
            ("lsh", ["model.ffn.router": ["name": "lsh"]]),
            ("lsh_code", ["model.ffn.mode": "vqmoe", "model.ffn.quantizer": ["name": "lsh_code"]]),
        ]
        for (name, settings) in cases {
            var json = try tinyConfig("smoe")
            for (k, v) in settings { try setPath(&json, k, v) }
            try setPath(&json, "train.steps", 20)
            try setPath(&json, "train.eval_every", 20)
            try setPath(&json, "train.log_every", 1)
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("ffi-\(name)-\(UUID().uuidString)")
                .path
            let r = try Trainer(config: try RunConfig(json: json), registry: try registry(), outDir: dir, quiet: true)
                .run()
            let train = try String(contentsOfFile: "\(dir)/metrics.jsonl", encoding: .utf8).split(separator: "\n")
                .compactMap { try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
                .filter { $0["split"] as? String == "train" }
            let losses = train.compactMap { $0["task_loss"] as? Double }
            XCTAssertLessThan(losses.last!, losses.first! - 0.5, "\(name): \(losses)")
            XCTAssertNotNil(r.test, name)
            let load = try XCTUnwrap((train.last?["expert_load"] as? [[Double]])?.first, name)
            // k routed assignments per token (+1 discrete): hash k = 2, lsh k = 1, VQMoE smoe k = 2 + 1
            XCTAssertEqual(load.reduce(0, +), Double(["hash": 2, "lsh": 1, "lsh_code": 3][name]! * 8 * 32), name)
            if name == "lsh_code" {
                let codes = try XCTUnwrap((train.last?["code_counts"] as? [[Double]])?.first, name)
                XCTAssertEqual(codes.count, 4)
                XCTAssertEqual(codes.reduce(0, +), 8 * 32)
                XCTAssertGreaterThan(codes.filter { $0 > 0 }.count, 1, "\(codes)")
            }
        }
    }

    /// `vqmoe report`: curves, consistency, movement, expert load, code usage and PCA plots from
    /// a real (short) VQMoE run, each a well-formed SVG with data in it, linked from report.md.
    func testReportWritesEveryPlot() throws {
        var json = try tinyConfig("vqmoe")
        try setPath(&json, "train.eval_every", 20)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("report-\(UUID().uuidString)").path
        _ = try Trainer(config: try RunConfig(json: json), registry: try registry(), outDir: dir, quiet: true).run()
        let probes = try String(contentsOfFile: "\(dir)/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            .compactMap { try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }.filter {
                $0["split"] as? String == "probe"
            }
        XCTAssertEqual(probes.count, 3)
        XCTAssertEqual((probes[1]["consistency_router"] as? [Double])?.count, 2)
        XCTAssertEqual((probes[1]["movement_codebook"] as? [Double])?.count, 2)
        XCTAssertGreaterThan((probes[1]["movement_router"] as? [Double])?.first ?? 0, 0)
        let files = try Report(runs: [dir], outDir: "\(dir)/report").write()
        let names = Set(files.map { URL(fileURLWithPath: $0).lastPathComponent })
        for f in [
            "curves_train.svg", "curves_valid.svg", "consistency.svg", "movement.svg", "expert_load_0.svg",
            "code_usage_0.svg",
            "code_perplexity_0.svg", "pca_0_layer0.svg", "pca_0_layer1.svg", "report.md",
        ] {
            XCTAssertTrue(names.contains(f), "missing \(f) in \(names)")
        }
        for f in files where f.hasSuffix(".svg") {
            let svg = try String(contentsOfFile: f, encoding: .utf8)
            XCTAssertTrue(svg.hasPrefix("<svg") && svg.hasSuffix("</svg>\n"), f)
            XCTAssertTrue(svg.contains("<polyline") || svg.contains("<circle") || svg.contains("<rect x="), f)
            XCTAssertFalse(svg.contains("nan") || svg.contains("inf"), f)
        }
        let md = try String(contentsOfFile: "\(dir)/report/report.md", encoding: .utf8)
        XCTAssertTrue(md.contains("![") && md.contains("(pca_0_layer1.svg)"), md)
        XCTAssertEqual(Report.pca2([[1, 0], [2, 0], [3, 0.001]]).map { abs($0[0]).rounded() }, [1, 0, 1])
        // Legend names drop what every run shares.
        XCTAssertEqual(
            Report.shortNames(["table1_smoe[backbone=transformer,seed=1]", "table1_xmoe[backbone=transformer,seed=1]"]),
            ["smoe", "xmoe"])
        XCTAssertEqual(Report.shortNames(["sweep[k=1,seed=1]", "sweep[k=2,seed=1]"]), ["k=1", "k=2"])
        XCTAssertEqual(Report.shortNames(["a_x", "a_x"]), ["a_x", "a_x"])  // not distinct: kept
        XCTAssertEqual(Report.shortNames(["only[seed=1]"]), ["only[seed=1]"])
    }

    /// The analytic FFN count asks the router how many experts a token visits in evaluation
    /// (StableMoE: 1, and its distilled router needs the token-id range at create).
    func testFFNFlopsPerTokenAskTheRouter() throws {
        var json = try tinyConfig("smoe")  // d 32, d_inner 64, 4 experts
        let expert = 4.0 * 32 * 64, router = 2.0 * 32 * 4
        XCTAssertEqual(
            try ModelBuilder(config: RunConfig(json: json), registry: try registry()).ffnFlopsPerToken(vocabSize: 256),
            2 * expert + router)
        try setPath(&json, "model.ffn.router", ["name": "stablemoe"])
        XCTAssertEqual(
            try ModelBuilder(config: RunConfig(json: json), registry: try registry()).ffnFlopsPerToken(vocabSize: 256),
            expert + router)
    }

    /// Pre-train a tiny VQMoE LM on enwik8-mini, fine-tune it on SST-2 with the discrete path
    /// only: weights load, the quantizer stays frozen, the head is new, accuracy and both FLOPs
    /// counts are reported; a model that does not match the checkpoint is refused.
    func testFinetuneFromPretrainedCheckpoint() throws {
        guard let data = DataLocator.defaultRoot(),
            FileManager.default.fileExists(atPath: "\(data)/sst/stsa.binary.train")
        else {
            throw XCTSkip("no SST data")
        }
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("ft-\(UUID().uuidString)").path
        let pre = try RunConfig(json: tinyConfig("vqmoe"))
        _ = try Trainer(config: pre, registry: try registry(), outDir: "\(tmp)/pre", quiet: true).run()
        var json = try tinyConfig("vqmoe")
        try setPath(&json, "model.ffn.mode", "vqmoe_finetune")
        json["data"] = ["name": "sst", "variant": "binary"]
        json["head"] = ["name": "classifier"]
        json["finetune"] = ["from": "\(tmp)/pre", "freeze": ["router", "quantizer"]]
        try setPath(&json, "train.steps", 20)
        try setPath(&json, "train.eval_every", 10)
        let cfg = try RunConfig(json: json)
        let ft = try Finetune(config: cfg, registry: try registry(), outDir: "\(tmp)/ft")
        let before = try Checkpoint.read(path: "\(tmp)/pre/best.safetensors")
        let r = try ft.run(quiet: true)
        XCTAssertNotNil(r.result.test)
        XCTAssertGreaterThan(r.result.test!.accuracy, 0.3)
        XCTAssertEqual(r.result.test!.count, 1821)
        XCTAssertLessThan(r.flops.finetuneFFN, r.flops.pretrainFFN)
        XCTAssertEqual(r.flops.pretrainMode, "vqmoe")
        let after = try Checkpoint.read(path: "\(tmp)/ft/best.safetensors")
        XCTAssertEqual(
            after.tensors["layers.0.ffn.quantizer.codebook"]?.data,
            before.tensors["layers.0.ffn.quantizer.codebook"]?.data, "quantizer must stay frozen")
        XCTAssertNotEqual(
            after.tensors["layers.0.ffn.experts.fc1.weight"]?.data,
            before.tensors["layers.0.ffn.experts.fc1.weight"]?.data)
        XCTAssertNil(after.tensors["layers.0.ffn.router.weight"], "the fine-tuning path runs no router")
        XCTAssertNotNil(after.tensors["head.fc1.weight"])
        let result =
            try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "\(tmp)/ft/result.json")))
            as! [String: Any]
        XCTAssertNotNil(result["test_accuracy"])
        XCTAssertNotNil(result["ffn_flops_per_token_finetune"])
        // A model section that does not match the checkpoint is refused with the tensor named.
        try setPath(&json, "model.ffn.d_inner", 48)
        let bad = try Finetune(config: try RunConfig(json: json), registry: try registry(), outDir: "\(tmp)/bad")
        XCTAssertThrowsError(try bad.run(quiet: true)) {
            XCTAssertTrue(($0 as! VQMoEError).message.contains("must match the pre-training config"), "\($0)")
        }
    }

    /// A diverging run stops with a diagnostic naming the step, and the last good checkpoint
    /// stays on disk.
    func testNonFiniteLossStopsWithDiagnostic() throws {
        var json = try tinyConfig("smoe")
        try setPath(&json, "train.lr", 1e6)
        try setPath(&json, "train.grad_clip", 0)
        try setPath(&json, "train.checkpoint_every", 1)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("nan-\(UUID().uuidString)").path
        let trainer = try Trainer(config: try RunConfig(json: json), registry: try registry(), outDir: dir, quiet: true)
        do {
            _ = try trainer.run()
            XCTFail("a run at lr 1e6 did not diverge")
        } catch let e as VQMoEError {
            XCTAssertEqual(e.category, .numeric)
            XCTAssertTrue(e.message.contains("non-finite") && e.message.contains("step"), e.message)
            XCTAssertNoThrow(try Checkpoint.read(path: "\(dir)/last.safetensors"))
        }
    }

    /// A small ViT (patches + class token, full attention) with SoftMoE layers trains on real
    /// Fashion-MNIST: accuracy well above chance after 120 steps.
    /// Transformer-XL on enwik8-mini streams: it learns, the training memory survives an
    /// interruption (resume is bit-identical, evaluations included), the eval pass uses its own
    /// memory, and the config errors name the fix.
    func testTransformerXLTrainsAndResumes() throws {
        var json = try tinyConfig(
            "vqmoe", ["model.backbone": "transformer_xl", "model.mem_len": 24, "data.order": "streams"])
        try setPath(&json, "train.steps", 16)
        try setPath(&json, "train.eval_every", 5)
        try setPath(&json, "train.log_every", 1)
        let cfg = try RunConfig(json: json)
        let tmp = FileManager.default.temporaryDirectory.appendingPathComponent("txl-\(UUID().uuidString)").path
        let full = try Trainer(config: cfg, registry: try registry(), outDir: "\(tmp)/a", quiet: true)
        XCTAssertNil(full.model.wpe)
        XCTAssertTrue(full.model.parameters.contains { $0.name == "layers.1.attn.r.weight" })
        let ra = try full.run()
        XCTAssertEqual(full.model.trainMemory?.length, 24)
        _ = try Trainer(config: cfg, registry: try registry(), outDir: "\(tmp)/b", quiet: true).run(stopAfter: 7)
        let resumed = try Trainer(config: cfg, registry: try registry(), outDir: "\(tmp)/b", quiet: true).run(
            resume: true)
        XCTAssertEqual(try curve("\(tmp)/a"), try curve("\(tmp)/b"))
        XCTAssertEqual(resumed.test?.loss, ra.test?.loss)
        // Without the memory tensors the resumed stream would differ: the checkpoint holds them.
        let last = try Checkpoint.read(path: "\(tmp)/b/last.safetensors")
        XCTAssertEqual(last.tensors["memory.layers.0"]?.shape, [8, 24, 32])
        // A longer run learns (loss well below uniform), and evaluating with memory is
        // deterministic: two passes over the valid split agree.
        var longer = json
        try setPath(&longer, "train.steps", 80)
        try setPath(&longer, "train.eval_every", 80)
        let t = try Trainer(
            config: try RunConfig(json: longer), registry: try registry(), outDir: "\(tmp)/c", quiet: true)
        let r = try t.run()
        XCTAssertLessThan(r.test!.loss, log(256) - 2, "\(r.test!.loss)")
        XCTAssertEqual(try t.evaluate(.valid, maxBatches: 6).loss, try t.evaluate(.valid, maxBatches: 6).loss)
        // Memory needs streams; a memory needs Transformer-XL.
        var windows = json
        try setPath(&windows, "data.order", "windows")
        XCTAssertTrue(configError(windows).contains("data.order = \"streams\""), configError(windows))
        var plain = try tinyConfig("smoe")
        try setPath(&plain, "model.mem_len", 16)
        XCTAssertTrue(
            configError(plain).hasPrefix("model.mem_len: a memory needs model.backbone = \"transformer_xl\""),
            configError(plain))
        // Relative attention without memory takes any token dataset.
        var noMem = windows
        try setPath(&noMem, "model.mem_len", 0)
        XCTAssertNoThrow(try ModelBuilder(config: try RunConfig(json: noMem), registry: try registry()).build())
    }

    func testViTWithSoftMoETrainsOnFashionMNIST() throws {
        guard let data = DataLocator.defaultRoot(),
            FileManager.default.fileExists(atPath: "\(data)/fashion-mnist/train-images-idx3-ubyte.gz")
        else {
            throw XCTSkip("no Fashion-MNIST")
        }
        let json: [String: Any] = [
            "name": "vit_tiny", "seed": 2, "data": ["name": "idx"],
            "model": [
                "backbone": "vit", "patch_size": 7, "n_layer": 2, "n_head": 2, "d_model": 32,
                "ffn": ["mode": "smoe", "d_inner": 32, "n_experts": 4, "router": ["name": "softmoe"]],
            ],
            "head": ["name": "image_classifier"],
            "train": [
                "steps": 120, "batch_size": 32, "optimizer": "adamw", "lr": 3e-3, "eval_every": 120, "eval_batches": 10,
                "grad_clip": 1.0,
            ],
        ]
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vit-\(UUID().uuidString)").path
        let trainer = try Trainer(config: try RunConfig(json: json), registry: try registry(), outDir: dir, quiet: true)
        XCTAssertEqual(trainer.model.config.seqLen, 17)  // 16 patches of 7×7 + the class token
        XCTAssertFalse(trainer.model.config.causal)
        let r = try trainer.run()
        XCTAssertGreaterThan(r.bestValid!.accuracy, 0.45)  // chance is 0.1
        XCTAssertEqual(r.test!.count, 10_000)
        XCTAssertFalse(r.isLM)
        // StableMoE in a ViT runs as the reference code does (distill = false); its distilled
        // token-id router cannot, and says how to fix it.
        var stable = json
        try setPath(&stable, "model.ffn.router", ["name": "stablemoe", "distill": false])
        try setPath(&stable, "train.steps", 3)
        XCTAssertNoThrow(
            try Trainer(
                config: try RunConfig(json: stable), registry: try registry(), outDir: dir + "-stable", quiet: true
            ).run())
        try setPath(&stable, "model.ffn.router.distill", true)
        XCTAssertThrowsError(
            try Trainer(
                config: try RunConfig(json: stable), registry: try registry(), outDir: dir + "-stable2", quiet: true
            ).run()
        ) {
            XCTAssertTrue("\($0)".contains("set distill = false"), "\($0)")
        }
        // A token backbone on images is refused with the fix.
        var bad = json
        bad["model"] = ["n_layer": 1, "d_model": 32, "n_head": 2, "seq_len": 16]
        XCTAssertThrowsError(
            try Trainer(config: try RunConfig(json: bad), registry: try registry(), outDir: dir, quiet: true)
        ) {
            XCTAssertTrue(($0 as! VQMoEError).message.contains("set model.backbone = \"vit\""), "\($0)")
        }
    }
}
