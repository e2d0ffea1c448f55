import Foundation
import VQMoE
import XCTest

/// Where SwiftPM put the plugin libraries: beside the test binary (.build/<config>/).
func buildDirectory() -> String { Registry.executableDirectory() }

/// Open a plugin library built by this package, by its product name (e.g. "RouterSMoE").
func openPlugin(_ product: String) throws -> PluginLibrary {
    try PluginLibrary.open("\(buildDirectory())/lib\(product).so")
}

/// Create an instance with the given hyperparameters (schema defaults for the rest).
func makeInstance(
    _ lib: PluginLibrary, dims: ModelDims, hyperparameters: [String: Any] = [:],
    seed: UInt64 = 1
) throws -> PluginInstance {
    // vqvae's, vqgan_cos's and rvq's tests check each codebook mechanism from the plain quantizer (their
    // defaults turn EMA, k-means init and dead-code restart on); a test turns on what it checks.
    let values =
        ["vqvae", "vqgan_cos", "rvq"].contains(lib.name)
        ? plainVQVAE.merging(hyperparameters) { _, given in given } : hyperparameters
    let hp = try ResolvedHyperparameters(schema: lib.schema, values: values, keyPath: lib.name)
    return try PluginInstance(
        library: lib, instanceName: "test.\(lib.name)", dims: dims, hyperparameters: hp, seed: seed)
}

/// vqvae / vqgan_cos / rvq without their healthy defaults: a trained codebook, no EMA, k-means or restart.
nonisolated(unsafe) let plainVQVAE: [String: Any] = ["ema": false, "kmeans_init": false, "dead_code_threshold": 0.0]

/// Seeded N(0, scale²) values.
func randomNormal(_ count: Int, seed: UInt64, scale: Float = 1) -> [Float] {
    var r = HostRNG.make(seed: seed, stream: 99)
    return (0..<count).map { _ in HostRNG.normal(&r) * scale }
}

/// The shared real data directory (../shared/data beside the checkout), if present.
func sharedDataDirectory() -> String? {
    var dir = URL(fileURLWithPath: #filePath)
    for _ in 0..<6 {
        dir = dir.deletingLastPathComponent()
        let candidate = dir.appendingPathComponent("shared/data").path
        if FileManager.default.fileExists(atPath: candidate) { return candidate }
    }
    return nil
}
