import Foundation
import VQMoE
import XCTest

/// The `smoe` router plugin against a brute-force double-precision reference.
final class RouterSMoETests: XCTestCase {
    let d = 6, E = 5

    /// A router whose weight (E,d) (and bias (E)) are overwritten with known random values.
    func makeRouter(
        E: Int, d: Int, hp: [String: Any] = [:], seed: UInt64 = 1,
        randomize: Bool = true
    ) throws -> (RouterInstance, [Float], [Float]?) {
        let lib = try openPlugin("RouterSMoE")
        let core = try makeInstance(lib, dims: ModelDims(dModel: d, nExperts: E), hyperparameters: hp, seed: seed)
        let router = try RouterInstance(core)
        let wBuf = try XCTUnwrap(core.buffer("weight"))
        if randomize { wBuf.floats.update(from: randomNormal(E * d, seed: seed &+ 100, scale: 0.7), count: E * d) }
        let w = Array(UnsafeBufferPointer(start: wBuf.floats, count: E * d))
        var b: [Float]?
        if let bBuf = core.buffer("bias") {
            if randomize { bBuf.floats.update(from: randomNormal(E, seed: seed &+ 200, scale: 0.5), count: E) }
            b = Array(UnsafeBufferPointer(start: bBuf.floats, count: E))
        }
        return (router, w, b)
    }

    struct Outputs {
        var index: [Int32], weights: [Float], load: [Float], aux: Float, ctx: PluginContext?
    }

