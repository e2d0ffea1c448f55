import Foundation
import VQMoE
import XCTest

/// Training over several ranks with Open MPI (`mpirun --oversubscribe -np 2`, as CI runs it):
/// data parallelism gives the single process's losses and gradients, expert parallelism gives
/// data parallelism's, checkpoints do not depend on the layout, faults end the job clearly.
/// Skipped where `mpirun` or the data are missing (scripts/setup.sh installs Open MPI and builds
/// the comm backend beside the executable).
final class DistributedTests: XCTestCase {
    let vqmoe = "\(buildDir)/vqmoe"
    /// A small model on enwik8-mini: 2 layers, d 32, segments of 32, global batch 8, 1 thread a rank.
    static let tiny = [
        "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.seq_len=32", "model.ffn.d_inner=64",
        "train.batch_size=8", "train.eval_every=1000", "train.eval_batches=2", "train.log_every=1",
        "train.threads=1", "train.checkpoint_every=1000", "train.warmup_steps=2",
    ]
    /// VQ-VAE with every mechanism that reduces over the batch: EMA, k-means init, dead-code restart.
    static let fullVQ = [
        "model.ffn.quantizer.ema=true", "model.ffn.quantizer.kmeans_init=true",
        "model.ffn.quantizer.dead_code_threshold=0.5",
    ]
    private var mpirun = ""

    override func setUpWithError() throws {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory") }
        guard let path = ["/usr/bin/mpirun", "/usr/local/bin/mpirun"].first(where: FileManager.default.fileExists)
        else { throw XCTSkip("mpirun is not installed (scripts/setup.sh installs Open MPI)") }
        mpirun = path
        if !FileManager.default.fileExists(atPath: "\(buildDir)/libvqmoe_comm_mpi.so") {
            let (status, out) = try runProcess("\(repoRoot)/scripts/build-comm-mpi.sh", [buildDir], cwd: repoRoot)
            XCTAssertEqual(status, 0, out)
        }
    }

    /// `vqmoe train` in one process (ranks nil) or under mpirun with `ranks` ranks.
    @discardableResult
    private func train(
        _ config: String, out: String, ranks: Int?, _ settings: [String], extra: [String] = [],
        mca: [String] = [], expectSuccess: Bool = true, file: StaticString = #filePath, line: UInt = #line
    ) throws -> (Int32, String) {
        // A resume reads the run's own config.json: no output folder, no settings.
        let fresh = !extra.contains("--resume")
        let args =
            ["--registry", "\(repoRoot)/registry.json", "train"] + (fresh ? [config, "--out", out] : [])
            + (fresh ? Self.tiny + settings : []).flatMap { ["--set", $0] } + extra
        let result: (Int32, String)
        if let ranks {
            result = try runProcess(
                mpirun, ["--oversubscribe", "-np", String(ranks)] + mca + [vqmoe] + args, cwd: repoRoot,
                env: [
                    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "VQMOE_COMM_TIMEOUT": "120",
                ])
        } else {
            result = try runProcess(vqmoe, args, cwd: repoRoot)
        }
        if expectSuccess { XCTAssertEqual(result.0, 0, result.1, file: file, line: line) }
        return result
    }

