import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `smoe_dropout` router plugin: the k schedule against a brute-force reference, the
/// frozen random router (a STATE buffer), forward and the input gradient against a
/// double-precision reference.
final class RouterSMoEDropoutTests: XCTestCase {
    let d = 6, E = 5

    // MARK: helpers

    /// A router whose frozen weight (E,d) is overwritten with known random values.
    func makeRouter(E: Int, d: Int, hp: [String: Any] = [:], seed: UInt64 = 1) throws -> (RouterInstance, [Float]) {
        let lib = try openPlugin("RouterSMoEDropout")
        let core = try makeInstance(
            lib, dims: ModelDims(dModel: d, nExperts: E, totalSteps: 100), hyperparameters: hp, seed: seed)
        let router = try RouterInstance(core)
        let wBuf = try XCTUnwrap(core.buffer("weight"))
        wBuf.floats.update(from: randomNormal(E * d, seed: seed &+ 100, scale: 0.7), count: E * d)
        return (router, Array(UnsafeBufferPointer(start: wBuf.floats, count: E * d)))
    }

    struct Outputs {
        var index: [Int32], weights: [Float], load: [Float], aux: Float, ctx: PluginContext?
    }

    /// Forward with outputs sized for `k` (by default the k shape() gives for `step`).
    func forward(_ r: RouterInstance, x: [Float], n: Int, step: StepInfo, k forcedK: Int? = nil) throws -> Outputs {
        let shape = try forcedK.map { RouterShape(mode: .topK, k: $0) } ?? r.shape(step)
        let k = shape.k
        var index = [Int32](repeating: -1, count: n * k), weights = [Float](repeating: -1, count: n * k)
        var load = [Float](repeating: -1, count: r.nExperts)
        let (aux, ctx) = try x.withUnsafeBufferPointer { xp in
            try index.withUnsafeMutableBufferPointer { ip in
                try weights.withUnsafeMutableBufferPointer { wp in
                    try load.withUnsafeMutableBufferPointer { lp in
                        try r.forward(
                            step, x: xp.baseAddress!, tokenIDs: nil, nGroups: 1, groupSize: n, shape: shape,
                            outputs: RouterOutputs(
                                expertIndex: ip.baseAddress, weights: wp.baseAddress,
                                expertLoad: lp.baseAddress!))
                    }
                }
            }
        }
        return Outputs(index: index, weights: weights, load: load, aux: aux, ctx: ctx)
    }

    func backward(
        _ r: RouterInstance, _ ctx: PluginContext, n: Int, k: Int, gw: [Float]?, gaux: Float,
        gradX: inout [Float]
    ) throws {
        let shape = RouterShape(mode: .topK, k: k)
        try gradX.withUnsafeMutableBufferPointer { gp in
            if let gw {
                try gw.withUnsafeBufferPointer {
                    try r.backward(
                        ctx, n: n, shape: shape, gradWeights: $0.baseAddress, gradAux: gaux, gradX: gp.baseAddress!)
                }
            } else {
                try r.backward(ctx, n: n, shape: shape, gradAux: gaux, gradX: gp.baseAddress!)
            }
        }
    }

    func train(_ step: Int, total: Int = 100) -> StepInfo {
        StepInfo(step: step, totalSteps: total, train: true, seed: 3)
    }

    /// The reference code's schedule, by brute force: v = (k_max - k_min) * step / total,
    /// Python's round (half to even), + k_min, clipped; k_max when total <= 0 or in eval.
    static func referenceK(step: Int, total: Int, kMin: Int, kMax: Int, train: Bool = true) -> Int {
        guard train, total > 0 else { return kMax }
        let v = Double(kMax - kMin) * Double(step) / Double(total)
        let fl = v.rounded(.down), frac = v - fl
        var r = fl
        if frac > 0.5 { r = fl + 1 } else if frac == 0.5 { r = Int(fl) % 2 == 0 ? fl : fl + 1 }
        return min(max(Int(r) + kMin, kMin), kMax)
    }

    /// Brute-force routing in double with k experts.
    struct Reference {
        var probs: [Double], index: [Int], gates: [Double], load: [Double], f: [Double], aux: Double
    }

