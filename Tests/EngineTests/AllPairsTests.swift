import Foundation
import VQMoE
import XCTest

/// Every quantizer with every router in the VQMoE layer (y = g_c·router path + g_d·discrete
/// path): a few training steps on real enwik8-mini batches must keep the loss finite and lower it.
final class AllPairsTests: XCTestCase {
    static let quantizers = ["vqvae", "vqgan_cos", "lfq", "rvq"]
    static let routers = ["smoe", "xmoe", "stablemoe", "smoe_dropout", "softmoe", "dense"]

    func testEveryQuantizerWithEveryRouterTrains() throws {
        guard DataLocator.defaultRoot() != nil else { throw XCTSkip("no data directory (run scripts/get-data.sh)") }
        let registry = try Registry.load(
            registryPath: "\(engineRepoRoot)/registry.json", binDir: Registry.executableDirectory(), searchPath: [])
        var table: [String] = []
        for q in Self.quantizers {
            for r in Self.routers {
                var router: [String: Any] = ["name": r]
                if ["smoe", "xmoe"].contains(r) { router["k"] = 2 }
                let json: [String: Any] = [
                    "name": "pair_\(q)_\(r)", "seed": 11,
                    "data": ["name": "char", "path": "$DATA/enwik8-mini/enwik8-mini"],
                    "model": [
                        "n_layer": 1, "n_head": 2, "d_model": 32, "seq_len": 32,
                        "ffn": [
                            "mode": "vqmoe", "d_inner": 32, "n_experts": 4, "router": router, "quantizer": ["name": q],
                            "allow_token_mixing": r == "softmoe",
                        ],
                    ],
                    "head": ["name": "lm"],
                    "train": ["steps": 25, "batch_size": 4, "lr": 1e-2, "grad_clip": 1.0],
                ]
                let cfg = try RunConfig(json: json)
                let trainer = try Trainer(config: cfg, registry: registry, outDir: NSTemporaryDirectory(), quiet: true)
                var losses: [Float] = []
                for step in 0..<cfg.train.steps {
                    let (parts, _) = try trainer.trainStep(step)
                    XCTAssertTrue(
                        parts.total.isFinite && parts.vq.isFinite && parts.aux.isFinite, "\(q) × \(r) step \(step)")
                    losses.append(parts.task)
                }
                let first = losses.prefix(3).reduce(0, +) / 3, last = losses.suffix(3).reduce(0, +) / 3
                XCTAssertLessThan(last, first - 0.5, "\(q) × \(r): task loss \(first) -> \(last)")
                table.append("\(q) × \(r): \(String(format: "%.3f -> %.3f", first, last))")
            }
        }
        print(table.joined(separator: "\n"))
    }
}
