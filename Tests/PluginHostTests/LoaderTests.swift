import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The plugin rows of docs/design.md, "Bad inputs": other ABI major, missing entry symbol, dlopen failure, plugin errors
/// and non-finite outputs, each with a clear message.
final class LoaderTests: XCTestCase {
    func testOtherABIMajorIsRefusedWithBothVersions() throws {
        let dir = try makeTempDir("abi")
        let path = try fixture(dir, "libabi2.so", ["FIXTURE_ABI=0x00020003u"])
        let msg = errorMessage { _ = try PluginLibrary.open(path) }
        XCTAssertTrue(msg.contains(path), msg)
        XCTAssertTrue(msg.contains("ABI 2.3"), msg)
        XCTAssertTrue(msg.contains("ABI \(VQMOE_ABI_VERSION_MAJOR).\(VQMOE_ABI_VERSION_MINOR)"), msg)
    }

    /// Same major, older minor (a plugin built against the 1.0 header): loads.
    func testOlderMinorOfTheSameMajorLoads() throws {
        let dir = try makeTempDir("abi10")
        let path = try fixture(dir, "libabi10.so", ["FIXTURE_ABI=0x00010000u"])
        XCTAssertNoThrow(try PluginLibrary.open(path))
    }

    func testMissingEntrySymbol() throws {
        let dir = try makeTempDir("noentry")
        let path = try fixture(dir, "libnoentry.so", ["FIXTURE_NO_ENTRY"])
        let msg = errorMessage { _ = try PluginLibrary.open(path) }
        XCTAssertTrue(msg.contains(path) && msg.contains("vqmoe_plugin_entry"), msg)
    }

    func testDlopenFailureCarriesDlerror() throws {
        let dir = try makeTempDir("garbage")
        let path = "\(dir)/libgarbage.so"
        try "this is not an ELF file".write(toFile: path, atomically: true, encoding: .utf8)
        let msg = errorMessage { _ = try PluginLibrary.open(path) }
        XCTAssertTrue(msg.contains("dlopen failed"), msg)
        // glibc's dlerror names the file and the reason (e.g. "invalid ELF header" / "file too short").
        XCTAssertTrue(msg.contains("libgarbage.so:") && (msg.contains("ELF") || msg.contains("too short")), msg)
    }

    func testMissingFile() {
        let msg = errorMessage { _ = try PluginLibrary.open("/nonexistent/libnothing.so") }
        XCTAssertTrue(msg.contains("/nonexistent/libnothing.so") && msg.contains("does not exist"), msg)
    }

    private func router(_ fail: String, _ defines: [String] = []) throws -> RouterInstance {
        let dir = try makeTempDir("fail")
        let lib = try PluginLibrary.open(try fixture(dir, "libfixture_\(fail).so", defines))
        let hp = try ResolvedHyperparameters(schema: lib.schema, values: ["fail": fail], keyPath: "model.router")
        return try RouterInstance(
            PluginInstance(
                library: lib, instanceName: "layers.1.router", dims: ModelDims(dModel: 4, nExperts: 2),
                hyperparameters: hp, seed: 1))
    }

    private func forward(_ r: RouterInstance) throws {
        var x = [Float](repeating: 1, count: 8), w = [Float](repeating: 0, count: 2),
            load = [Float](repeating: 0, count: 2)
        var idx = [Int32](repeating: 0, count: 2)
        let step = StepInfo(step: 0, totalSteps: 1, train: true, seed: 0)
        let shape = try r.shape(step)
        _ = try x.withUnsafeMutableBufferPointer { xp in
            try idx.withUnsafeMutableBufferPointer { ip in
                try w.withUnsafeMutableBufferPointer { wp in
                    try load.withUnsafeMutableBufferPointer { lp in
                        try r.forward(
                            step, x: xp.baseAddress!, tokenIDs: nil, nGroups: 1, groupSize: 2, shape: shape,
                            outputs: RouterOutputs(
                                expertIndex: ip.baseAddress, weights: wp.baseAddress, expertLoad: lp.baseAddress!))
                    }
                }
            }
        }
    }