    func reference(x: [Float], w: [Float], n: Int, E: Int, d: Int, k: Int, balance: Double) -> Reference {
        var probs = [Double](repeating: 0, count: n * E)
        var index = [Int](), gates = [Double](), load = [Double](repeating: 0, count: E)
        for t in 0..<n {
            let row = (0..<E).map { e in (0..<d).map { Double(x[t * d + $0]) * Double(w[e * d + $0]) }.reduce(0, +) }
            let m = row.max()!
            let z = row.map { exp($0 - m) }.reduce(0, +)
            for e in 0..<E { probs[t * E + e] = exp(row[e] - m) / z }
            let order = (0..<E).sorted { row[$0] > row[$1] || (row[$0] == row[$1] && $0 < $1) }
            let kept = Array(order.prefix(k))
            let zk = kept.map { exp(row[$0] - m) }.reduce(0, +)
            for e in kept { index.append(e); gates.append(exp(row[e] - m) / zk); load[e] += 1 }
        }
        let f = load.map { $0 / Double(n * k) }
        var aux = 0.0
        for e in 0..<E { aux += f[e] * (0..<n).map { probs[$0 * E + e] }.reduce(0, +) / Double(n) }
        return Reference(probs: probs, index: index, gates: gates, load: load, f: f, aux: balance * Double(E) * aux)
    }

    /// grad_x = dlogits W with dlogits from the kept softmax and the balance loss.
    func referenceGradX(
        _ ref: Reference, w: [Float], gw: [Float]?, gaux: Double, balance: Double,
        n: Int, E: Int, d: Int, k: Int
    ) -> [Double] {
        var dl = [Double](repeating: 0, count: n * E)
        for t in 0..<n {
            if let gw {
                for s in 0..<k {
                    for r in 0..<k {
                        let gs = ref.gates[t * k + s], gr = ref.gates[t * k + r]
                        dl[t * E + ref.index[t * k + r]] += Double(gw[t * k + s]) * gs * ((s == r ? 1 : 0) - gr)
                    }
                }
            }
            for e in 0..<E {
                let daux = gaux * balance * Double(E) * ref.f[e] / Double(n)
                for j in 0..<E {
                    dl[t * E + j] += daux * ref.probs[t * E + e] * ((e == j ? 1 : 0) - ref.probs[t * E + j])
                }
            }
        }
        var gx = [Double](repeating: 0, count: n * d)
        for t in 0..<n { for e in 0..<E { for i in 0..<d { gx[t * d + i] += dl[t * E + e] * Double(w[e * d + i]) } } }
        return gx
    }

    // MARK: descriptor, schema, buffers

    func testDescriptorAndSchema() throws {
        let lib = try openPlugin("RouterSMoEDropout")
        XCTAssertEqual(lib.name, "smoe_dropout")
        XCTAssertEqual(lib.version, "1.0.0")
        XCTAssertEqual(lib.kind, .router)
        XCTAssertFalse(lib.hasNoGrad)
        XCTAssertFalse(lib.needsTokenIDs)
        XCTAssertEqual(lib.schema.map(\.name), ["k_min", "k_max", "balance_weight", "init_std"])
        let s = Dictionary(uniqueKeysWithValues: lib.schema.map { ($0.name, $0) })
        XCTAssertEqual(s["k_min"]?.type, .int)
        XCTAssertEqual(s["k_min"]?.defaultNumber, 1)
        XCTAssertEqual(s["k_min"]?.min, 1)
        XCTAssertEqual(s["k_min"]?.max, 64)
        XCTAssertEqual(s["k_max"]?.type, .int)
        XCTAssertEqual(s["k_max"]?.defaultNumber, 2)
        XCTAssertEqual(s["k_max"]?.min, 0)
        XCTAssertEqual(s["k_max"]?.max, 64)
        XCTAssertEqual(s["balance_weight"]?.type, .float)
        XCTAssertEqual(s["balance_weight"]?.defaultNumber, 0)
        XCTAssertEqual(s["balance_weight"]?.min, 0)
        XCTAssertEqual(s["init_std"]?.defaultNumber, 0.02)
        XCTAssertTrue(lib.schema.allSatisfy { !$0.description.isEmpty })
    }

