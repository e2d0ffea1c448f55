import Foundation
import VQMoE
import XCTest

/// A run directory is never shared or silently mixed: locked while a run writes it, a fresh run
/// refuses an earlier run's directory unless --force, and a resume never runs past its end.
final class RunDirectoryTests: XCTestCase {
    let vqmoe = "\(buildDir)/vqmoe"

    private func train(_ args: [String]) throws -> (Int32, String) {
        try runProcess(vqmoe, ["--registry", "\(repoRoot)/registry.json", "train"] + args, cwd: repoRoot)
    }

    /// A small VQMoE language model on enwik8-mini (seconds).
    private func tinyConfig(_ dir: String, steps: Int) throws -> String {
        let path = "\(dir)/tiny.json"
        try """
        {"name": "tiny", "seed": 1, "data": {"name": "char", "path": "$DATA/enwik8-mini/enwik8-mini"},
         "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "seq_len": 16,
                   "ffn": {"mode": "vqmoe", "d_inner": 16, "n_experts": 4, "router": {"name": "smoe"},
                           "quantizer": {"name": "vqvae"}}},
         "head": {"name": "lm"},
         "train": {"steps": \(steps), "batch_size": 2, "eval_every": 5, "eval_batches": 2, "checkpoint_every": 5}}
        """.write(toFile: path, atomically: true, encoding: .utf8)
        return path
    }

