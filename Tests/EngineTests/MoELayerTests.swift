import Foundation
import VQMoE
import XCTest

/// The MoE layer (with the real `smoe` router and `vqvae` quantizer plugins) against finite
/// differences, and the fine-tuning path against a brute-force reference.
final class MoELayerTests: XCTestCase {
    let d = 8, f = 12, e = 4, n = 6

    func plugin(_ product: String, _ values: [String: Any] = [:]) throws -> PluginInstance {
        let lib = try PluginLibrary.open("\(Registry.executableDirectory())/lib\(product).so")
        // Plain VQ-VAE (a trained codebook) unless a test asks otherwise: vqvae's defaults add EMA.
        let plain: [String: Any] =
            product == "QuantizerVQVAE" ? ["ema": false, "kmeans_init": false, "dead_code_threshold": 0.0] : [:]
        let hp = try ResolvedHyperparameters(
            schema: lib.schema, values: plain.merging(values) { _, given in given }, keyPath: product)
        return try PluginInstance(
            library: lib, instanceName: product, dims: ModelDims(dModel: d, nExperts: e, nCodes: e),
            hyperparameters: hp, seed: 5)
    }

    func layer(_ mode: FFNConfig.Mode, input: FFNConfig.DiscreteInput = .x, beta: Float = 0) throws -> MoELayer {
        let cfg = FFNConfig(mode: mode, dInner: f, nExperts: e, discreteInput: input, beta: beta)
        let l = try MoELayer(
            config: cfg, dModel: d, name: "ffn",
            router: cfg.usesRouter ? RouterInstance(plugin("RouterSMoE", ["k": 2])) : nil,
            quantizer: cfg.usesQuantizer ? QuantizerInstance(plugin("QuantizerVQVAE")) : nil,
            seed: 9, initStd: 0.5)
        for p in [l.fc1Bias, l.fc2Bias] + [l.gateBias].compactMap({ $0 }) { p.fillNormal(std: 0.3, seed: 77) }
        return l
    }

    /// Σ r·y + aux (+ β·vq): every parameter and x against central differences. The discrete
    /// path takes x̂ = x (exactly differentiable: ste and mix use stop-gradients, covered by the
    /// PyTorch parity tests).
    func gradcheck(_ mode: FFNConfig.Mode) throws {
        let l = try layer(mode)
        var x = normals(n * d, seed: 21)
        let r = normals(n * d, seed: 22)
        var y = [Float](repeating: 0, count: n * d)
        let step = StepInfo(step: 0, totalSteps: 10, train: true, seed: 3)
        func objective() throws -> Double {
            let s = try x.withUnsafeBufferPointer { xp in
                try y.withUnsafeMutableBufferPointer {
                    try l.forward(
                        x: xp.baseAddress!, y: $0.baseAddress!, groups: 2, groupSize: n / 2, tokenIDs: nil, step: step)
                }
            }
            return weightedSum(y, r) + Double(s.aux)
        }
        _ = try objective()
        var dx = [Float](repeating: 0, count: n * d)
        l.parameters.forEach { $0.zeroGrad() }
        try x.withUnsafeBufferPointer { xp in
            // forward again so x stays valid for the backward
            _ = try y.withUnsafeMutableBufferPointer {
                try l.forward(
                    x: xp.baseAddress!, y: $0.baseAddress!, groups: 2, groupSize: n / 2, tokenIDs: nil, step: step)
            }
            try l.backward(dy: r, dx: &dx)
        }
        try assertGradient("\(mode) x", target: &x, count: n * d, analytic: dx, eps: 1e-3, objective: objective)
        for p in l.parameters {
            let g = Array(UnsafeBufferPointer(start: p.grad, count: p.count))
            if p.name.hasSuffix("quantizer.codebook") {
                // The codebook only chooses the expert here (x̂ = x, β = 0): no gradient, and
                // moving it by ε changes no output.
                XCTAssertTrue(g.allSatisfy { $0 == 0 }, p.name)
                continue
            }
            try assertGradient(
                "\(mode) \(p.name)", target: p.data, count: p.count, analytic: g, eps: 1e-3, objective: objective)
        }
    }

    func testDenseGradients() throws { try gradcheck(.dense) }
    func testSMoEGradients() throws { try gradcheck(.smoe) }
    func testVQMoEGradients() throws { try gradcheck(.vqmoe) }
    func testVQMoEFinetuneGradients() throws { try gradcheck(.vqmoeFinetune) }
    func testSharedExpertGradients() throws { try gradcheck(.shared) }