    func testPluginErrorNamesPluginInstanceAndCall() throws {
        let r = try router("forward_error")
        let msg = errorMessage { try forward(r) }
        XCTAssertTrue(
            msg.contains("'fixture_router'") && msg.contains("layers.1.router") && msg.contains("forward")
                && msg.contains("fixture asked to fail in forward"), msg)
    }

    func testNonFiniteOutputIsAnError() throws {
        let r = try router("nan")
        do {
            try forward(r)
            XCTFail("NaN weights were accepted")
        } catch let e as VQMoEError {
            XCTAssertEqual(e.category, .numeric)
            XCTAssertTrue(
                e.message.contains("non-finite routing weight") && e.message.contains("fixture_router"), e.message)
        }
    }

    /// A NaN that a plugin's backward writes is named (plugin, layer, call) in training, and
    /// fails `plugins check` (every element of every gradient, not only the gradcheck's samples).
    func testNonFiniteBackwardIsNamedAndFailsTheCheck() throws {
        // x (2,4), one expert per token; buffers the host would own.
        let x = UnsafeMutablePointer<Float>.allocate(capacity: 8),
            gx = UnsafeMutablePointer<Float>.allocate(capacity: 8)
        let w = UnsafeMutablePointer<Float>.allocate(capacity: 2),
            load = UnsafeMutablePointer<Float>.allocate(capacity: 2)
        let gw = UnsafeMutablePointer<Float>.allocate(capacity: 2),
            idx = UnsafeMutablePointer<Int32>.allocate(capacity: 2)
        defer { [x, gx, w, load, gw].forEach { $0.deallocate() }; idx.deallocate() }
        x.initialize(repeating: 1, count: 8)
        let step = StepInfo(step: 0, totalSteps: 1, train: true, seed: 0)
        func backward(_ r: RouterInstance, gradWeight: Float) throws {
            let shape = try r.shape(step)
            let ctx = try XCTUnwrap(
                try r.forward(
                    step, x: x, tokenIDs: nil, nGroups: 1, groupSize: 2, shape: shape,
                    outputs: RouterOutputs(expertIndex: idx, weights: w, expertLoad: load)
                ).ctx)
            gx.initialize(repeating: 0, count: 8)
            gw.initialize(repeating: gradWeight, count: 2)
            try r.backward(ctx, n: 2, shape: shape, gradWeights: gw, gradAux: 1, gradX: gx)
        }
        let msg = errorMessage { try backward(try router("nan_backward", ["FIXTURE_BACKWARD"]), gradWeight: 1) }
        XCTAssertEqual(
            msg,
            "router 'fixture_router' (layers.1.router) produced a non-finite input gradient in backward (element 4 = nan)"
        )
        // A NaN handed in is not blamed on the plugin (the host's gradient-norm check reports the step).
        XCTAssertNoThrow(try backward(try router("none", ["FIXTURE_BACKWARD"]), gradWeight: .nan))

        let dir = try makeTempDir("nan-backward")
        let lib = try PluginLibrary.open(try fixture(dir, "libnanbw.so", ["FIXTURE_BACKWARD"]))
        let ok = PluginChecker(library: lib).run()
        XCTAssertTrue(ok.allSatisfy(\.passed), ok.map(\.description).joined(separator: "\n"))
        let bad = PluginChecker(library: lib, hyperparameters: ["fail": "nan_backward"]).run()
        let failed = bad.filter { !$0.passed }
        XCTAssertEqual(failed.map(\.name), ["router calls"], bad.map(\.description).joined(separator: "\n"))
        XCTAssertEqual(
            failed.first?.detail,
            "router 'fixture_router' (check) produced a non-finite input gradient in backward (element 40 = nan)")
    }

    /// Buffer sizes a plugin declares are multiplied with overflow checks and must fit the
    /// machine: [2^40, 2^40] used to wrap to 0 bytes (and pass), 2^62 floats to crash.
    func testOversizedBuffersAreRefused() throws {
        let wrapped = errorMessage { _ = try router("wrapped_buffer") }
        XCTAssertEqual(
            wrapped,
            "router 'fixture_router' (layers.1.router): buffer 'w': shape [1099511627776, 1099511627776] has more "
                + "elements than a 64-bit size holds")
        let huge = errorMessage { _ = try router("huge_buffer") }
        XCTAssertTrue(
            huge.hasPrefix(
                "router 'fixture_router' (layers.1.router): buffer 'w': shape [4611686018427387904] needs more than "
                    + "2^63 bytes, more than this machine's memory"), huge)
        let dir = try makeTempDir("buffers")
        let lib = try PluginLibrary.open(try fixture(dir, "libbuf.so"))
        for fail in ["wrapped_buffer", "huge_buffer"] {
            let results = PluginChecker(library: lib, hyperparameters: ["fail": fail]).run()
            XCTAssertFalse(results.allSatisfy(\.passed), fail)
            XCTAssertTrue(
                results.contains { !$0.passed && $0.detail.contains("buffer 'w': shape") },
                results.map(\.description).joined(separator: "\n"))
        }
    }