    func testFreshRunRefusesAnEarlierRunUnlessForce() throws {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory") }
        let dir = try makeTempDir("rundir")
        let cfg = try tinyConfig(dir, steps: 10)
        let (s1, o1) = try train([cfg, "--out", "\(dir)/run"])
        XCTAssertEqual(s1, 0, o1)
        // A file that is not a run's (a sweep's config.input.json, notes) survives --force.
        try "notes".write(toFile: "\(dir)/run/notes.txt", atomically: true, encoding: .utf8)
        let before = try String(contentsOfFile: "\(dir)/run/metrics.jsonl", encoding: .utf8)

        let (s2, o2) = try train([cfg, "--out", "\(dir)/run", "--set", "train.steps=5"])
        XCTAssertEqual(s2, 64, o2)
        XCTAssertTrue(o2.contains("\(dir)/run already holds a run (config.json, metrics.jsonl"), o2)
        XCTAssertTrue(o2.contains("vqmoe train --resume \(dir)/run") && o2.contains("--force"), o2)
        XCTAssertEqual(try String(contentsOfFile: "\(dir)/run/metrics.jsonl", encoding: .utf8), before)

        // --force: the earlier run's files go first, so its 10-step checkpoints and result do
        // not outlive it under the new config.
        let (s3, o3) = try train([cfg, "--out", "\(dir)/run", "--set", "train.steps=4", "--force"])
        XCTAssertEqual(s3, 0, o3)
        let best = try CheckpointSidecar.read("\(dir)/run/best.json")
        XCTAssertEqual(best.step, 4)
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/run/last.json"))  // 4 < checkpoint_every
        XCTAssertTrue(FileManager.default.fileExists(atPath: "\(dir)/run/notes.txt"))
        let steps = try String(contentsOfFile: "\(dir)/run/metrics.jsonl", encoding: .utf8).split(separator: "\n")
            .compactMap { try JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
            .compactMap { $0["step"] as? Int }
        XCTAssertEqual(steps.max(), 3)

        // --force is for fresh runs only.
        let (s4, o4) = try train(["--resume", "\(dir)/run", "--force"])
        XCTAssertEqual(s4, 64, o4)
    }

    /// `--resume` with train.steps at or below the checkpoint's step used to loop without end;
    /// now it is refused, naming both steps.
    func testResumePastTheEndIsRefused() throws {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory") }
        let dir = try makeTempDir("rundir-past")
        let cfg = try tinyConfig(dir, steps: 10)
        let (s1, o1) = try train([cfg, "--out", "\(dir)/run"])
        XCTAssertEqual(s1, 0, o1)
        let (s2, o2) = try train(["--resume", "\(dir)/run", "--set", "train.steps=5"])
        XCTAssertEqual(s2, 65, o2)
        XCTAssertTrue(o2.contains("\(dir)/run is at step 10, past train.steps = 5"), o2)
        // Continuing to a later step works and keeps the metrics of the first 10 steps.
        let (s3, o3) = try train(["--resume", "\(dir)/run", "--set", "train.steps=12"])
        XCTAssertEqual(s3, 0, o3)
        XCTAssertTrue(o3.contains("resuming tiny at step 10"), o3)
        // Nothing to resume where a run stopped before its first checkpoint (config.json only).
        try FileManager.default.createDirectory(atPath: "\(dir)/empty", withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: "\(dir)/run/config.json", toPath: "\(dir)/empty/config.json")
        let (s4, o4) = try train(["--resume", "\(dir)/empty"])
        XCTAssertEqual(s4, 68, o4)
        XCTAssertTrue(o4.contains("\(dir)/empty: nothing to resume"), o4)
    }

    /// A second process on the directory of a running one is refused with the holder's PID;
    /// the first finishes undisturbed.
    func testSecondProcessOnARunningDirectoryIsRefused() throws {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory") }
        let dir = try makeTempDir("rundir-lock")
        let cfg = try tinyConfig(dir, steps: 100_000)
        let first = Process()
        first.executableURL = URL(fileURLWithPath: vqmoe)
        first.arguments = ["--registry", "\(repoRoot)/registry.json", "train", cfg, "--out", "\(dir)/run"]
        first.standardOutput = FileHandle.nullDevice
        first.standardError = FileHandle.nullDevice
        try first.run()
        defer { if first.isRunning { first.terminate() } }
        var waited = 0.0
        while !FileManager.default.fileExists(atPath: "\(dir)/run/metrics.jsonl") && waited < 60 {
            Thread.sleep(forTimeInterval: 0.1); waited += 0.1
        }
        for args in [[cfg, "--out", "\(dir)/run"], [cfg, "--out", "\(dir)/run", "--force"]] {
            let (s, o) = try train(args)
            XCTAssertEqual(s, 64, o)
            XCTAssertTrue(
                o.contains("\(dir)/run is in use by another vqmoe process (pid \(first.processIdentifier) on "), o)
        }
        first.interrupt()
        first.waitUntilExit()
        XCTAssertEqual(first.terminationStatus, 130)
        // The lock went with the process: the run resumes.
        let (s, o) = try train(["--resume", "\(dir)/run", "--stop-after", "\(try resumeStep(dir) + 1)"])
        XCTAssertEqual(s, 0, o)
    }

    /// A full disk (simulated with a file-size limit, `ulimit -f`, which fails writes as a full
    /// disk does) ends training with exit 74, an error naming the file and the last good
    /// checkpoint; the run resumes from it once there is room, and its metrics stay valid JSON.
    func testFullDiskStopsWithTheLastGoodCheckpoint() throws {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory") }
        let dir = try makeTempDir("rundir-full")
        let cfg = try tinyConfig(dir, steps: 3000)
        let command =
            "ulimit -f 300; trap '' XFSZ; exec '\(vqmoe)' --registry '\(repoRoot)/registry.json' train '\(cfg)' "
            + "--out '\(dir)/run' --set train.log_every=1 --set train.checkpoint_every=50"
        let (s, o) = try runProcess("/bin/bash", ["-c", command], cwd: repoRoot)
        XCTAssertEqual(s, 74, o)
        let step = try resumeStep(dir)
        XCTAssertTrue(
            o.contains(
                "\(dir)/run/metrics.jsonl: cannot append a metrics line (File too large); the last good "
                    + "checkpoint is \(dir)/run/last.safetensors (step \(step)): free space, then `vqmoe train --resume "
            ),
            o)
        XCTAssertGreaterThan(step, 0)
        let (s2, o2) = try train(["--resume", "\(dir)/run"])
        XCTAssertEqual(s2, 0, o2)
        let lines = try String(contentsOfFile: "\(dir)/run/metrics.jsonl", encoding: .utf8).split(separator: "\n")
        let steps = try lines.map { try XCTUnwrap(JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any]) }
            .filter { $0["split"] as? String == "train" }.compactMap { $0["step"] as? Int }
        XCTAssertEqual(steps, Array(0..<3000))
    }