    /// The shared-expert mode is the SMoE layer plus one expert of its own that every token visits
    /// with weight 1: y_shared(x) − y_smoe(x) = S(x), computed by brute force; the shared expert is
    /// expert E in the load statistics.
    func testSharedExpertAddsItsOwnExpert() throws {
        let shared = try layer(.shared), smoe = try layer(.smoe)
        XCTAssertEqual(
            shared.parameters.map(\.name).filter { $0.contains("shared_expert") },
            [
                "ffn.shared_expert.fc1.weight", "ffn.shared_expert.fc1.bias", "ffn.shared_expert.fc2.weight",
                "ffn.shared_expert.fc2.bias",
            ])
        let bank = try XCTUnwrap(shared.expertSet.banks.last)
        for p in bank.parameters { p.fillNormal(std: 0.4, seed: 91) }
        let x = normals(n * d, seed: 41)
        var ys = [Float](repeating: 0, count: n * d), yr = ys
        let step = StepInfo(step: 0, totalSteps: 10, train: false, noGrad: true, seed: 3)
        let stats = try ys.withUnsafeMutableBufferPointer {
            try shared.forward(x: x, y: $0.baseAddress!, groups: 1, groupSize: n, tokenIDs: nil, step: step)
        }
        _ = try yr.withUnsafeMutableBufferPointer {
            try smoe.forward(x: x, y: $0.baseAddress!, groups: 1, groupSize: n, tokenIDs: nil, step: step)
        }
        XCTAssertEqual(stats.expertLoad.count, e + 1)
        XCTAssertEqual(stats.expertLoad[e], Float(n))
        XCTAssertEqual(stats.expertLoad.reduce(0, +), Float(n * 3))  // k = 2 routed + the shared one
        for t in 0..<n {
            for o in 0..<d {
                var acc = Double(bank.fc2Bias.data[o])
                for h in 0..<f {
                    var pre = Double(bank.fc1Bias.data[h])
                    for j in 0..<d { pre += Double(bank.fc1Weight.data[h * d + j]) * Double(x[t * d + j]) }
                    acc += Double(bank.fc2Weight.data[o * f + h]) * 0.5 * pre * (1 + erf(pre / 2.0.squareRoot()))
                }
                XCTAssertEqual(Double(ys[t * d + o] - yr[t * d + o]), acc, accuracy: 1e-4)
            }
        }
    }

    /// Fine-tuning: y = E_{c(x)}(x̂) exactly, the router is never run, the quantizer is frozen.
    func testFinetuneIsTheDiscretePathOnly() throws {
        let l = try layer(.vqmoeFinetune, input: .mix)
        XCTAssertNil(l.router)
        XCTAssertNil(l.gateWeight)
        let x = normals(n * d, seed: 31)
        var y = [Float](repeating: 0, count: n * d)
        var step = StepInfo(step: 0, totalSteps: 10, train: true, seed: 3)
        step.flags |= 0x4  // VQMOE_STEP_FROZEN
        let stats = try y.withUnsafeMutableBufferPointer {
            try l.forward(x: x, y: $0.baseAddress!, groups: 1, groupSize: n, tokenIDs: nil, step: step)
        }
        XCTAssertEqual(stats.aux, 0)
        XCTAssertEqual(stats.expertLoad.reduce(0, +), Float(n))  // one expert per token
        let cb = l.quantizer!.core.buffer("codebook")!.floats
        for t in 0..<n {
            // brute force: nearest code, x̂ = 0.95 x + 0.05 (q − x), expert MLP
            var best = 0, bestD = Float.infinity
            for c in 0..<e {
                var dist: Float = 0
                for j in 0..<d { let v = x[t * d + j] - cb[c * d + j]; dist += v * v }
                if dist < bestD { bestD = dist; best = c }
            }
            let xh = (0..<d).map { 0.95 * x[t * d + $0] + 0.05 * (cb[best * d + $0] - x[t * d + $0]) }
            for o in 0..<d {
                var acc = Double(l.fc2Bias.data[best * d + o])
                for h in 0..<f {
                    var pre = Double(l.fc1Bias.data[best * f + h])
                    for j in 0..<d { pre += Double(l.fc1Weight.data[(best * f + h) * d + j]) * Double(xh[j]) }
                    let g = 0.5 * pre * (1 + erf(pre / 2.0.squareRoot()))
                    acc += Double(l.fc2Weight.data[(best * d + o) * f + h]) * g
                }
                XCTAssertEqual(Double(y[t * d + o]), acc, accuracy: 1e-4)
            }
        }
        var dx = [Float](repeating: 0, count: n * d)
        l.parameters.forEach { $0.zeroGrad() }
        try l.backward(dy: normals(n * d, seed: 32), dx: &dx)
        XCTAssertTrue(
            l.parameters.first { $0.name.hasSuffix("codebook") }.map { p in (0..<p.count).allSatisfy { p.grad[$0] == 0 }
            } ?? false)
        XCTAssertGreaterThan(dx.map { abs($0) }.max()!, 0)
    }
}
