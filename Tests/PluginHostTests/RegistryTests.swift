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

    /// A plugin folder stacks on the base registry: its library overrides the base entry of the
    /// same name, with a warning naming both origins.
    func testSearchPathOverridesTheBaseRegistry() throws {
        let dir = try makeTempDir("duppath")
        let libs = "\(dir)/libs"
        try FileManager.default.createDirectory(atPath: libs, withIntermediateDirectories: true)
        _ = try fixture(libs, "libfixture.so")
        // Alone, the search path registers the fixture by its descriptor name.
        let ok = try registry(dir, #"{"version": 1, "plugins": []}"#, searchPath: [libs])
        XCTAssertEqual(try ok.library(named: "fixture_router").name, "fixture_router")
        XCTAssertTrue(ok.warnings.isEmpty, "\(ok.warnings)")
        let reg = try registry(
            dir,
            """
            {"version": 1, "plugins": [{"name": "fixture_router", "kind": "router", "library": "$BIN/libRouterSMoE.so"}]}
            """, searchPath: [libs])
        XCTAssertEqual(reg.entries.filter { $0.name == "fixture_router" }.count, 1)
        XCTAssertEqual(try reg.entry(named: "fixture_router").origin, "\(libs)/libfixture.so")
        XCTAssertEqual(reg.warnings.count, 1)
        XCTAssertTrue(
            reg.warnings[0].contains("from \(libs)/libfixture.so overrides")
                && reg.warnings[0].contains("registry.json#plugins[0]"),
            reg.warnings[0])
    }

    /// The whole stack: base registry, a plugin folder with its own registry.json (an ffi entry
    /// whose library sits in the folder, a non-plugin .so skipped with a warning), then overlay
    /// files in order; `include` is refused with the stacking rule.
    func testRegistriesStack() throws {
        let dir = try makeTempDir("stack")
        let folder = "\(dir)/folder"
        try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        try FileManager.default.copyItem(atPath: "\(buildDir)/libFFIHashRouter.so", toPath: "\(folder)/libmyhash.so")
        try Data("not a library".utf8).write(to: URL(fileURLWithPath: "\(folder)/libbroken.so"))
        try """
        {"plugins": [{"name": "myhash", "kind": "router", "ffi": {"library": "$ROOT/libmyhash.so", "symbol": "vqmoe_hash_route", "signature": "void(const int32_t *token_ids, int64_t n, int64_t n_experts, int32_t *expert)"}}]}
        """.write(toFile: "\(folder)/registry.json", atomically: true, encoding: .utf8)
        let one = "\(dir)/one.json", two = "\(dir)/two.json"
        try
            #"{"plugins": [{"name": "smoe", "kind": "router", "library": "$BIN/libRouterSMoE.so", "defaults": {"k": 1}}]}"#
            .write(toFile: one, atomically: true, encoding: .utf8)
        try
            #"{"plugins": [{"name": "smoe", "kind": "router", "library": "$BIN/libRouterSMoE.so", "defaults": {"k": 3}}]}"#
            .write(toFile: two, atomically: true, encoding: .utf8)
        let reg = try Registry.load(
            registryPath: "\(repoRoot)/registry.json", overlays: [one, two], binDir: buildDir, searchPath: [folder])
        XCTAssertEqual(try reg.library(named: "myhash", kind: .router).name, "myhash")
        XCTAssertEqual(try reg.entry(named: "smoe").defaults["k"]?.value as? Int, 3)
        XCTAssertEqual(try reg.entry(named: "smoe").origin, "\(two)#plugins[0]")
        XCTAssertNotNil(try? reg.entry(named: "vqvae"))  // the base stays underneath
        XCTAssertEqual(reg.files, ["\(repoRoot)/registry.json", "\(folder)/registry.json", one, two])
        let smoeWarnings = reg.warnings.filter { $0.hasPrefix("plugin 'smoe'") }
        XCTAssertEqual(smoeWarnings.count, 2, "\(reg.warnings)")
        XCTAssertTrue(
            smoeWarnings[1].contains("from \(two)#plugins[0] overrides the router from \(one)#plugins[0]"),
            smoeWarnings[1])
        XCTAssertTrue(reg.warnings.contains { $0.contains("skipping \(folder)/libbroken.so") }, "\(reg.warnings)")
        XCTAssertFalse(reg.warnings.contains { $0.contains("libmyhash.so") }, "\(reg.warnings)")
        let include = errorMessage {
            _ = try registry(dir, #"{"include": ["other.json"], "plugins": []}"#)
        }
        XCTAssertTrue(include.contains(".include: unknown key") && include.contains("registries stack"), include)
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
        // A pin that is not 64 hex digits in a string is an error, not an unverified load.
        for pin in ["123", "\"abc\"", "\"\(String(repeating: "g", count: 64))\"", "null"] {
            let msg = errorMessage {
                _ = try registry(
                    dir,
                    """
                    {"version": 1, "plugins": [{"name": "fixture_router", "kind": "router", "library": "$ROOT/libpinned.so", "sha256": \(pin)}]}
                    """)
            }
            XCTAssertTrue(
                msg.hasSuffix(".sha256: expected a string of 64 hex digits, got \(pin == "null" ? "null" : pin)"), msg)
        }
    }

    /// The bytes a pin is checked on are the bytes loaded: the library is loaded from a private
    /// copy of what was hashed, not from the path again (which could have changed in between).
    func testPinnedBytesAreTheLoadedBytes() throws {
        let dir = try makeTempDir("sha-bytes")
        let other = try fixture(dir, "libother.so", ["FIXTURE_NAME=\"pinned_other\""])
        let path = try fixture(dir, "libplain.so")
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: other)))
        // Verified bytes of one library, the path of another: what loads is what was verified.
        let lib = try PluginLibrary.open(path, verified: bytes)
        XCTAssertEqual(lib.name, "pinned_other")
        XCTAssertEqual(lib.path, path)  // messages still name the registered path
        XCTAssertEqual(try PluginLibrary.open(path).name, "fixture_router")
        // No private copy is left behind.
        let left = try FileManager.default.contentsOfDirectory(atPath: NSTemporaryDirectory())
            .filter { $0.hasPrefix("vqmoe-plugin-") }
        XCTAssertEqual(left, [])
    }

    /// One plugin folder listed twice (as "dir" and "dir/") is scanned once: no duplicate
    /// warnings, no plugin "overriding" itself; a broken .so in it is skipped with a warning.
    func testSearchPathFolderListedTwiceIsScannedOnce() throws {
        let dir = try makeTempDir("twice")
        let libs = "\(dir)/libs"
        try FileManager.default.createDirectory(atPath: libs, withIntermediateDirectories: true)
        _ = try fixture(libs, "libfixture.so")
        try Data("not a library".utf8).write(to: URL(fileURLWithPath: "\(libs)/libbroken.so"))
        let reg = try registry(dir, #"{"version": 1, "plugins": []}"#, searchPath: [libs, libs + "/", libs])
        XCTAssertEqual(try reg.library(named: "fixture_router").name, "fixture_router")
        XCTAssertEqual(reg.warnings.count, 1, "\(reg.warnings)")
        XCTAssertTrue(reg.warnings[0].hasPrefix("VQMOE_PLUGIN_PATH: skipping \(libs)/libbroken.so: "), reg.warnings[0])
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
