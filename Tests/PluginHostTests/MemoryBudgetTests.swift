import Foundation
import VQMoE
import XCTest

/// A run is sized before it allocates: `--dry-run` prints the estimate, a run that cannot fit is
/// refused with the estimate and the limit (it used to segfault or be OOM-killed), and sizes from
/// outside are multiplied with overflow checks.
final class MemoryBudgetTests: XCTestCase {
    let vqmoe = "\(buildDir)/vqmoe"

    private func run(_ args: [String]) throws -> (Int32, String) {
        try runProcess(vqmoe, ["--registry", "\(repoRoot)/registry.json"] + args, cwd: repoRoot)
    }

    func testCheckedSizesAndParsing() throws {
        XCTAssertEqual(try MemoryBudget.checkedSize([3, 4], elementBytes: 4, what: "t").count, 12)
        XCTAssertEqual(try MemoryBudget.checkedSize([3, 4], elementBytes: 4, what: "t").bytes, 48)
        XCTAssertEqual(try MemoryBudget.checkedSize([], elementBytes: 8, what: "t").bytes, 8)
        XCTAssertEqual(try MemoryBudget.checkedSize([0, 1 << 62], elementBytes: 4, what: "t").bytes, 0)
        for shape in [[1 << 40, 1 << 40], [1 << 62], [-1, 4]] {
            XCTAssertThrowsError(try MemoryBudget.checkedSize(shape, elementBytes: 4, what: "t"), "\(shape)")
        }
        XCTAssertEqual(MemoryBudget.parse("8G"), 8_000_000_000)
        XCTAssertEqual(MemoryBudget.parse("512MB"), 512_000_000)
        XCTAssertEqual(MemoryBudget.parse("1.5k"), 1500)
        XCTAssertEqual(MemoryBudget.parse("123"), 123)
        for bad in ["", "G", "-1G", "lots", "1e30"] { XCTAssertNil(MemoryBudget.parse(bad), bad) }
    }

    /// The estimate for the dense bench model; what it counts is visible in `--dry-run`.
    func testDryRunPrintsTheEstimateAndStartsNothing() throws {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory") }
        let dir = try makeTempDir("dryrun")
        let (s, o) = try run(["train", "configs/bench/dense.json", "--dry-run", "--out", "\(dir)/run"])
        XCTAssertEqual(s, 0, o)
        // d 256, 4 layers, d_inner 512, 256 bytes: 4 × (4·256² + 8·256 + 2·256·512 + 512 + 256)
        // + 2·256² + 2·256 = 2,240,000 floats of the host's (the lm head's are plugin buffers).
        XCTAssertTrue(o.contains("bench_dense: parameters 9.0 MB, gradients 9.0 MB, optimizer moments 17.9 MB"), o)
        XCTAssertTrue(o.contains("estimated peak") && o.contains("limit "), o)
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/run"))
        // The same config at a limit below its estimate: refused, naming both numbers.
        let (s2, o2) = try run(["--max-memory", "100M", "train", "configs/bench/dense.json", "--out", "\(dir)/run"])
        XCTAssertEqual(s2, 65, o2)
        XCTAssertTrue(o2.contains("more than the limit of 100.0 MB (--max-memory)"), o2)
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/run"))
        let (s3, o3) = try run(["--max-memory", "lots", "train", "configs/bench/dense.json", "--dry-run"])
        XCTAssertEqual(s3, 64, o3)
    }

    /// seq_len 100,000 (a T×T attention of 160 GB) and 4,096 experts of d_inner 10^6 used to
    /// crash inside OpenBLAS or on a failed allocation; now they are refused before allocating.
    func testRunsThatCannotFitAreRefusedBeforeAllocating() throws {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory") }
        let dir = try makeTempDir("toobig")
        for settings in [
            ["model.seq_len=100000"], ["model.ffn.n_experts=4096", "model.ffn.d_inner=1000000"],
        ] {
            let (s, o) = try run(
                ["train", "configs/enwik8_smoe.json", "--out", "\(dir)/run"] + settings.flatMap { ["--set", $0] })
            XCTAssertEqual(s, 65, o)
            XCTAssertTrue(o.contains("this run needs an estimated") && o.contains("more than the limit of"), o)
            XCTAssertTrue(o.contains("activations kept for the backward"), o)
            XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/run"))
        }
    }

    /// When the system has less than it reported (here a 3 GB address-space limit under a
    /// --max-memory of 1 TB, so the estimate passes), the allocation that fails ends the run with
    /// exit 65 and a message naming the tensor and its size, not a crash on a NULL pointer.
    func testFailedAllocationIsNamed() throws {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory") }
        // AddressSanitizer reserves terabytes of shadow address space: no ulimit -v under it.
        if ProcessInfo.processInfo.environment["ASAN_OPTIONS"] != nil { throw XCTSkip("AddressSanitizer lane") }
        let dir = try makeTempDir("nomem")
        let command =
            "ulimit -v 3000000; exec '\(vqmoe)' --registry '\(repoRoot)/registry.json' --max-memory 1T train "
            + "configs/shakespeare_char_cpu.json --out '\(dir)/run' --set model.n_layer=1 --set model.d_model=512 "
            + "--set model.ffn.d_inner=2000000 --set train.steps=2"
        let (s, o) = try runProcess("/bin/bash", ["-c", command], cwd: repoRoot)
        XCTAssertEqual(s, 65, o)
        XCTAssertTrue(
            o.contains(
                "vqmoe: out of memory: cannot allocate 4096000000 bytes for parameter layers.0.ffn.experts.fc1.weight [1, 2000000, 512]; the run does not fit"
            ), o)
    }
}