    /// The train rows of a run's metrics.jsonl.
    private func trainRows(_ dir: String) throws -> [[String: Any]] {
        try String(contentsOfFile: "\(dir)/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            .compactMap { try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            .filter { $0["split"] as? String == "train" }
    }

    /// The validation rows of a run's metrics.jsonl.
    private func validRows(_ dir: String) throws -> [[String: Any]] {
        try String(contentsOfFile: "\(dir)/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            .compactMap { try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            .filter { $0["split"] as? String == "valid" }
    }

    /// Every F32 tensor of a safetensors file.
    private func floats(_ path: String) throws -> [String: [Float]] {
        try Checkpoint.read(path: path).tensors.filter { $0.value.dtype == "F32" }.mapValues { t in
            t.data.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        }
    }

    private func assertLossesClose(
        _ a: [[String: Any]], _ b: [[String: Any]], rel: Double, _ what: String, file: StaticString = #filePath,
        line: UInt = #line
    ) {
        XCTAssertEqual(a.count, b.count, what, file: file, line: line)
        for (x, y) in zip(a, b) {
            for key in ["task_loss", "aux_loss", "vq_loss"] {
                let u = x[key] as? Double ?? 0, v = y[key] as? Double ?? 0
                XCTAssertLessThanOrEqual(
                    abs(u - v), rel * max(abs(u), 1e-6), "\(what): step \(x["step"] ?? "?") \(key) \(u) vs \(v)",
                    file: file, line: line)
            }
        }
    }

    /// ‖a − b‖ ≤ rel·‖a‖ for every tensor of both files (the same names and sizes).
    private func assertGradientsClose(
        _ a: String, _ b: String, rel: Double, only prefix: String? = nil, _ what: String,
        file: StaticString = #filePath, line: UInt = #line
    ) throws {
        let ga = try floats(a), gb = try floats(b)
        XCTAssertEqual(Set(ga.keys), Set(gb.keys), what, file: file, line: line)
        var compared = 0
        for (name, x) in ga where prefix.map({ name.contains($0) }) ?? true {
            let y = try XCTUnwrap(gb[name])
            XCTAssertEqual(x.count, y.count, "\(what): \(name)", file: file, line: line)
            var diff = 0.0, norm = 0.0
            for (u, v) in zip(x, y) { diff += Double(u - v) * Double(u - v); norm += Double(u) * Double(u) }
            XCTAssertLessThanOrEqual(
                diff.squareRoot(), rel * norm.squareRoot() + 1e-12,
                "\(what): gradient of \(name) differs by \(diff.squareRoot()) (norm \(norm.squareRoot()))",
                file: file, line: line)
            compared += 1
        }
        XCTAssertGreaterThan(compared, 0, what, file: file, line: line)
    }

    /// Data parallel over 2 ranks = one process on the same global batch: first-step loss and
    /// every gradient to 1e-5 relative, 20 steps of losses to 1e-4, for dense, SMoE and VQMoE
    /// (VQ-VAE with EMA, k-means init and dead-code restart); two 2-rank runs are bit-identical.
    func testDataParallelEqualsOneProcess() throws {
        let dir = try makeTempDir("dp")
        for (config, extra) in [("enwik8_dense", []), ("enwik8_smoe", []), ("enwik8_vqmoe", Self.fullVQ)] {
            let settings = ["train.steps=20", "train.checkpoint_every=20"] + extra
            try train(
                "configs/\(config).json", out: "\(dir)/\(config)-1", ranks: nil, settings,
                extra: ["--dump-gradients", "0"])
            try train(
                "configs/\(config).json", out: "\(dir)/\(config)-2", ranks: 2, settings,
                extra: ["--dump-gradients", "0"])
            let one = try trainRows("\(dir)/\(config)-1"), two = try trainRows("\(dir)/\(config)-2")
            XCTAssertEqual(one.count, 20, config)
            assertLossesClose([one[0]], [two[0]], rel: 1e-5, "\(config) first step")
            assertLossesClose(one, two, rel: 1e-4, "\(config) 20 steps")
            // The evaluation's sums, code usage included, are the global batch's.
            let v1 = try validRows("\(dir)/\(config)-1"), v2 = try validRows("\(dir)/\(config)-2")
            XCTAssertEqual(v1.count, 1, config)
            let l1 = try XCTUnwrap(v1.first?["loss"] as? Double), l2 = try XCTUnwrap(v2.first?["loss"] as? Double)
            XCTAssertEqual(l1, l2, accuracy: 1e-6 * l1, config)
            for key in ["code_perplexity", "codes_used"] {  // counts: exact
                XCTAssertEqual("\(v1.first?[key] ?? "-")", "\(v2.first?[key] ?? "-")", "\(config) \(key)")
            }
            try assertGradientsClose(
                "\(dir)/\(config)-1/gradients_step0.safetensors", "\(dir)/\(config)-2/gradients_step0.safetensors",
                rel: 1e-5, "\(config) step-0 gradients")
        }
        // The same 2-rank run again: the same bytes.
        try train(
            "configs/enwik8_vqmoe.json", out: "\(dir)/again", ranks: 2,
            ["train.steps=20", "train.checkpoint_every=20"] + Self.fullVQ)
        let a = try Checkpoint.read(path: "\(dir)/enwik8_vqmoe-2/last.safetensors")
        let b = try Checkpoint.read(path: "\(dir)/again/last.safetensors")
        XCTAssertEqual(a.metadata["sha256"], b.metadata["sha256"])
        func lossesOnly(_ rows: [[String: Any]]) -> [String] {
            rows.map { r in
                ["task_loss", "aux_loss", "vq_loss", "grad_norm"].map { "\(r[$0] ?? "-")" }.joined(separator: " ")
            }
        }
        XCTAssertEqual(lossesOnly(try trainRows("\(dir)/enwik8_vqmoe-2")), lossesOnly(try trainRows("\(dir)/again")))
    }

    /// Expert parallel over 2 ranks = data parallel over 2 ranks (the same routing, losses to
    /// 1e-5, the same expert gradients), for SMoE and VQMoE with E = 8 and E = 4, over TCP
    /// (`--mca btl self,tcp`: the network path, not shared memory).
    func testExpertParallelEqualsDataParallel() throws {
        let dir = try makeTempDir("ep")
        let tcp = ["--mca", "btl", "self,tcp"]
        for config in ["enwik8_smoe", "enwik8_vqmoe"] {
            for experts in [8, 4] {
                let tag = "\(config)-e\(experts)", settings = ["train.steps=10", "model.ffn.n_experts=\(experts)"]
                try train(
                    "configs/\(config).json", out: "\(dir)/\(tag)-dp", ranks: 2, settings,
                    extra: ["--dump-gradients", "0"], mca: tcp)
                try train(
                    "configs/\(config).json", out: "\(dir)/\(tag)-ep", ranks: 2,
                    settings + ["model.ffn.expert_parallel=true"], extra: ["--dump-gradients", "0"], mca: tcp)
                let dp = try trainRows("\(dir)/\(tag)-dp"), ep = try trainRows("\(dir)/\(tag)-ep")
                assertLossesClose(dp, ep, rel: 1e-5, tag)
                for (x, y) in zip(dp, ep) {
                    XCTAssertEqual("\(x["expert_load"] ?? "")", "\(y["expert_load"] ?? "")", "\(tag): the same routing")
                }
                try assertGradientsClose(
                    "\(dir)/\(tag)-dp/gradients_step0.safetensors", "\(dir)/\(tag)-ep/gradients_step0.safetensors",
                    rel: 1e-5, only: ".ffn.experts.", "\(tag) expert gradients")
            }
        }
    }

    /// A 2-rank expert-parallel checkpoint is an ordinary checkpoint: it resumes in 2 ranks
    /// (bit-identical to the uninterrupted run), in one process (the same losses to 1e-4), and
    /// `vqmoe eval` reads it.
    func testExpertParallelCheckpointResumesAnywhere() throws {
        let dir = try makeTempDir("epck")
        let settings = [
            "train.steps=12", "model.ffn.expert_parallel=true", "train.eval_every=6", "train.checkpoint_every=6",
        ]
        try train("configs/enwik8_vqmoe.json", out: "\(dir)/whole", ranks: 2, settings + Self.fullVQ)
        try train(
            "configs/enwik8_vqmoe.json", out: "\(dir)/split", ranks: 2, settings + Self.fullVQ,
            extra: ["--stop-after", "5"])
        let ck = try Checkpoint.read(path: "\(dir)/split/last.safetensors")
        XCTAssertEqual(
            ck.tensors["layers.0.ffn.experts.fc1.weight"]?.shape, [8, 64, 32], "the whole bank, as one process saves it"
        )
        XCTAssertEqual(ck.tensors["optimizer.m.layers.0.ffn.experts.fc1.weight"]?.shape, [8, 64, 32])
        try FileManager.default.copyItem(atPath: "\(dir)/split", toPath: "\(dir)/single")
        try train("", out: "", ranks: 2, [], extra: ["--resume", "\(dir)/split"])
        try train("", out: "", ranks: nil, [], extra: ["--resume", "\(dir)/single"])
        let whole = try Checkpoint.read(path: "\(dir)/whole/last.safetensors")
        let resumed = try Checkpoint.read(path: "\(dir)/split/last.safetensors")
        XCTAssertEqual(whole.metadata["sha256"], resumed.metadata["sha256"], "2-rank resume is bit-identical")
        let a = try trainRows("\(dir)/whole"), b = try trainRows("\(dir)/split"), c = try trainRows("\(dir)/single")
        XCTAssertEqual(a.map { "\($0["task_loss"]!)" }, b.map { "\($0["task_loss"]!)" })
        assertLossesClose(a, c, rel: 1e-4, "resumed in one process")
        let (status, out) = try runProcess(
            vqmoe, ["--registry", "\(repoRoot)/registry.json", "eval", "\(dir)/whole"], cwd: repoRoot)
        XCTAssertEqual(status, 0, out)
        XCTAssertTrue(out.contains("bpc"), out)
    }

    /// Fine-tuning a 2-rank expert-parallel checkpoint over 2 ranks (data + expert parallel)
    /// gives one process's losses (the classifier head's dropout included), and `vqmoe eval`
    /// under mpirun reports once, the single process's numbers.
    func testFineTuningAndEvalOverRanks() throws {
        let dir = try makeTempDir("ft")
        try train(
            "configs/enwik8_vqmoe.json", out: "\(dir)/pre", ranks: 2,
            ["train.steps=3", "train.checkpoint_every=3", "train.eval_every=3", "model.ffn.expert_parallel=true"])
        let env = ["OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"]
        func finetune(_ out: String, ranks: Int?) throws {
            let args =
                [
                    "--registry", "\(repoRoot)/registry.json", "finetune", "configs/finetune/sst2_vqmoe.json", "--from",
                    "\(dir)/pre", "--out", out,
                ]
                + (Self.tiny + ["train.steps=4", "train.eval_every=4", "model.ffn.expert_parallel=true"]).flatMap {
                    ["--set", $0]
                }
            let (status, text) =
                try ranks.map {
                    try runProcess(
                        mpirun, ["--oversubscribe", "-np", String($0), vqmoe] + args, cwd: repoRoot, env: env)
                } ?? runProcess(vqmoe, args, cwd: repoRoot)
            XCTAssertEqual(status, 0, text)
        }
        try finetune("\(dir)/ft2", ranks: 2)
        try finetune("\(dir)/ft1", ranks: nil)
        let two = try trainRows("\(dir)/ft2"), one = try trainRows("\(dir)/ft1")
        XCTAssertEqual(two.count, 4)
        assertLossesClose(one, two, rel: 1e-5, "fine-tuning over 2 ranks")
        let evalArgs = ["--registry", "\(repoRoot)/registry.json", "eval", "\(dir)/ft2"]
        let (s2, o2) = try runProcess(
            mpirun, ["--oversubscribe", "-np", "2", vqmoe] + evalArgs, cwd: repoRoot, env: env)
        let (s1, o1) = try runProcess(vqmoe, evalArgs, cwd: repoRoot)
        XCTAssertEqual(s2, 0, o2)
        XCTAssertEqual(s1, 0, o1)
        let lines = o2.split(separator: "\n").filter { $0.contains("accuracy") }
        XCTAssertEqual(lines.count, 1, o2)
        XCTAssertEqual(
            lines.first.map(String.init), o1.split(separator: "\n").first { $0.contains("accuracy") }.map(String.init))
    }

    /// A rank killed with SIGKILL ends the job: the launcher names the rank, the survivor names
    /// its step and the last good checkpoint, and the run resumes from that checkpoint.
    func testKilledRankEndsTheJobAndTheRunResumes() throws {
        let dir = try makeTempDir("kill"), out = "\(dir)/run"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: mpirun)
        p.arguments =
            [
                "--oversubscribe", "-np", "2", vqmoe, "--registry", "\(repoRoot)/registry.json", "train",
                "configs/enwik8_smoe.json", "--out", out,
            ]
            + (Self.tiny + ["train.steps=100000", "train.checkpoint_every=5"]).flatMap { ["--set", $0] }
        p.currentDirectoryURL = URL(fileURLWithPath: repoRoot)
        p.environment = ProcessInfo.processInfo.environment.merging([
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        ]) { _, new in new }
        let pipe = Pipe()
        (p.standardOutput, p.standardError) = (pipe, pipe)
        try p.run()
        let deadline = Date().addingTimeInterval(120)
        while !FileManager.default.fileExists(atPath: "\(out)/last.json") && Date() < deadline { usleep(100_000) }
        usleep(300_000)
        // The newest process whose command line names this run: a rank (mpirun was started first).
        let (killStatus, killOut) = try runProcess("/usr/bin/pkill", ["-KILL", "-n", "-f", "vqmoe.*\(out)"])
        XCTAssertEqual(killStatus, 0, killOut)
        let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        XCTAssertNotEqual(p.terminationStatus, 0, text)
        XCTAssertTrue(text.contains("exited on signal 9"), text)
        XCTAssertTrue(text.range(of: #"rank \d with PID"#, options: .regularExpression) != nil, text)
        XCTAssertTrue(text.contains("signal during training step"), text)
        let side = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "\(out)/last.json")))
        let step = try XCTUnwrap((side as? [String: Any])?["step"] as? Int)
        try train("", out: "", ranks: 2, [], extra: ["--resume", out, "--stop-after", String(step + 2)])
        let after = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "\(out)/last.json")))
        XCTAssertEqual((after as? [String: Any])?["step"] as? Int, step + 2)
    }

    /// SIGINT to mpirun: every rank stops after the same step, rank 0 writes `last` once, and the
    /// run resumes from it (over 2 ranks) to the end.
    func testInterruptCheckpointsOnceAndTheRunResumes() throws {
        let dir = try makeTempDir("int"), out = "\(dir)/run"
        let p = Process()
        p.executableURL = URL(fileURLWithPath: mpirun)
        p.arguments =
            [
                "--oversubscribe", "-np", "2", vqmoe, "--registry", "\(repoRoot)/registry.json", "train",
                "configs/enwik8_smoe.json", "--out", out,
            ]
            + (Self.tiny + ["train.steps=100000", "train.log_every=1000"]).flatMap { ["--set", $0] }
        p.currentDirectoryURL = URL(fileURLWithPath: repoRoot)
        p.environment = ProcessInfo.processInfo.environment.merging([
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        ]) { _, new in new }
        let pipe = Pipe()
        (p.standardOutput, p.standardError) = (pipe, pipe)
        try p.run()
        // Interrupt once the ranks train (metrics.jsonl has its first line).
        let deadline = Date().addingTimeInterval(120)
        while ((try? String(contentsOfFile: "\(out)/metrics.jsonl", encoding: .utf8)) ?? "").isEmpty
            && Date() < deadline
        {
            usleep(100_000)
        }
        usleep(500_000)
        p.interrupt()  // SIGINT to mpirun, which forwards it to the ranks
        let text = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        XCTAssertNotEqual(p.terminationStatus, 0, text)
        XCTAssertEqual(text.components(separatedBy: "stopped after step").count - 1, 1, text)  // rank 0 only
        let side = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: "\(out)/last.json")))
        let step = try XCTUnwrap((side as? [String: Any])?["step"] as? Int)
        XCTAssertGreaterThan(step, 0)
        XCTAssertTrue(text.contains("run enwik8_smoe stopped after \(step) steps"), text)
        try train("", out: "", ranks: 2, [], extra: ["--resume", out, "--stop-after", String(step + 1)])
    }

    /// Ranks that resolve different configs (a --set given to one) are refused before training.
    func testDifferentConfigsAcrossRanksAreRefused() throws {
        let dir = try makeTempDir("mismatch")
        let common =
            ["--registry", "\(repoRoot)/registry.json", "train", "configs/enwik8_smoe.json", "--out", "\(dir)/run"]
            + Self.tiny.flatMap { ["--set", $0] }
        let (status, out) = try runProcess(
            mpirun,
            ["--oversubscribe", "-np", "1", vqmoe] + common + [":", "-np", "1", vqmoe] + common
                + ["--set", "train.lr=0.01"], cwd: repoRoot,
            env: ["OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"])
        XCTAssertNotEqual(status, 0, out)
        XCTAssertTrue(out.contains("the resolved config of rank 1 differs from rank 0's"), out)
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/run/last.safetensors"))
    }
}
