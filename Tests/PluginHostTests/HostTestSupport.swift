import Foundation
import VQMoE
import XCTest

/// The repository root (three levels above this file).
let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
    .deletingLastPathComponent().path

/// Where SwiftPM put the host and plugin libraries (beside the test binary).
let buildDir = Registry.executableDirectory()

/// A fresh temporary directory.
func makeTempDir(_ tag: String) throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vqmoe-\(tag)-\(UUID().uuidString)").path
    try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    return dir
}

/// Run a program; returns (exit status, stdout+stderr).
@discardableResult
func runProcess(
    _ exe: String, _ args: [String], cwd: String? = nil, env: [String: String] = [:]
) throws -> (Int32, String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: exe)
    p.arguments = args
    if let cwd { p.currentDirectoryURL = URL(fileURLWithPath: cwd) }
    p.environment = ProcessInfo.processInfo.environment.merging(env) { _, new in new }
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    try p.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}

/// Compile a C plugin source against the ABI header into a shared library (with
/// `$VQMOE_TEST_CFLAGS` and compiler `$VQMOE_TEST_CC`: the sanitizer lane builds them with
/// clang -fsanitize=address, the runtime the Swift side links).
func compilePlugin(_ source: String, to output: String, defines: [String] = [], include: String? = nil) throws {
    let env = ProcessInfo.processInfo.environment
    let extra = (env["VQMOE_TEST_CFLAGS"] ?? "").split(separator: " ").map(String.init)
    let (status, out) = try runProcess(
        "/usr/bin/env",
        [env["VQMOE_TEST_CC"] ?? "cc"] + extra + [
            "-O1", "-std=c11", "-shared", "-fPIC",
            "-I\(include ?? "\(repoRoot)/Sources/VQMoEABI/include")",
        ] + defines.map { "-D\($0)" } + [source, "-o", output, "-lm"])
    if status != 0 { throw VQMoEError(.internalError, "cc failed for \(source):\n\(out)") }
}

/// The failure fixture compiled with `defines` into `dir/name` (against `include`'s header).
func fixture(_ dir: String, _ name: String, _ defines: [String] = [], include: String? = nil) throws -> String {
    let out = "\(dir)/\(name)"
    try compilePlugin(
        "\(repoRoot)/Tests/PluginHostTests/Fixtures/fixture_router.c", to: out, defines: defines, include: include)
    return out
}

/// Write a registry file and load it (no search path unless given).
func registry(_ dir: String, _ json: String, searchPath: [String] = []) throws -> Registry {
    let path = "\(dir)/registry.json"
    try json.write(toFile: path, atomically: true, encoding: .utf8)
    return try Registry.load(registryPath: path, binDir: buildDir, searchPath: searchPath)
}

/// The message of the VQMoEError `body` throws (fails the test if it does not throw one).
func errorMessage(_ body: () throws -> Void, file: StaticString = #filePath, line: UInt = #line) -> String {
    do {
        try body()
        XCTFail("expected an error", file: file, line: line)
        return ""
    } catch let e as VQMoEError {
        return e.message
    } catch {
        XCTFail("expected a VQMoEError, got \(error)", file: file, line: line)
        return ""
    }
}