    func testFrozenRandomRouterIsAStateBuffer() throws {
        let lib = try openPlugin("RouterSMoEDropout")
        let E = 8, d = 64
        let core = try makeInstance(lib, dims: ModelDims(dModel: d, nExperts: E), seed: 7)
        XCTAssertEqual(core.buffers.map(\.name), ["weight"])
        let w = try XCTUnwrap(core.buffer("weight"))
        XCTAssertFalse(w.isParameter)
        XCTAssertNil(w.grad)
        XCTAssertTrue(core.parameters.isEmpty)
        XCTAssertEqual(w.shape, [E, d])
        XCTAssertEqual(w.dtype.code, UInt8(VQMOE_DTYPE_FLOAT))
        XCTAssertEqual(w.dtype.bits, 32)
        let vals = Array(UnsafeBufferPointer(start: w.floats, count: E * d)).map(Double.init)
        let mean = vals.reduce(0, +) / Double(vals.count)
        let std = (vals.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(vals.count)).squareRoot()
        XCTAssertEqual(std, 0.02, accuracy: 0.003)
        XCTAssertEqual(mean, 0, accuracy: 0.003)
        let again = try makeInstance(lib, dims: ModelDims(dModel: d, nExperts: E), seed: 7)
        XCTAssertEqual(memcmp(w.data, again.buffer("weight")!.data, w.byteCount), 0)
        let other = try makeInstance(lib, dims: ModelDims(dModel: d, nExperts: E), seed: 8)
        XCTAssertNotEqual(memcmp(w.data, other.buffer("weight")!.data, w.byteCount), 0)
        let wide = try makeInstance(
            lib, dims: ModelDims(dModel: d, nExperts: E), hyperparameters: ["init_std": 0.2], seed: 7)
        for i in 0..<(E * d) { XCTAssertEqual(wide.buffer("weight")!.floats[i], 10 * w.floats[i], accuracy: 1e-6) }
    }

    // MARK: the k schedule

    func testScheduleValuesAtChosenSteps() throws {
        let (r, _) = try makeRouter(E: 8, d: 4, hp: ["k_min": 1, "k_max": 8])
        // (k_max - k_min) * step / total = 7 * step / 100, rounded half to even, + 1.
        let expected: [(Int, Int)] = [
            (0, 1), (7, 1), (8, 2), (21, 2), (22, 3), (50, 5), (64, 5), (65, 6), (93, 8), (100, 8),
            (150, 8), (-5, 1),
        ]
        for (step, k) in expected { XCTAssertEqual(try r.shape(train(step)).k, k, "step \(step)") }
        // Python's round: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2 (k_max - k_min = 4, total 8: step 1 -> 0.5, ...).
        let (h, _) = try makeRouter(E: 8, d: 4, hp: ["k_min": 2, "k_max": 6])
        for (step, k) in [(1, 2), (3, 4), (5, 4), (7, 6), (8, 6)] {
            XCTAssertEqual(try h.shape(train(step, total: 8)).k, k, "step \(step) of 8")
        }
        // No plan (total_steps <= 0) and evaluation: k_max.
        XCTAssertEqual(try r.shape(train(0, total: 0)).k, 8)
        XCTAssertEqual(try r.shape(StepInfo(step: 0, totalSteps: 100, train: false, seed: 1)).k, 8)
        // k_max = 0 means n_experts.
        let (all, _) = try makeRouter(E: 5, d: 4, hp: ["k_max": 0])
        XCTAssertEqual(try all.shape(train(100)).k, 5)
        XCTAssertEqual(try all.shape(train(0)).k, 1)
    }

    func testScheduleMatchesBruteForceEverywhere() throws {
        for (kMin, kMax, total) in [(1, 2, 100), (1, 16, 1000), (2, 16, 37), (3, 3, 10), (1, 5, 4), (4, 12, 250)] {
            let (r, _) = try makeRouter(E: 16, d: 3, hp: ["k_min": kMin, "k_max": kMax])
            var seen = Set<Int>()
            for step in 0...(total + total / 5) {
                let want = Self.referenceK(step: step, total: total, kMin: kMin, kMax: kMax)
                XCTAssertEqual(
                    try r.shape(train(step, total: total)).k, want, "k_min \(kMin) k_max \(kMax) step \(step)/\(total)")
                seen.insert(want)
            }
            // Monotone and complete: every k from k_min to k_max appears.
            XCTAssertEqual(seen, Set(kMin...kMax))
        }
    }

    // MARK: errors

