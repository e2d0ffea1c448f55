import Foundation
import VQMoE
import XCTest

/// The registry rows of docs/design.md, "Bad inputs": unknown names (closest first), duplicate names, sha256 pins, and
/// the registry file's own mistakes.
final class RegistryTests: XCTestCase {
    func testProjectRegistryListsTheFirstPlugins() throws {
        let reg = try Registry.load(registryPath: "\(repoRoot)/registry.json", binDir: buildDir, searchPath: [])
        let names = Set(reg.entries.map(\.name))
        XCTAssertTrue(names.isSuperset(of: ["vqvae", "smoe", "char", "lm", "hash"]), "\(names)")
        XCTAssertEqual(try reg.library(named: "smoe", kind: .router).kind, .router)
        XCTAssertEqual(try reg.library(named: "vqvae").kind, .quantizer)
    }

    func testUnknownNameListsKnownNamesOfThatKindClosestFirst() throws {
        let reg = try Registry.load(registryPath: "\(repoRoot)/registry.json", binDir: buildDir, searchPath: [])
        let msg = errorMessage { _ = try reg.entry(named: "smeo", kind: .router) }
        XCTAssertTrue(msg.hasPrefix("unknown router 'smeo'; known routers: smoe"), msg)
        XCTAssertFalse(msg.contains("vqvae"), msg)  // only routers are listed
        let wrongKind = errorMessage { _ = try reg.entry(named: "vqvae", kind: .router) }
        XCTAssertTrue(wrongKind.contains("'vqvae' is a quantizer, not a router"), wrongKind)
    }

    func testDuplicateNameIsRefused() throws {
        let dir = try makeTempDir("dup")
        let msg = errorMessage {
            _ = try registry(
                dir,
                """
                {"version": 1, "plugins": [
                  {"name": "smoe", "kind": "router", "library": "$BIN/libRouterSMoE.so"},
                  {"name": "smoe", "kind": "router", "library": "$BIN/libHeadLM.so"}]}
                """)
        }
        XCTAssertTrue(
            msg.contains("duplicate plugin name 'smoe'") && msg.contains("plugins[0]") && msg.contains("plugins[1]"),
            msg)
    }

    func testDuplicateBetweenRegistryAndSearchPath() throws {
        let dir = try makeTempDir("duppath")
        let libs = "\(dir)/libs"
        try FileManager.default.createDirectory(atPath: libs, withIntermediateDirectories: true)
        _ = try fixture(libs, "libfixture.so")
        // Alone, the search path registers the fixture by its descriptor name.
        let ok = try registry(dir, #"{"version": 1, "plugins": []}"#, searchPath: [libs])
        XCTAssertEqual(try ok.library(named: "fixture_router").name, "fixture_router")
        let msg = errorMessage {
            _ = try registry(
                dir,
                """
                {"version": 1, "plugins": [{"name": "fixture_router", "kind": "router", "library": "\(libs)/libfixture.so"}]}
                """, searchPath: [libs])
        }
        XCTAssertTrue(msg.contains("duplicate plugin name 'fixture_router'"), msg)
    }

    func testSha256PinIsEnforced() throws {
        let dir = try makeTempDir("sha")
        let lib = try fixture(dir, "libpinned.so")
        let actual = try SHA256.hex(ofFile: lib)
        let good = try registry(
            dir,
            """
            {"version": 1, "plugins": [{"name": "fixture_router", "kind": "router", "library": "$ROOT/libpinned.so", "sha256": "\(actual)"}]}
            """)
        XCTAssertEqual(try good.library(named: "fixture_router").name, "fixture_router")
        let wrong = String(repeating: "0", count: 64)
        let bad = try registry(
            dir,
            """
            {"version": 1, "plugins": [{"name": "fixture_router", "kind": "router", "library": "$ROOT/libpinned.so", "sha256": "\(wrong)"}]}
            """)
        let msg = errorMessage { _ = try bad.library(named: "fixture_router") }
        XCTAssertTrue(msg.contains("sha256 mismatch") && msg.contains(wrong) && msg.contains(actual), msg)
    }

    func testRegistryFileMistakes() throws {
        let dir = try makeTempDir("regbad")
        let unknownKey = errorMessage {
            _ = try registry(dir, #"{"plugins": [{"name": "a", "kind": "router", "libary": "x.so"}]}"#)
        }
        XCTAssertTrue(unknownKey.contains("plugins[0].libary: unknown key; known: library"), unknownKey)
        let badKind = errorMessage {
            _ = try registry(dir, #"{"plugins": [{"name": "a", "kind": "routr", "library": "x.so"}]}"#)
        }
        XCTAssertTrue(badKind.contains("'routr' is not one of router, quantizer, dataset, head"), badKind)
        let noSource = errorMessage { _ = try registry(dir, #"{"plugins": [{"name": "a", "kind": "router"}]}"#) }
        XCTAssertTrue(noSource.contains("needs \"library\""), noSource)
        let notJSON = errorMessage { _ = try registry(dir, "{plugins: [") }
        XCTAssertTrue(notJSON.contains("not valid JSON"), notJSON)
    }

    func testPathExpansion() throws {
        let dir = try makeTempDir("expand")
        let reg = try registry(dir, #"{"plugins": []}"#)
        XCTAssertEqual(reg.expand("$BIN/libX.so"), "\(buildDir)/libX.so")
        XCTAssertEqual(reg.expand("${ROOT}/p/libY.so"), "\(dir)/p/libY.so")
    }
}