    /// A plugin whose backward writes NaN stops training at that step with the plugin, its layer
    /// and the call named (it used to say only "non-finite gradient norm"), and at step 0 says
    /// there is no checkpoint yet instead of pointing to one that does not exist.
    func testNonFinitePluginBackwardIsNamedInTraining() throws {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory") }
        let dir = try makeTempDir("rundir-nan")
        let lib = try fixture(dir, "libfixture_router.so", ["FIXTURE_BACKWARD"])
        try """
        {"version": 1, "plugins": [{"name": "fixture_router", "kind": "router", "library": "\(lib)"}]}
        """.write(toFile: "\(dir)/registry.json", atomically: true, encoding: .utf8)
        let cfg = try tinyConfig(dir, steps: 10)
        let (s, o) = try runProcess(
            vqmoe,
            [
                "--registry", "\(repoRoot)/registry.json", "--registry", "\(dir)/registry.json", "train", cfg,
                "--out", "\(dir)/run", "--set", "model.ffn.mode=smoe", "--set", "model.ffn.router.name=fixture_router",
                "--set", "model.ffn.router.fail=nan_backward",
            ], cwd: repoRoot)
        XCTAssertEqual(s, 69, o)
        XCTAssertTrue(
            o.contains(
                "error: training step 0: router 'fixture_router' (layers.0.ffn.router) produced a non-finite input "
                    + "gradient in backward (element 256 = nan); no checkpoint was written yet"), o)
    }

    /// A plugin that segfaults: training's last words name the plugin, its layer and the call
    /// (then the usual crash report); `plugins check` survives it and reports a failed check.
    func testCrashInsideAPluginIsNamed() throws {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory") }
        let dir = try makeTempDir("rundir-segv")
        let lib = try fixture(dir, "libfixture_router.so")
        try """
        {"version": 1, "plugins": [{"name": "fixture_router", "kind": "router", "library": "\(lib)"}]}
        """.write(toFile: "\(dir)/registry.json", atomically: true, encoding: .utf8)
        let cfg = try tinyConfig(dir, steps: 10)
        let registries = ["--registry", "\(repoRoot)/registry.json", "--registry", "\(dir)/registry.json"]
        let p = Process()
        p.executableURL = URL(fileURLWithPath: vqmoe)
        p.arguments =
            registries + [
                "train", cfg, "--out", "\(dir)/run", "--set", "model.ffn.mode=smoe", "--set",
                "model.ffn.router.name=fixture_router", "--set", "model.ffn.router.fail=segfault",
            ]
        p.environment = ProcessInfo.processInfo.environment.merging(["SWIFT_BACKTRACE": "enable=no"]) { _, b in b }
        let err = Pipe()
        (p.standardOutput, p.standardError) = (FileHandle.nullDevice, err)
        try p.run()
        let text = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        XCTAssertEqual(p.terminationReason, .uncaughtSignal, text)
        XCTAssertEqual(p.terminationStatus, SIGSEGV, text)
        XCTAssertTrue(
            text.contains(
                "vqmoe: fatal signal SIGSEGV inside router 'fixture_router' (layers.0.ffn.router) in forward"),
            text)

        let (s, o) = try runProcess(
            vqmoe, registries + ["plugins", "check", "fixture_router", "--set", "fail=segfault"])
        XCTAssertEqual(s, 1, o)
        XCTAssertTrue(o.contains("FAIL  crashed  with SIGSEGV in forward (router 'fixture_router' (check))"), o)
        let (s2, o2) = try runProcess(vqmoe, registries + ["plugins", "check", "fixture_router"])
        XCTAssertEqual(s2, 0, o2)
        XCTAssertTrue(o2.hasSuffix("11 passed, 0 failed\n"), o2)
    }

    private func resumeStep(_ dir: String) throws -> Int {
        try XCTUnwrap(CheckpointSidecar.read("\(dir)/run/last.json").run?.nextStep)
    }
}