    func testBadHyperparametersAreErrors() throws {
        let lib = try openPlugin("RouterSMoEDropout")
        func message(_ hp: [String: Any], E: Int = 4) -> String {
            do {
                _ = try makeInstance(lib, dims: ModelDims(dModel: 3, nExperts: E), hyperparameters: hp);
                return "no error"
            } catch {
                return (error as? VQMoEError)?.message ?? "\(error)"
            }
        }
        var msg = message(["k_max": 5])
        XCTAssertTrue(msg.contains("k_max = 5") && msg.contains("n_experts = 4"), msg)
        XCTAssertTrue(msg.contains("INVALID_ARGUMENT"), msg)
        msg = message(["k_min": 3, "k_max": 2])
        XCTAssertTrue(msg.contains("k_min = 3") && msg.contains("k_max = 2"), msg)
        msg = message(["k_min": 5, "k_max": 0])
        XCTAssertTrue(msg.contains("k_min = 5") && msg.contains("k_max = 4") && msg.contains("n_experts"), msg)
        msg = message(["k_min": 0])
        XCTAssertTrue(msg.contains("k_min") && msg.contains("minimum"), msg)
        XCTAssertEqual(message(["k_min": 4, "k_max": 0]), "no error")
    }

    // MARK: forward

    func checkForward(hp: [String: Any], step: StepInfo, n: Int = 23) throws {
        let balance = hp["balance_weight"] as? Double ?? 0
        let (r, w) = try makeRouter(E: E, d: d, hp: hp)
        let x = randomNormal(n * d, seed: 11)
        let kMax = (hp["k_max"] as? Int).map { $0 == 0 ? E : $0 } ?? 2
        let k = Self.referenceK(
            step: step.step, total: step.totalSteps, kMin: hp["k_min"] as? Int ?? 1, kMax: kMax,
            train: step.flags & VQMOE_STEP_TRAIN != 0)
        let out = try forward(r, x: x, n: n, step: step)
        XCTAssertEqual(out.weights.count, n * k)
        let ref = reference(x: x, w: w, n: n, E: E, d: d, k: k, balance: balance)
        XCTAssertEqual(out.index.map(Int.init), ref.index, "\(hp)")
        for i in 0..<(n * k) { XCTAssertEqual(Double(out.weights[i]), ref.gates[i], accuracy: 1e-5) }
        XCTAssertEqual(out.load.map(Double.init), ref.load)
        XCTAssertEqual(Double(out.aux), ref.aux, accuracy: 1e-6 + 1e-5 * abs(ref.aux))
        if balance == 0 { XCTAssertEqual(out.aux, 0) }
        XCTAssertEqual(out.ctx != nil, step.flags & VQMOE_STEP_TRAIN != 0)
    }

    func testForwardMatchesReference() throws {
        try checkForward(hp: [:], step: train(0))  // k = 1
        try checkForward(hp: [:], step: train(90))  // k = 2
        try checkForward(hp: ["k_min": 2, "k_max": 0, "balance_weight": 0.3], step: train(40))  // k = 3
        try checkForward(hp: ["k_min": 2, "k_max": 0, "balance_weight": 0.3], step: train(100))  // k = E
        try checkForward(
            hp: ["k_max": 4, "balance_weight": 1.0], step: StepInfo(step: 0, totalSteps: 100, train: false, seed: 1))
    }

    func testEvalUsesFullCapacityAndSavesNoContext() throws {
        let (r, w) = try makeRouter(E: E, d: d, hp: ["k_max": 4])
        let n = 7, x = randomNormal(n * d, seed: 4)
        let eval = try forward(r, x: x, n: n, step: StepInfo(step: 0, totalSteps: 100, train: false, seed: 1))
        XCTAssertNil(eval.ctx)
        XCTAssertEqual(eval.weights.count, n * 4)
        XCTAssertEqual(eval.index.map(Int.init), reference(x: x, w: w, n: n, E: E, d: d, k: 4, balance: 0).index)
        let noGrad = try forward(
            r, x: x, n: n, step: StepInfo(step: 0, totalSteps: 100, train: true, noGrad: true, seed: 1))
        XCTAssertNil(noGrad.ctx)
        XCTAssertEqual(noGrad.weights.count, n)
    }