    func forward(_ r: RouterInstance, x: [Float], n: Int, k: Int, step: StepInfo) throws -> Outputs {
        var index = [Int32](repeating: -1, count: n * k), weights = [Float](repeating: -1, count: n * k)
        var load = [Float](repeating: -1, count: r.nExperts)
        let shape = try r.shape(step)
        XCTAssertEqual(shape, RouterShape(mode: .topK, k: k))
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

    /// Brute-force routing in double: logits, full softmax, top-k (ties -> lower index,
    /// descending), kept softmax, load, f, P, aux.
    struct Reference {
        var logits: [Double], probs: [Double], index: [Int], gates: [Double], load: [Double], f: [Double], aux: Double
    }

    func reference(
        x: [Float], w: [Float], b: [Float]?, n: Int, E: Int, d: Int, k: Int, balance: Double, full: Bool = false
    ) -> Reference {
        var logits = [Double](repeating: 0, count: n * E), probs = logits
        var index = [Int](), gates = [Double](), load = [Double](repeating: 0, count: E)
        for t in 0..<n {
            for e in 0..<E {
                var s = b.map { Double($0[e]) } ?? 0
                for i in 0..<d { s += Double(x[t * d + i]) * Double(w[e * d + i]) }
                logits[t * E + e] = s
            }
            let row = Array(logits[(t * E)..<(t * E + E)])
            let m = row.max()!
            let z = row.map { exp($0 - m) }.reduce(0, +)
            for e in 0..<E { probs[t * E + e] = exp(row[e] - m) / z }
            // Stable sort by descending logit: equal logits keep index order.
            let order = (0..<E).sorted { row[$0] > row[$1] || (row[$0] == row[$1] && $0 < $1) }
            let kept = Array(order.prefix(k))
            let zk = kept.map { exp(row[$0] - m) }.reduce(0, +)
            for e in kept {
                index.append(e); gates.append(full ? probs[t * E + e] : exp(row[e] - m) / zk); load[e] += 1
            }
        }
        let f = load.map { $0 / Double(n * k) }
        var aux = 0.0
        for e in 0..<E {
            let P = (0..<n).map { probs[$0 * E + e] }.reduce(0, +) / Double(n)
            aux += f[e] * P
        }
        return Reference(
            logits: logits, probs: probs, index: index, gates: gates, load: load, f: f,
            aux: balance * Double(E) * aux)
    }

    func train(_ step: Int = 0, frozen: Bool = false) -> StepInfo {
        StepInfo(step: step, totalSteps: 10, train: true, frozen: frozen, seed: 3)
    }

    // MARK: descriptor, schema, buffers

    func testDescriptorAndSchema() throws {
        let lib = try openPlugin("RouterSMoE")
        XCTAssertEqual(lib.name, "smoe")
        XCTAssertEqual(lib.version, "1.1.0")
        XCTAssertEqual(lib.kind, .router)
        XCTAssertFalse(lib.hasNoGrad)
        XCTAssertFalse(lib.needsTokenIDs)
        let byName = Dictionary(uniqueKeysWithValues: lib.schema.map { ($0.name, $0) })
        XCTAssertEqual(lib.schema.map(\.name), ["k", "balance_weight", "init_std", "bias", "weights"])
        XCTAssertEqual(byName["weights"]?.defaultString, "kept")
        XCTAssertEqual(byName["k"]?.type, .int)
        XCTAssertEqual(byName["k"]?.defaultNumber, 2)
        XCTAssertEqual(byName["k"]?.min, 1)
        XCTAssertEqual(byName["k"]?.max, 64)
        XCTAssertEqual(byName["balance_weight"]?.type, .float)
        XCTAssertEqual(byName["balance_weight"]?.defaultNumber, 0.01)
        XCTAssertEqual(byName["balance_weight"]?.min, 0)
        XCTAssertEqual(byName["init_std"]?.defaultNumber, 0.02)
        XCTAssertEqual(byName["init_std"]?.min, 0)
        XCTAssertEqual(byName["bias"]?.type, .bool)
        XCTAssertEqual(byName["bias"]?.defaultNumber, 0)
        XCTAssertTrue(lib.schema.allSatisfy { !$0.description.isEmpty })
    }

    func testBuffersAndInit() throws {
        let lib = try openPlugin("RouterSMoE")
        let E = 8, d = 64
        let core = try makeInstance(lib, dims: ModelDims(dModel: d, nExperts: E), seed: 7)
        XCTAssertEqual(core.buffers.map(\.name), ["weight"])
        let w = try XCTUnwrap(core.buffer("weight"))
        XCTAssertTrue(w.isParameter)
        XCTAssertEqual(w.shape, [E, d])
        XCTAssertNotNil(w.grad)
        // N(0, 0.02^2): the sample std of 512 draws is within 15% of 0.02, mean near 0.
        let vals = Array(UnsafeBufferPointer(start: w.floats, count: E * d)).map(Double.init)
        let mean = vals.reduce(0, +) / Double(vals.count)
        let std = (vals.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(vals.count)).squareRoot()
        XCTAssertEqual(std, 0.02, accuracy: 0.003)
        XCTAssertEqual(mean, 0, accuracy: 0.003)
        // Same seed, same weights; other seed, other weights.
        let again = try makeInstance(lib, dims: ModelDims(dModel: d, nExperts: E), seed: 7)
        XCTAssertEqual(memcmp(w.data, again.buffer("weight")!.data, w.byteCount), 0)
        let other = try makeInstance(lib, dims: ModelDims(dModel: d, nExperts: E), seed: 8)
        XCTAssertNotEqual(memcmp(w.data, other.buffer("weight")!.data, w.byteCount), 0)
        // init_std scales the draw.
        let wide = try makeInstance(
            lib, dims: ModelDims(dModel: d, nExperts: E), hyperparameters: ["init_std": 0.2], seed: 7)
        for i in 0..<(E * d) { XCTAssertEqual(wide.buffer("weight")!.floats[i], 10 * w.floats[i], accuracy: 1e-6) }

        let withBias = try makeInstance(lib, dims: ModelDims(dModel: d, nExperts: E), hyperparameters: ["bias": true])
        XCTAssertEqual(withBias.buffers.map(\.name), ["weight", "bias"])
        let b = try XCTUnwrap(withBias.buffer("bias"))
        XCTAssertTrue(b.isParameter)
        XCTAssertEqual(b.shape, [E])
        XCTAssertTrue((0..<E).allSatisfy { b.floats[$0] == 0 })
    }

    // MARK: errors

    func testKLargerThanExpertsIsAnError() throws {
        let lib = try openPlugin("RouterSMoE")
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 4, nExperts: 3), hyperparameters: ["k": 4]))
        { error in
            let msg = (error as? VQMoEError)?.message ?? "\(error)"
            XCTAssertTrue(msg.contains("k = 4"), msg)
            XCTAssertTrue(msg.contains("n_experts = 3"), msg)
            XCTAssertTrue(msg.contains("INVALID_ARGUMENT") || msg.lowercased().contains("invalid"), msg)
        }
        // k = E is fine.
        XCTAssertNoThrow(try makeInstance(lib, dims: ModelDims(dModel: 4, nExperts: 3), hyperparameters: ["k": 3]))
    }

    func testBadModelDimsAreErrors() throws {
        let lib = try openPlugin("RouterSMoE")
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 4, nExperts: 0))) { error in
            XCTAssertTrue("\(error)".contains("n_experts"), "\(error)")
        }
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 0, nExperts: 4))) { error in
            XCTAssertTrue("\(error)".contains("d_model"), "\(error)")
        }
    }

    // MARK: forward

    func checkForward(k: Int, bias: Bool, balance: Double, n: Int = 23) throws {
        let (r, w, b) = try makeRouter(E: E, d: d, hp: ["k": k, "bias": bias, "balance_weight": balance])
        XCTAssertEqual(b != nil, bias)
        let x = randomNormal(n * d, seed: 11)
        let out = try forward(r, x: x, n: n, k: k, step: train())
        let ref = reference(x: x, w: w, b: b, n: n, E: E, d: d, k: k, balance: balance)
        XCTAssertEqual(out.index.map(Int.init), ref.index)
        for i in 0..<(n * k) { XCTAssertEqual(Double(out.weights[i]), ref.gates[i], accuracy: 1e-5) }
        for t in 0..<n { XCTAssertEqual(out.weights[(t * k)..<(t * k + k)].reduce(0, +), 1, accuracy: 1e-5) }
        XCTAssertEqual(out.load.map(Double.init), ref.load)
        XCTAssertEqual(Double(out.aux), ref.aux, accuracy: 1e-6 + 1e-5 * abs(ref.aux))
        XCTAssertNotNil(out.ctx)
    }

    func testForwardMatchesReference() throws {
        try checkForward(k: 2, bias: false, balance: 0.01)
        try checkForward(k: 1, bias: true, balance: 0.5)
        try checkForward(k: 5, bias: true, balance: 1.0)  // k = E: every expert kept
        try checkForward(k: 3, bias: false, balance: 0)
    }

    func testLargerProblemOnTwoThreads() throws {
        // Enough tokens and experts that the per-token loops split over the host's threads.
        let threads = HostRuntime.threads
        HostRuntime.configure(threads: 2)
        defer { HostRuntime.configure(threads: threads) }
        let n = 600, E = 16, d = 24, k = 4
        let (r, w, b) = try makeRouter(E: E, d: d, hp: ["k": k, "bias": true, "balance_weight": 0.1], seed: 2)
        let x = randomNormal(n * d, seed: 5)
        let out = try forward(r, x: x, n: n, k: k, step: train())
        let ref = reference(x: x, w: w, b: b, n: n, E: E, d: d, k: k, balance: 0.1)
        XCTAssertEqual(out.index.map(Int.init), ref.index)
        for i in 0..<(n * k) { XCTAssertEqual(Double(out.weights[i]), ref.gates[i], accuracy: 1e-5) }
        XCTAssertEqual(out.load.map(Double.init), ref.load)
        XCTAssertEqual(Double(out.aux), ref.aux, accuracy: 1e-5 * ref.aux)
        let gw = randomNormal(n * k, seed: 6)
        var gx = [Float](repeating: 0, count: n * d)
        try backward(r, try XCTUnwrap(out.ctx), n: n, k: k, gw: gw, gaux: 1, gradX: &gx)
        let want = referenceGrads(ref, x: x, w: w, gw: gw, gaux: 1, balance: 0.1, n: n, E: E, d: d, k: k)
        for i in 0..<(n * d) { XCTAssertEqual(Double(gx[i]), want.gx[i], accuracy: 1e-5) }
        let gW = r.core.buffer("weight")!.grad!
        for i in 0..<(E * d) { XCTAssertEqual(Double(gW[i]), want.gW[i], accuracy: 1e-4) }
    }

    func testBalanceLossValueOnHandExample() throws {
        // W = 0: every logit is 0, every token keeps experts 0..k-1 (ties -> lower index) with
        // weights 1/k, P_e = 1/E; f = 1/k on the kept experts, so aux = w * E * sum_e f_e / E = w.
        let (r, _, _) = try makeRouter(E: 4, d: 3, hp: ["k": 2, "balance_weight": 0.3], randomize: false)
        r.core.buffer("weight")!.floats.update(repeating: 0, count: 12)
        let out = try forward(r, x: randomNormal(10 * 3, seed: 2), n: 10, k: 2, step: train())
        for t in 0..<10 {
            XCTAssertEqual(out.index[2 * t], 0)
            XCTAssertEqual(out.index[2 * t + 1], 1)
            XCTAssertEqual(out.weights[2 * t], 0.5, accuracy: 1e-7)
        }
        XCTAssertEqual(out.load, [10, 10, 0, 0])
        XCTAssertEqual(out.aux, 0.3, accuracy: 1e-6)
    }

    func testTiesGoToLowerIndexInDescendingOrder() throws {
        // Rows 1 and 3 of W are equal, row 4 is larger, rows 0 and 2 smaller: for x > 0 the
        // order is 4, 1, 3, then 0/2.
        let E = 5, d = 2
        let (r, _, _) = try makeRouter(E: E, d: d, hp: ["k": 3], randomize: false)
        let w: [Float] = [0.1, 0.1, 0.5, 0.5, 0.2, 0.2, 0.5, 0.5, 0.9, 0.9]
        r.core.buffer("weight")!.floats.update(from: w, count: E * d)
        let out = try forward(r, x: [1, 1, 2, 0.5], n: 2, k: 3, step: train())
        XCTAssertEqual(out.index, [4, 1, 3, 4, 1, 3])
        XCTAssertEqual(out.weights[1], out.weights[2])
        XCTAssertGreaterThan(out.weights[0], out.weights[1])
    }

    func testEvalAndNoGradSaveNoContext() throws {
        let (r, _, _) = try makeRouter(E: E, d: d)
        let x = randomNormal(7 * d, seed: 4)
        let eval = try forward(r, x: x, n: 7, k: 2, step: StepInfo(step: 0, totalSteps: 10, train: false, seed: 1))
        XCTAssertNil(eval.ctx)
        let noGrad = try forward(
            r, x: x, n: 7, k: 2, step: StepInfo(step: 0, totalSteps: 10, train: true, noGrad: true, seed: 1))
        XCTAssertNil(noGrad.ctx)
        let tr = try forward(r, x: x, n: 7, k: 2, step: train())
        XCTAssertNotNil(tr.ctx)
        XCTAssertEqual(eval.index, tr.index)
        XCTAssertEqual(eval.weights, tr.weights)
        XCTAssertEqual(eval.aux, tr.aux)
    }

    func testNonFiniteInputIsANumericError() throws {
        let (r, _, _) = try makeRouter(E: E, d: d)
        var x = randomNormal(3 * d, seed: 4)
        x[4] = .nan
        XCTAssertThrowsError(try forward(r, x: x, n: 3, k: 2, step: train())) { error in
            XCTAssertEqual((error as? VQMoEError)?.category, .numeric, "\(error)")
        }
    }

    // MARK: backward

    /// Reference gradients by hand: dlogits from the kept softmax and the balance loss, then
    /// grad_x = dlogits W, grad_W = dlogits^T x, grad_b = column sums.
    func referenceGrads(
        _ ref: Reference, x: [Float], w: [Float], gw: [Float]?, gaux: Double, balance: Double,
        n: Int, E: Int, d: Int, k: Int, full: Bool = false
    ) -> (gx: [Double], gW: [Double], gb: [Double]) {
        var dl = [Double](repeating: 0, count: n * E)
        for t in 0..<n {
            if let gw, full {
                // g_s = p_{i_s}: dg_s/dl_j = p_{i_s} (delta_{j,i_s} - p_j) over all E logits
                for s in 0..<k {
                    let i = ref.index[t * k + s], pi = ref.probs[t * E + i]
                    for j in 0..<E {
                        dl[t * E + j] += Double(gw[t * k + s]) * pi * ((j == i ? 1 : 0) - ref.probs[t * E + j])
                    }
                }
            } else if let gw {
                // g_s = softmax_s(l_kept): dg_s/dl_r = g_s (delta_sr - g_r)
                for s in 0..<k {
                    for r in 0..<k {
                        let gs = ref.gates[t * k + s], gr = ref.gates[t * k + r]
                        let jac = gs * ((s == r ? 1 : 0) - gr)
                        dl[t * E + ref.index[t * k + r]] += Double(gw[t * k + s]) * jac
                    }
                }
            }
            // aux = bw * E * sum_e f_e * (1/n) sum_t p_te; dp_te/dl_tj = p_te (delta_ej - p_tj)
            for e in 0..<E {
                let daux_dp = gaux * balance * Double(E) * ref.f[e] / Double(n)
                for j in 0..<E {
                    let pe = ref.probs[t * E + e], pj = ref.probs[t * E + j]
                    dl[t * E + j] += daux_dp * pe * ((e == j ? 1 : 0) - pj)
                }
            }
        }
        var gx = [Double](repeating: 0, count: n * d), gW = [Double](repeating: 0, count: E * d)
        var gb = [Double](repeating: 0, count: E)
        for t in 0..<n {
            for e in 0..<E {
                let g = dl[t * E + e]
                gb[e] += g
                for i in 0..<d {
                    gx[t * d + i] += g * Double(w[e * d + i])
                    gW[e * d + i] += g * Double(x[t * d + i])
                }
            }
        }
        return (gx, gW, gb)
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

    func checkBackward(
        k: Int, bias: Bool, balance: Double, gradWeightsPresent: Bool, gaux: Float, full: Bool = false
    ) throws {
        let n = 19
        let (r, w, b) = try makeRouter(
            E: E, d: d, hp: ["k": k, "bias": bias, "balance_weight": balance, "weights": full ? "full" : "kept"],
            seed: 4)
        let x = randomNormal(n * d, seed: 21)
        let out = try forward(r, x: x, n: n, k: k, step: train())
        let ctx = try XCTUnwrap(out.ctx)
        let ref = reference(x: x, w: w, b: b, n: n, E: E, d: d, k: k, balance: balance, full: full)
        for i in 0..<(n * k) { XCTAssertEqual(Double(out.weights[i]), ref.gates[i], accuracy: 1e-6, "weights[\(i)]") }
        let gw = gradWeightsPresent ? randomNormal(n * k, seed: 31) : nil
        // Gradients accumulate: start from a non-zero grad_x and non-zero parameter grads.
        let wGrad = r.core.buffer("weight")!.grad!
        wGrad.update(repeating: 0.25, count: E * d)
        r.core.buffer("bias")?.grad!.update(repeating: -0.5, count: E)
        var gx = [Float](repeating: 1, count: n * d)
        try backward(r, ctx, n: n, k: k, gw: gw, gaux: gaux, gradX: &gx)
        let want = referenceGrads(
            ref, x: x, w: w, gw: gw, gaux: Double(gaux), balance: balance, n: n, E: E, d: d, k: k, full: full)
        for i in 0..<(n * d) { XCTAssertEqual(Double(gx[i]), 1 + want.gx[i], accuracy: 1e-5, "grad_x[\(i)]") }
        for i in 0..<(E * d) { XCTAssertEqual(Double(wGrad[i]), 0.25 + want.gW[i], accuracy: 1e-5, "grad_W[\(i)]") }
        if bias {
            let bGrad = r.core.buffer("bias")!.grad!
            for e in 0..<E { XCTAssertEqual(Double(bGrad[e]), -0.5 + want.gb[e], accuracy: 1e-5, "grad_b[\(e)]") }
        }
    }

    func testBackwardMatchesHandGradients() throws {
        try checkBackward(k: 2, bias: false, balance: 0.01, gradWeightsPresent: true, gaux: 1)
        try checkBackward(k: 3, bias: true, balance: 0.7, gradWeightsPresent: true, gaux: 1.5)
        // k = 1: weights are constant 1
        try checkBackward(k: 1, bias: true, balance: 0.2, gradWeightsPresent: true, gaux: 1)
        try checkBackward(k: 2, bias: true, balance: 0.4, gradWeightsPresent: false, gaux: 2)  // balance loss alone
        try checkBackward(k: 2, bias: true, balance: 0.4, gradWeightsPresent: true, gaux: 0)  // routing weights alone
        // weights = full (Switch): the kept experts' full-softmax probabilities; with k = 1 the
        // routing weight now carries a task gradient.
        try checkBackward(k: 1, bias: true, balance: 0.2, gradWeightsPresent: true, gaux: 0, full: true)
        try checkBackward(k: 2, bias: false, balance: 0.3, gradWeightsPresent: true, gaux: 1, full: true)
    }

    func testBalanceGradientIsNonZero() throws {
        // The balance loss alone must push x and W (sanity: not silently dropped).
        let n = 12
        let (r, _, _) = try makeRouter(E: E, d: d, hp: ["balance_weight": 1.0])
        let out = try forward(r, x: randomNormal(n * d, seed: 3), n: n, k: 2, step: train())
        var gx = [Float](repeating: 0, count: n * d)
        try backward(r, try XCTUnwrap(out.ctx), n: n, k: 2, gw: nil, gaux: 1, gradX: &gx)
        XCTAssertGreaterThan(gx.map { abs($0) }.max()!, 1e-4)
    }

    func testFrozenGivesInputGradientButNoParameterGradient() throws {
        let n = 9, k = 2
        let (r, w, b) = try makeRouter(E: E, d: d, hp: ["bias": true, "balance_weight": 0.3])
        let x = randomNormal(n * d, seed: 8)
        let out = try forward(r, x: x, n: n, k: k, step: train(frozen: true))
        let gw = randomNormal(n * k, seed: 9)
        var gx = [Float](repeating: 0, count: n * d)
        try backward(r, try XCTUnwrap(out.ctx), n: n, k: k, gw: gw, gaux: 1, gradX: &gx)
        let ref = reference(x: x, w: w, b: b, n: n, E: E, d: d, k: k, balance: 0.3)
        let want = referenceGrads(ref, x: x, w: w, gw: gw, gaux: 1, balance: 0.3, n: n, E: E, d: d, k: k)
        for i in 0..<(n * d) { XCTAssertEqual(Double(gx[i]), want.gx[i], accuracy: 1e-5) }
        XCTAssertTrue((0..<(E * d)).allSatisfy { r.core.buffer("weight")!.grad![$0] == 0 })
        XCTAssertTrue((0..<E).allSatisfy { r.core.buffer("bias")!.grad![$0] == 0 })
    }

    func testBackwardUsesForwardTimeValues() throws {
        // Changing x's storage and W after forward must not change the gradients.
        let n = 8, k = 2
        let (r, w, _) = try makeRouter(E: E, d: d)
        let x = randomNormal(n * d, seed: 12)
        let out = try forward(r, x: x, n: n, k: k, step: train())
        let gw = randomNormal(n * k, seed: 13)
        r.core.buffer("weight")!.floats.update(repeating: 3, count: E * d)
        var gx = [Float](repeating: 0, count: n * d)
        try backward(r, try XCTUnwrap(out.ctx), n: n, k: k, gw: gw, gaux: 1, gradX: &gx)
        let ref = reference(x: x, w: w, b: nil, n: n, E: E, d: d, k: k, balance: 0.01)
        let want = referenceGrads(ref, x: x, w: w, gw: gw, gaux: 1, balance: 0.01, n: n, E: E, d: d, k: k)
        for i in 0..<(n * d) { XCTAssertEqual(Double(gx[i]), want.gx[i], accuracy: 1e-5) }
    }

    // MARK: the framework's gradcheck

    func testPluginChecker() throws {
        let lib = try openPlugin("RouterSMoE")
        for hp: [String: Any] in [
            [:], ["bias": true, "k": 3, "balance_weight": 0.5], ["k": 1, "weights": "full"],
            ["k": 2, "weights": "full", "bias": true],
        ] {
            let results = PluginChecker(library: lib, hyperparameters: hp).run()
            XCTAssertTrue(
                results.allSatisfy(\.passed),
                "\(hp): " + results.filter { !$0.passed }.map(\.detail).joined(separator: "\n"))
        }
    }
}