    func testCreateErrorCarriesPluginMessage() throws {
        let msg = errorMessage { _ = try router("create_error") }
        XCTAssertTrue(msg.contains("create") && msg.contains("fixture asked to fail in create"), msg)
    }

    func testHealthyFixturePassesCheck() throws {
        let dir = try makeTempDir("ok")
        let lib = try PluginLibrary.open(try fixture(dir, "libfixture_ok.so"))
        let results = PluginChecker(library: lib).run()
        XCTAssertTrue(results.allSatisfy(\.passed), results.map(\.description).joined(separator: "\n"))
        let bad = PluginChecker(library: lib, hyperparameters: ["fail": "nan"]).run()
        XCTAssertFalse(bad.allSatisfy(\.passed))
    }

    /// `plugins check` says when a plugin's loss is a statistic of the whole batch and the
    /// plugin does not reduce it over the ranks (no VQMOE_PLUGIN_GLOBAL_BATCH); a per-token
    /// loss and a global-batch plugin get no note.
    func testCheckNotesBatchStatisticsWithoutCollectives() throws {
        let dir = try makeTempDir("batchstat")
        func detail(_ lib: PluginLibrary) throws -> String {
            let results = PluginChecker(library: lib).run()
            XCTAssertTrue(results.allSatisfy(\.passed), results.map(\.description).joined(separator: "\n"))
            return try XCTUnwrap(results.first { $0.name.hasPrefix("batch statistics") }).detail
        }
        let batchAux = try detail(try PluginLibrary.open(try fixture(dir, "libbatch.so", ["FIXTURE_BATCH_AUX"])))
        XCTAssertTrue(batchAux.hasPrefix("note:") && batchAux.contains("VQMOE_PLUGIN_GLOBAL_BATCH"), batchAux)
        let perToken = try detail(try PluginLibrary.open(try fixture(dir, "libok.so")))
        XCTAssertTrue(perToken.contains("mean over tokens"), perToken)
        let reg = try Registry.load(registryPath: "\(repoRoot)/registry.json", binDir: buildDir, searchPath: [])
        let smoe = try detail(try reg.library(named: "smoe", kind: .router))
        XCTAssertTrue(smoe.contains("declares VQMOE_PLUGIN_GLOBAL_BATCH"), smoe)
    }

    /// ABI 1.2 lets the arrays grow: a plugin built against the 1.1 header (no element sizes)
    /// loads and passes every check; one whose schema entries are larger than this host's
    /// vqmoe_hparam_spec (as a later 1.x might make them) is read by its hparam_spec_size, and
    /// its create finds each value through vqmoe_hp_at.
    func testPluginsOfOtherMinorVersionsLoad() throws {
        let dir = try makeTempDir("abi11")
        let old = try PluginLibrary.open(
            try fixture(dir, "libabi11.so", include: "\(repoRoot)/Tests/PluginHostTests/Fixtures/abi_1_1"))
        XCTAssertEqual(old.abiVersion, 0x0001_0001)
        let results = PluginChecker(library: old).run()
        XCTAssertTrue(results.allSatisfy(\.passed), results.map(\.description).joined(separator: "\n"))
        let wide = try PluginLibrary.open(try fixture(dir, "libwide.so", ["FIXTURE_WIDE_SPECS"]))
        XCTAssertEqual(wide.schema.map(\.name), ["fail", "level"])
        XCTAssertEqual(wide.schema[1].defaultNumber, 7)
        XCTAssertTrue(PluginChecker(library: wide, hyperparameters: ["level": 3]).run().allSatisfy(\.passed))
    }
}