    func testOutputWidthOutsideTheScheduleIsAShapeError() throws {
        let (r, w) = try makeRouter(E: E, d: d, hp: ["k_min": 2, "k_max": 4])
        let n = 5, x = randomNormal(n * d, seed: 9)
        // A width inside [k_min, k_max] (sized for another step) is routed as given.
        let out = try forward(r, x: x, n: n, step: train(0), k: 3)
        XCTAssertEqual(out.index.map(Int.init), reference(x: x, w: w, n: n, E: E, d: d, k: 3, balance: 0).index)
        XCTAssertThrowsError(try forward(r, x: x, n: n, step: train(0), k: 1)) { error in
            let msg = "\(error)"
            XCTAssertTrue(msg.contains("SHAPE") && msg.contains("k = 1") && msg.contains("k = 2"), msg)
        }
        XCTAssertThrowsError(try forward(r, x: x, n: n, step: train(0), k: 5))
    }

    func testForwardAndBackwardNeverTouchTheRouter() throws {
        let (r, w) = try makeRouter(E: E, d: d, hp: ["k_min": 2, "k_max": 3, "balance_weight": 0.5])
        let n = 9, x = randomNormal(n * d, seed: 2)
        let out = try forward(r, x: x, n: n, step: train(10))
        var gx = [Float](repeating: 0, count: n * d)
        try backward(r, try XCTUnwrap(out.ctx), n: n, k: 2, gw: randomNormal(n * 2, seed: 3), gaux: 1, gradX: &gx)
        XCTAssertEqual(Array(UnsafeBufferPointer(start: r.core.buffer("weight")!.floats, count: E * d)), w)
        try r.core.beginStep(train(11))  // no hook: a no-op
        XCTAssertEqual(Array(UnsafeBufferPointer(start: r.core.buffer("weight")!.floats, count: E * d)), w)
    }

    // MARK: backward

    func checkBackward(hp: [String: Any], step: StepInfo, gradWeightsPresent: Bool, gaux: Float) throws {
        let n = 19
        let balance = hp["balance_weight"] as? Double ?? 0
        let (r, w) = try makeRouter(E: E, d: d, hp: hp, seed: 4)
        let x = randomNormal(n * d, seed: 21)
        let out = try forward(r, x: x, n: n, step: step)
        let k = out.weights.count / n
        let ref = reference(x: x, w: w, n: n, E: E, d: d, k: k, balance: balance)
        let gw = gradWeightsPresent ? randomNormal(n * k, seed: 31) : nil
        var gx = [Float](repeating: 1, count: n * d)  // accumulates
        try backward(r, try XCTUnwrap(out.ctx), n: n, k: k, gw: gw, gaux: gaux, gradX: &gx)
        let want = referenceGradX(ref, w: w, gw: gw, gaux: Double(gaux), balance: balance, n: n, E: E, d: d, k: k)
        for i in 0..<(n * d) { XCTAssertEqual(Double(gx[i]), 1 + want[i], accuracy: 1e-5, "grad_x[\(i)] \(hp) k \(k)") }
        if gradWeightsPresent && k > 1 || balance > 0 && gaux != 0 {
            XCTAssertGreaterThan(want.map(abs).max()!, 1e-3, "the check compares real gradients")
        }
    }

    func testBackwardMatchesReference() throws {
        try checkBackward(hp: ["k_min": 2, "k_max": 4], step: train(50), gradWeightsPresent: true, gaux: 1)
        try checkBackward(
            hp: ["k_min": 1, "k_max": 0, "balance_weight": 0.5], step: train(30), gradWeightsPresent: true, gaux: 1.5)
        // k = 1: balance only
        try checkBackward(hp: ["balance_weight": 0.4], step: train(0), gradWeightsPresent: true, gaux: 2)
        try checkBackward(
            hp: ["k_max": 3, "balance_weight": 0.4], step: train(100), gradWeightsPresent: false, gaux: 1)
        try checkBackward(hp: [:], step: train(0), gradWeightsPresent: true, gaux: 1)  // k = 1, no balance: zero
    }

    // MARK: the framework's gradcheck

    func testPluginChecker() throws {
        let lib = try openPlugin("RouterSMoEDropout")
        for hp: [String: Any] in [
            [:], ["k_min": 2, "k_max": 4, "balance_weight": 0.3, "init_std": 1.0],
            ["k_max": 0, "balance_weight": 0.05, "init_std": 1.0],
        ] {
            let results = PluginChecker(library: lib, hyperparameters: hp).run()
            XCTAssertTrue(
                results.allSatisfy(\.passed),
                "\(hp): " + results.filter { !$0.passed }.map(\.description).joined(separator: "\n"))
        }
    }
}
