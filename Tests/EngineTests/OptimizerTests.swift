import Foundation
import VQMoE
import XCTest

/// The optimizers behind the `Optimizer` protocol against references written from their papers.
final class OptimizerTests: XCTestCase {
    /// Parameters of awkward sizes (SIMD body and scalar tail), one without weight decay, one frozen.
    func parameters() -> [Parameter] {
        let a = Parameter(name: "a", shape: [37]), b = Parameter(name: "b", shape: [13], noDecay: true)
        let c = Parameter(name: "c", shape: [8])
        for (i, p) in [a, b, c].enumerated() { p.fillNormal(std: 0.5, seed: UInt64(10 + i)) }
        c.frozen = true
        return [a, b, c]
    }

    /// Lion (Chen et al. 2023, Algorithm 2) in Double: c = β1 m + (1−β1) g; θ −= lr (sign(c) + λ θ);
    /// m = β2 m + (1−β2) g — five steps with fresh gradients, weight decay on `a` only, `c` frozen.
    func testLionMatchesThePaper() {
        var tc = TrainConfig()
        tc.optimizer = .lion
        tc.beta1 = 0.9
        tc.beta2 = 0.99
        tc.weightDecay = 0.1
        let ps = parameters()
        let opt = makeOptimizer(parameters: ps, config: tc)
        XCTAssertTrue(opt is LionOptimizer)
        XCTAssertEqual(opt.slots.map(\.name), ["m"])
        var theta = ps.map { p in (0..<p.count).map { Double(p.data[$0]) } }
        var m = ps.map { [Double](repeating: 0, count: $0.count) }
        let lr: Float = 0.01
        for step in 0..<5 {
            for (i, p) in ps.enumerated() {
                let g = normals(p.count, seed: UInt64(100 * step + i))
                p.grad.update(from: g, count: p.count)
                guard !p.frozen else { continue }
                let wd = p.noDecay ? 0 : Double(tc.weightDecay)
                for j in 0..<p.count {
                    let gj = Double(g[j]), c = 0.9 * m[i][j] + 0.1 * gj
                    let sign: Double = c > 0 ? 1 : (c < 0 ? -1 : 0)
                    theta[i][j] -= Double(lr) * (sign + wd * theta[i][j])
                    m[i][j] = 0.99 * m[i][j] + 0.01 * gj
                }
            }
            opt.step(lr: lr)
        }
        XCTAssertEqual(opt.t, 5)
        for (i, p) in ps.enumerated() {
            for j in 0..<p.count {
                XCTAssertEqual(Double(p.data[j]), theta[i][j], accuracy: 1e-5, "\(p.name)[\(j)]")
                XCTAssertEqual(Double(opt.slots[0].buffers[i][j]), m[i][j], accuracy: 1e-5, "m \(p.name)[\(j)]")
            }
        }
        // The frozen parameter did not move.
        XCTAssertEqual(Array(UnsafeBufferPointer(start: ps[2].data, count: 8)), theta[2].map(Float.init))
    }

    /// Adam keeps two slots (m, v); the config reader gives Lion its own β2 default.
    func testSlotsAndDefaults() throws {
        let opt = makeOptimizer(parameters: parameters(), config: TrainConfig())
        XCTAssertTrue(opt is AdamOptimizer)
        XCTAssertEqual(opt.slots.map(\.name), ["m", "v"])
        func train(_ values: [String: Any]) throws -> TrainConfig {
            try RunConfig(json: ["data": ["name": "char"], "head": ["name": "lm"], "model": [:], "train": values]).train
        }
        XCTAssertEqual(try train(["optimizer": "lion"]).beta2, 0.99)
        XCTAssertEqual(try train(["optimizer": "lion", "beta2": 0.98]).beta2, 0.98)
        XCTAssertEqual(try train(["optimizer": "adamw"]).beta2, 0.999)
        XCTAssertThrowsError(try train(["optimizer": "sgd"])) {
            XCTAssertEqual(($0 as? VQMoEError)?.message, "train.optimizer: 'sgd' is not one of adam, lion, adamw")
        }
    }
}
