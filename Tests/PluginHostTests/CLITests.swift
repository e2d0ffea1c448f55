import Foundation
import VQMoE
import XCTest

/// The `vqmoe` executable end to end: listing, inspecting, checking, scaffolding, and the
/// third-party C plugin built outside SwiftPM.
final class CLITests: XCTestCase {
    let vqmoe = "\(buildDir)/vqmoe"

    private func run(_ args: [String], env: [String: String] = [:]) throws -> (Int32, String) {
        try runProcess(vqmoe, ["--registry", "\(repoRoot)/registry.json"] + args, cwd: repoRoot, env: env)
    }

    func testListJSONHasEveryFirstPlugin() throws {
        let (status, out) = try run(["plugins", "list", "--json"])
        XCTAssertEqual(status, 0, out)
        let rows = try JSONSerialization.jsonObject(with: Data(out.utf8)) as! [[String: Any]]
        let byName = Dictionary(uniqueKeysWithValues: rows.map { ($0["name"] as! String, $0) })
        for (name, kind) in [("vqvae", "quantizer"), ("smoe", "router"), ("char", "dataset"), ("lm", "head")] {
            XCTAssertEqual(byName[name]?["kind"] as? String, kind, name)
            XCTAssertEqual(byName[name]?["abi"] as? String, "1.0", name)
            XCTAssertEqual(byName[name]?["version"] as? String, "1.0.0", name)
        }
        XCTAssertEqual(byName["hash"]?["abi"] as? String, "ffi")
        XCTAssertEqual(byName["hash"]?["kind"] as? String, "router")
    }

    func testInspectShowsTheSchema() throws {
        let (status, out) = try run(["plugins", "inspect", "smoe"])
        XCTAssertEqual(status, 0, out)
        XCTAssertTrue(out.contains("smoe (router) 1.0.0"), out)
        XCTAssertTrue(out.range(of: #"\n\s+k\s+int\s+2\s+\[1, 64\]"#, options: .regularExpression) != nil, out)
    }

    func testUnknownNameExitsWithRegistryCode() throws {
        let (status, out) = try run(["plugins", "inspect", "vqvea"])
        XCTAssertEqual(status, 67)
        XCTAssertTrue(out.contains("error: unknown plugin 'vqvea'; known plugins: vqvae"), out)
        let (usage, text) = try run(["plugins", "frobnicate"])
        XCTAssertEqual(usage, 64)
        XCTAssertTrue(text.contains("unknown command 'plugins frobnicate'"), text)
    }

    func testCheckPassesForEveryRegisteredPlugin() throws {
        for name in ["vqvae", "smoe", "char", "lm", "hash", "lsh"] {
            let (status, out) = try run(["plugins", "check", name])
            XCTAssertEqual(status, 0, "\(name):\n\(out)")
            XCTAssertTrue(out.contains(" passed, 0 failed"), out)
        }
    }

    func testThirdPartyCPluginBuiltOutsideSwiftPM() throws {
        let dir = try makeTempDir("cplugin")
        let lib = "\(dir)/libcosine_vq.so"
        try compilePlugin("\(repoRoot)/Plugins/examples/cosine_vq/cosine_vq.c", to: lib)
        let reg = "\(dir)/registry.json"
        try """
        {"version": 1, "plugins": [{"name": "cosine_vq_c", "kind": "quantizer", "library": "$ROOT/libcosine_vq.so"}]}
        """.write(toFile: reg, atomically: true, encoding: .utf8)
        let (status, out) = try runProcess(vqmoe, ["--registry", reg, "plugins", "check", "cosine_vq_c"])
        XCTAssertEqual(status, 0, out)
        XCTAssertTrue(out.contains("gradcheck codebook (direction: stop-gradient loss) [loss]") && out.contains(" passed, 0 failed"), out)
        // Also registered by its descriptor name through VQMOE_PLUGIN_PATH, with no registry entry.
        let empty = "\(dir)/empty.json"
        try #"{"version": 1, "plugins": []}"#.write(toFile: empty, atomically: true, encoding: .utf8)
        let (s2, inspected) = try runProcess(vqmoe, ["--registry", empty, "plugins", "inspect", "cosine_vq_c"], env: ["VQMOE_PLUGIN_PATH": dir])
        XCTAssertEqual(s2, 0, inspected)
        XCTAssertTrue(inspected.contains("cosine_vq_c (quantizer) 1.0.0"), inspected)
    }

    func testScaffoldedCPluginsBuildAndPassCheck() throws {
        try scaffoldEveryKind(language: "c")
    }

    /// Each Swift scaffold is a standalone SwiftPM package (a copy of the header, one dynamic library).
    func testScaffoldedSwiftPluginsBuildAndPassCheck() throws {
        try scaffoldEveryKind(language: "swift")
    }

    private func scaffoldEveryKind(language: String) throws {
        let dir = try makeTempDir("scaffold-\(language)")
        for kind in PluginKind.allCases {
            let name = "my_\(kind.rawValue)"
            let folder = "\(dir)/\(name)"
            let (s1, o1) = try run(["plugin", "new", kind.rawValue, name, "--lang", language, "--dir", folder])
            XCTAssertEqual(s1, 0, o1)
            let (s2, o2) = try runProcess("\(folder)/build.sh", [])
            XCTAssertEqual(s2, 0, o2)
            let (s3, o3) = try run(["plugins", "check", "\(folder)/lib\(name).so"])
            XCTAssertEqual(s3, 0, "\(kind):\n\(o3)")
        }
        // The folder must not be overwritten.
        let (s4, o4) = try run(["plugin", "new", "head", "my_head", "--dir", "\(dir)/my_head"])
        XCTAssertEqual(s4, 64)
        XCTAssertTrue(o4.contains("already exists"), o4)
        let (s5, o5) = try run(["plugin", "new", "heads", "x", "--dir", "\(dir)/x"])
        XCTAssertEqual(s5, 64)
        XCTAssertTrue(o5.contains("unknown kind 'heads'; kinds: head"), o5)
    }
}
