import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `rvq` residual quantizer plugin against a brute-force double-precision reference.
final class QuantizerRVQTests: XCTestCase {
    let d = 5, K = 7

    /// A quantizer whose codebooks (L,K,d) are overwritten with known random values.
    func makeQuantizer(
        L: Int, K: Int, d: Int, hp: [String: Any] = [:], seed: UInt64 = 1,
        randomize: Bool = true
    ) throws -> (QuantizerInstance, [Float]) {
        let lib = try openPlugin("QuantizerRVQ")
        var all = hp
        all["levels"] = L
        let core = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), hyperparameters: all, seed: seed)
        let q = try QuantizerInstance(core)
        let cb = try XCTUnwrap(core.buffer("codebook"))
        if randomize { cb.floats.update(from: randomNormal(L * K * d, seed: seed &+ 100), count: L * K * d) }
        return (q, Array(UnsafeBufferPointer(start: cb.floats, count: L * K * d)))
    }

    struct Outputs {
        var quantized: [Float], codes: [Int32], counts: [Float], loss: Float, ctx: PluginContext?
    }

    func forward(_ q: QuantizerInstance, x: [Float], n: Int, step: StepInfo) throws -> Outputs {
        var qo = [Float](repeating: -7, count: n * q.dModel), codes = [Int32](repeating: -1, count: n * q.codesPerToken)
        var counts = [Float](repeating: -1, count: q.codebookSize)
        let (loss, ctx) = try x.withUnsafeBufferPointer { xp in
            try qo.withUnsafeMutableBufferPointer { qp in
                try codes.withUnsafeMutableBufferPointer { cp in
                    try counts.withUnsafeMutableBufferPointer { kp in
                        try q.forward(
                            step, x: xp.baseAddress!, n: n, quantized: qp.baseAddress!, codes: cp.baseAddress!,
                            codeCounts: kp.baseAddress!)
                    }
                }
            }
        }
        return Outputs(quantized: qo, codes: codes, counts: counts, loss: loss, ctx: ctx)
    }

    func backward(
        _ q: QuantizerInstance, _ ctx: PluginContext, n: Int, gq: [Float]?, gradLoss: Float,
        gradX: inout [Float]
    ) throws {
        try gradX.withUnsafeMutableBufferPointer { gp in
            if let gq {
                try gq.withUnsafeBufferPointer {
                    try q.backward(ctx, n: n, gradQuantized: $0.baseAddress, gradLoss: gradLoss, gradX: gp.baseAddress!)
                }
            } else {
                try q.backward(ctx, n: n, gradQuantized: nil, gradLoss: gradLoss, gradX: gp.baseAddress!)
            }
        }
    }

    /// Brute force in double: r_0 = x; per level l (0-based) the nearest code of r_l in
    /// codebook l (ties -> lowest index), q_l = e^l_c, r_{l+1} = r_l - q_l.
    /// codes (N,L), q = sum_l q_l, residuals[l] = r_{l+1} (N,d), counts summed over levels,
    /// levelCounts (L,K), sse = sum_l sum_t ||r_l - q_l||^2.
    struct Reference {
        var codes: [[Int]], q: [Double], residuals: [[Double]], counts: [Double], levelCounts: [[Double]], sse: Double
    }

    func reference(x: [Float], codebook: [Float], n: Int, L: Int, K: Int, d: Int) -> Reference {
        var r = x.map(Double.init), q = [Double](repeating: 0, count: n * d)
        var codes = [[Int]](repeating: [], count: n), residuals: [[Double]] = []
        var counts = [Double](repeating: 0, count: K), levelCounts: [[Double]] = [], sse = 0.0
        for l in 0..<L {
            var used = [Double](repeating: 0, count: K)
            for t in 0..<n {
                var best = 0, bestDist = Double.infinity
                for j in 0..<K {
                    var s = 0.0
                    for i in 0..<d { let diff = r[t * d + i] - Double(codebook[(l * K + j) * d + i]); s += diff * diff }
                    if s < bestDist { bestDist = s; best = j }
                }
                codes[t].append(best)
                used[best] += 1
                counts[best] += 1
                sse += bestDist
                for i in 0..<d {
                    let e = Double(codebook[(l * K + best) * d + i])
                    r[t * d + i] -= e
                    q[t * d + i] += e
                }
            }
            residuals.append(r)
            levelCounts.append(used)
        }
        return Reference(codes: codes, q: q, residuals: residuals, counts: counts, levelCounts: levelCounts, sse: sse)
    }

    func train(_ step: Int = 0, frozen: Bool = false, surrogate: Bool = false, noGrad: Bool = false) -> StepInfo {
        StepInfo(step: step, totalSteps: 10, train: true, noGrad: noGrad, frozen: frozen, surrogate: surrogate, seed: 3)
    }

    var eval: StepInfo { StepInfo(step: 0, totalSteps: 10, train: false, seed: 3) }

    // MARK: descriptor, schema, buffers

    func testDescriptorAndSchema() throws {
        let lib = try openPlugin("QuantizerRVQ")
        XCTAssertEqual(lib.name, "rvq")
        XCTAssertEqual(lib.version, "1.0.0")
        XCTAssertEqual(lib.kind, .quantizer)
        XCTAssertTrue(lib.hasStopGradientLoss)
        XCTAssertFalse(lib.hasNoGrad)
        XCTAssertEqual(
            lib.schema.map(\.name),
            [
                "levels", "codebook_size", "commitment", "init_scale", "ema", "ema_decay", "ema_epsilon", "kmeans_init",
                "kmeans_iters", "dead_code_threshold", "codebook_loss",
            ])
        let s = Dictionary(uniqueKeysWithValues: lib.schema.map { ($0.name, $0) })
        XCTAssertEqual(s["levels"]?.type, .int)
        XCTAssertEqual(s["levels"]?.defaultNumber, 2)
        XCTAssertEqual(s["levels"]?.min, 1)
        XCTAssertEqual(s["levels"]?.max, 16)
        XCTAssertEqual(s["codebook_size"]?.type, .int)
        XCTAssertEqual(s["codebook_size"]?.defaultNumber, 0)
        XCTAssertEqual(s["codebook_size"]?.min, 0)
        XCTAssertEqual(s["commitment"]?.type, .float)
        XCTAssertEqual(s["commitment"]?.defaultNumber, 0.25)
        XCTAssertEqual(s["commitment"]?.min, 0)
        XCTAssertEqual(s["init_scale"]?.defaultNumber, 1.0)
        XCTAssertEqual(s["init_scale"]?.min, 0)
        XCTAssertEqual(s["codebook_loss"]?.type, .string)
        XCTAssertEqual(s["codebook_loss"]?.defaultString, "residual")
        XCTAssertEqual(s["codebook_loss"]?.choices, ["residual", "cumulative"])
        XCTAssertTrue(lib.schema.allSatisfy { !$0.description.isEmpty })
        XCTAssertTrue(lib.summary.contains("r_l = r_{l-1} - q_l"), lib.summary)
        XCTAssertNotNil(lib.feature("vqmoe.metrics/1"))
        XCTAssertNil(lib.feature("vqmoe.no-such-feature/1"))
    }

    func testBuffersAndInit() throws {
        let lib = try openPlugin("QuantizerRVQ")
        let K = 16, d = 12
        let core = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), hyperparameters: ["levels": 3], seed: 5)
        XCTAssertEqual(core.buffers.map(\.name), ["codebook"])
        let cb = try XCTUnwrap(core.buffer("codebook"))
        XCTAssertTrue(cb.isParameter)
        XCTAssertEqual(cb.shape, [3, K, d])
        XCTAssertEqual(cb.flags, UInt32(VQMOE_BUF_NO_DECAY | VQMOE_BUF_FREEZE_FT))
        let q = try QuantizerInstance(core)
        XCTAssertEqual(q.codebookSize, K)
        XCTAssertEqual(q.codesPerToken, 3)
        // N(0, 1) at every level (no per-level scaling): sample std of 192 draws per level.
        for l in 0..<3 {
            let vals = (0..<(K * d)).map { Double(cb.floats[l * K * d + $0]) }
            let mean = vals.reduce(0, +) / Double(vals.count)
            let std = (vals.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(vals.count)).squareRoot()
            XCTAssertEqual(std, 1, accuracy: 0.15, "level \(l)")
            XCTAssertEqual(mean, 0, accuracy: 0.25, "level \(l)")
        }
        let again = try makeInstance(
            lib, dims: ModelDims(dModel: d, nCodes: K), hyperparameters: ["levels": 3], seed: 5)
        XCTAssertEqual(memcmp(cb.data, again.buffer("codebook")!.data, cb.byteCount), 0)
        let other = try makeInstance(
            lib, dims: ModelDims(dModel: d, nCodes: K), hyperparameters: ["levels": 3], seed: 6)
        XCTAssertNotEqual(memcmp(cb.data, other.buffer("codebook")!.data, cb.byteCount), 0)
        let scaled = try makeInstance(
            lib, dims: ModelDims(dModel: d, nCodes: K), hyperparameters: ["levels": 3, "init_scale": 0.5], seed: 5)
        for i in 0..<(3 * K * d) {
            XCTAssertEqual(scaled.buffer("codebook")!.floats[i], 0.5 * cb.floats[i], accuracy: 1e-6)
        }

        // Defaults: 2 levels, K = n_codes; codebook_size overrides n_codes.
        let def = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K))
        XCTAssertEqual(def.buffer("codebook")?.shape, [2, K, d])
        XCTAssertEqual(try QuantizerInstance(def).codesPerToken, 2)
        let own = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), hyperparameters: ["codebook_size": 5])
        XCTAssertEqual(own.buffer("codebook")?.shape, [2, 5, d])
        XCTAssertEqual(try QuantizerInstance(own).codebookSize, 5)
    }

    func testBadHyperparametersAreErrors() throws {
        let lib = try openPlugin("QuantizerRVQ")
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 0))) { error in
            let msg = "\(error)"
            XCTAssertTrue(msg.contains("codebook") && msg.contains("n_codes"), msg)
        }
        XCTAssertNoThrow(
            try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 0), hyperparameters: ["codebook_size": 3]))
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 0, nCodes: 4))) { error in
            XCTAssertTrue("\(error)".contains("d_model"), "\(error)")
        }
        for hp: [String: Any] in [["levels": 0], ["levels": 17], ["commitment": -1.0], ["codebook_loss": "sum"]] {
            XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 4), hyperparameters: hp)) {
                error in
                XCTAssertTrue("\(error)".contains(hp.keys.first!), "\(error)")
            }
        }
    }

    // MARK: forward

    func testForwardMatchesReference() throws {
        for (L, commitment, n) in [(2, 0.25, 37), (1, 1.3, 5), (3, 0.0, 64), (5, 0.6, 20)] {
            let (q, cb) = try makeQuantizer(L: L, K: K, d: d, hp: ["commitment": commitment])
            let x = randomNormal(n * d, seed: 17, scale: 1.5)
            let out = try forward(q, x: x, n: n, step: train())
            let ref = reference(x: x, codebook: cb, n: n, L: L, K: K, d: d)
            XCTAssertEqual(out.codes.map(Int.init), ref.codes.flatMap { $0 }, "L \(L)")  // (N,L) row-major
            for i in 0..<(n * d) { XCTAssertEqual(Double(out.quantized[i]), ref.q[i], accuracy: 1e-5) }
            XCTAssertEqual(out.counts.map(Double.init), ref.counts)
            XCTAssertEqual(out.counts.reduce(0, +), Float(n * L))
            let want = (1 + commitment) * ref.sse / Double(n * d)
            XCTAssertEqual(Double(out.loss), want, accuracy: 1e-5 * max(1, want))
            XCTAssertNotNil(out.ctx)
        }
    }

    func testMoreLevelsNeverReconstructWorse() throws {
        // With code 0 of every level set to 0 a level can always keep the residual, so the
        // plugin's token errors ||x_t - q_t||^2 cannot grow with L (the codebooks of L levels
        // are the first L of the same random sequence).
        let n = 50
        let x = randomNormal(n * d, seed: 4)
        var previous = (0..<n).map { t in (0..<d).map { Double(x[t * d + $0]) * Double(x[t * d + $0]) }.reduce(0, +) }
        var total = previous.reduce(0, +)
        for L in 1...4 {
            let (q, _) = try makeQuantizer(L: L, K: K, d: d)
            let cb = q.core.buffer("codebook")!.floats
            for l in 0..<L { (cb + l * K * d).update(repeating: 0, count: d) }
            let out = try forward(q, x: x, n: n, step: eval)
            let errors: [Double] = (0..<n).map { t in
                var s = 0.0
                for i in 0..<d { let e = Double(x[t * d + i]) - Double(out.quantized[t * d + i]); s += e * e }
                return s
            }
            for t in 0..<n { XCTAssertLessThanOrEqual(errors[t], previous[t] + 1e-9, "L \(L) token \(t)") }
            XCTAssertLessThan(errors.reduce(0, +), total, "L \(L) should improve on L - 1")
            previous = errors
            total = errors.reduce(0, +)
        }
    }

    func testLargerProblemMatchesReference() throws {
        // Enough tokens to split over the host's threads, and wider codebooks.
        let threads = HostRuntime.threads
        HostRuntime.configure(threads: 2)
        defer { HostRuntime.configure(threads: threads) }
        let n = 300, d = 24, K = 40, L = 3
        let (q, cb) = try makeQuantizer(L: L, K: K, d: d, seed: 9)
        let x = randomNormal(n * d, seed: 10)
        let out = try forward(q, x: x, n: n, step: eval)
        let ref = reference(x: x, codebook: cb, n: n, L: L, K: K, d: d)
        XCTAssertEqual(out.codes.map(Int.init), ref.codes.flatMap { $0 })
        XCTAssertEqual(out.counts.map(Double.init), ref.counts)
        XCTAssertEqual(Double(out.loss), 1.25 * ref.sse / Double(n * d), accuracy: 1e-5 * ref.sse / Double(n * d))
        XCTAssertNil(out.ctx)
    }

    func testTiesGoToLowestIndex() throws {
        // Level 0: codes 1 and 3 equal -> 1. Level 1 gets r_1 = 0 and an all-zero codebook -> 0.
        let d = 2, K = 4, L = 2
        let (q, _) = try makeQuantizer(L: L, K: K, d: d, randomize: false)
        let cb: [Float] = [9, 9, 0.5, -1.5, -4, 4, 0.5, -1.5] + [Float](repeating: 0, count: K * d)
        q.core.buffer("codebook")!.floats.update(from: cb, count: L * K * d)
        let out = try forward(q, x: [0.5, -1.5, 0.6, -1.4], n: 2, step: train())
        XCTAssertEqual(out.codes, [1, 0, 1, 0])
        XCTAssertEqual(out.counts, [2, 2, 0, 0])
        XCTAssertEqual(out.quantized, [0.5, -1.5, 0.5, -1.5])
    }

    func testSurrogateOutputsXWithUsualCodesAndLoss() throws {
        let n = 11, L = 3
        let (q, cb) = try makeQuantizer(L: L, K: K, d: d)
        let x = randomNormal(n * d, seed: 2)
        let normal = try forward(q, x: x, n: n, step: train())
        let sur = try forward(q, x: x, n: n, step: train(surrogate: true))
        XCTAssertEqual(sur.quantized, x)
        XCTAssertEqual(sur.codes, normal.codes)
        XCTAssertEqual(sur.counts, normal.counts)
        XCTAssertEqual(sur.loss, normal.loss)
        XCTAssertEqual(
            normal.codes.map(Int.init), reference(x: x, codebook: cb, n: n, L: L, K: K, d: d).codes.flatMap { $0 })
    }

    func testEvalAndNoGradSaveNoContextAndChangeNothing() throws {
        let (q, cb) = try makeQuantizer(L: 2, K: K, d: d)
        let x = randomNormal(4 * d, seed: 2)
        XCTAssertNil(try forward(q, x: x, n: 4, step: eval).ctx)
        XCTAssertNil(try forward(q, x: x, n: 4, step: train(noGrad: true)).ctx)
        XCTAssertNotNil(try forward(q, x: x, n: 4, step: train()).ctx)
        XCTAssertEqual(Array(UnsafeBufferPointer(start: q.core.buffer("codebook")!.floats, count: 2 * K * d)), cb)
        // An empty batch: no codes, zero counts and loss.
        let empty = try forward(q, x: [], n: 0, step: train())
        XCTAssertEqual(empty.counts, [Float](repeating: 0, count: K))
        XCTAssertEqual(empty.loss, 0)
    }

    func testNonFiniteInputIsANumericError() throws {
        let (q, _) = try makeQuantizer(L: 2, K: K, d: d)
        var x = randomNormal(2 * d, seed: 2)
        x[3] = .nan
        XCTAssertThrowsError(try forward(q, x: x, n: 2, step: train())) { error in
            XCTAssertEqual((error as? VQMoEError)?.category, .numeric, "\(error)")
        }
    }

    // MARK: backward

    func testBackwardMatchesHandGradients() throws {
        let cases: [(String, Int, Double, Float, Bool)] = [
            ("residual", 2, 0.25, 0.08, true), ("residual", 3, 0.6, 1, false), ("residual", 1, 0.0, 0.5, true),
            ("cumulative", 2, 0.25, 0.08, true), ("cumulative", 4, 0.4, 1.5, false),
        ]
        for (mode, L, commitment, beta, withGradQ) in cases {
            let n = 13
            let (q, cb) = try makeQuantizer(
                L: L, K: K, d: d, hp: ["commitment": commitment, "codebook_loss": mode], seed: 6)
            let x = randomNormal(n * d, seed: 7, scale: 1.4)
            let out = try forward(q, x: x, n: n, step: train())
            let ref = reference(x: x, codebook: cb, n: n, L: L, K: K, d: d)
            let gq = withGradQ ? randomNormal(n * d, seed: 8) : nil
            let cbGrad = q.core.buffer("codebook")!.grad!
            cbGrad.update(repeating: 0.5, count: L * K * d)  // accumulation: += onto 0.5
            var gx = [Float](repeating: -1, count: n * d)  // += onto -1
            try backward(q, try XCTUnwrap(out.ctx), n: n, gq: gq, gradLoss: beta, gradX: &gx)
            let M = Double(n * d), g = Double(beta)
            var wantCB = [Double](repeating: 0.5, count: L * K * d)
            for t in 0..<n {
                for i in 0..<d {
                    // straight-through + commitment: sum_l d/dx [gamma mse(r_{l-1}, sg(q_l))], d r_{l-1}/dx = I
                    let rsum = (0..<L).map { ref.residuals[$0][t * d + i] }.reduce(0, +)
                    let want = -1 + (gq.map { Double($0[t * d + i]) } ?? 0) + g * commitment * 2 / M * rsum
                    XCTAssertEqual(Double(gx[t * d + i]), want, accuracy: 1e-5, "\(mode) L\(L) grad_x[\(t),\(i)]")
                    for l in 0..<L {
                        // residual: 2/M (q_l - r_{l-1}) = -2/M r_l; cumulative: -2/M sum_{m >= l} r_m
                        let r =
                            mode == "residual"
                            ? ref.residuals[l][t * d + i]
                            : (l..<L).map { ref.residuals[$0][t * d + i] }.reduce(0, +)
                        wantCB[(l * K + ref.codes[t][l]) * d + i] -= g * 2 / M * r
                    }
                }
            }
            for i in 0..<(L * K * d) {
                XCTAssertEqual(Double(cbGrad[i]), wantCB[i], accuracy: 1e-5, "\(mode) L\(L) grad_codebook[\(i)]")
            }
        }
    }

    func testCumulativeCodebookGradientIsTheValueSlope() throws {
        // codebook_loss = cumulative: the codebook gradient is 1/(1+gamma) of the finite-difference
        // slope of the loss value (the stop-gradients only split the value between the terms).
        let n = 9, L = 3, commitment = 0.3
        let (q, cb) = try makeQuantizer(
            L: L, K: K, d: d, hp: ["commitment": commitment, "codebook_loss": "cumulative"], seed: 11)
        let x = randomNormal(n * d, seed: 12)
        let out = try forward(q, x: x, n: n, step: train())
        var gx = [Float](repeating: 0, count: n * d)
        try backward(q, try XCTUnwrap(out.ctx), n: n, gq: nil, gradLoss: 1, gradX: &gx)
        let grad = q.core.buffer("codebook")!.grad!
        let ref = reference(x: x, codebook: cb, n: n, L: L, K: K, d: d)
        /// The loss value, or nil where the perturbation switches a code (not differentiable there).
        func loss(_ c: [Float]) -> Double? {
            let r = reference(x: x, codebook: c, n: n, L: L, K: K, d: d)
            return r.codes == ref.codes ? (1 + commitment) * r.sse / Double(n * d) : nil
        }
        let h: Float = 1e-3
        var checked = 0, total = 0
        for l in 0..<L {
            for j in Set((0..<n).map { ref.codes[$0][l] }) {  // the used codes of every level
                for i in 0..<d {
                    let idx = (l * K + j) * d + i
                    var plus = cb, minus = cb
                    plus[idx] += h; minus[idx] -= h
                    total += 1
                    guard let up = loss(plus), let down = loss(minus) else { continue }
                    let slope = (up - down) / Double(2 * h)
                    XCTAssertEqual(
                        Double(grad[idx]) * (1 + commitment), slope, accuracy: 1e-3, "codebook[\(l)][\(j)][\(i)]")
                    checked += 1
                }
            }
        }
        XCTAssertGreaterThan(checked, total * 3 / 4)
    }

    func testFrozenHasNoCodebookGradient() throws {
        let n = 6
        let (q, _) = try makeQuantizer(L: 2, K: K, d: d)
        let x = randomNormal(n * d, seed: 7)
        let out = try forward(q, x: x, n: n, step: train(frozen: true))
        var gx = [Float](repeating: 0, count: n * d)
        try backward(q, try XCTUnwrap(out.ctx), n: n, gq: randomNormal(n * d, seed: 1), gradLoss: 1, gradX: &gx)
        XCTAssertTrue((0..<(2 * K * d)).allSatisfy { q.core.buffer("codebook")!.grad![$0] == 0 })
        XCTAssertGreaterThan(gx.map { abs($0) }.max()!, 0)
    }

    // MARK: metrics

    func testMetricsPerLevelAndTotal() throws {
        let d = 2, K = 3, L = 2
        let (q, _) = try makeQuantizer(L: L, K: K, d: d, randomize: false)
        XCTAssertEqual(try q.core.metrics(), [:])  // nothing before the first forward
        // Level 0 codes {0, 10e1, 10e2}, level 1 codes {0, e1, -e1}.
        q.core.buffer("codebook")!.floats.update(from: [0, 0, 10, 0, 0, 10, 0, 0, 1, 0, -1, 0], count: L * K * d)
        let x: [Float] = [0.1, 0, 11, 0, 9, 0.2, 0, 10.1, 0, 9.9, 10, 0]
        let out = try forward(q, x: x, n: 6, step: train())
        // Level 0: 0, 1, 1, 2, 2, 1 -> counts 1, 3, 2. Level 1 residuals: (0.1,0) (1,0) (-1,0.2) (0,0.1) (0,-0.1) (0,0)
        // -> 0 (0.1 is nearer 0 than 1), 1, 2, 0, 0, 0 -> counts 4, 1, 1.
        XCTAssertEqual(out.codes, [0, 0, 1, 1, 1, 2, 2, 0, 2, 0, 1, 0])
        let m = try q.core.metrics()
        XCTAssertEqual(m["code_counts_l0"], [1, 3, 2])
        XCTAssertEqual(m["code_counts_l1"], [4, 1, 1])
        XCTAssertEqual(m["code_counts"], [5, 4, 3])
        XCTAssertEqual(m["dead_codes_l0"], [0])
        XCTAssertEqual(m["dead_codes_l1"], [0])
        XCTAssertEqual(m["dead_codes"], [0])
        func ppl(_ c: [Double]) -> Double {
            let s = c.reduce(0, +)
            return exp(-c.filter { $0 > 0 }.map { $0 / s * log($0 / s) }.reduce(0, +))
        }
        XCTAssertEqual(try XCTUnwrap(m["usage_perplexity_l0"]?.first), ppl([1, 3, 2]), accuracy: 1e-9)
        XCTAssertEqual(try XCTUnwrap(m["usage_perplexity_l1"]?.first), ppl([4, 1, 1]), accuracy: 1e-9)
        XCTAssertEqual(try XCTUnwrap(m["usage_perplexity"]?.first), ppl([5, 4, 3]), accuracy: 1e-9)
        // An eval forward after a training forward does not replace the training stats.
        _ = try forward(q, x: [0, 0], n: 1, step: eval)
        XCTAssertEqual(try q.core.metrics()["code_counts_l0"], [1, 3, 2])
        // One token: both levels use code 0; codes 1 and 2 are dead at each level.
        _ = try forward(q, x: [0, 0], n: 1, step: train(1))
        let m2 = try q.core.metrics()
        XCTAssertEqual(m2["dead_codes_l0"], [2])
        XCTAssertEqual(m2["dead_codes_l1"], [2])
        XCTAssertEqual(m2["code_counts"], [2, 0, 0])
        XCTAssertEqual(try XCTUnwrap(m2["usage_perplexity_l1"]?.first), 1, accuracy: 1e-12)
    }

    // MARK: the framework's gradcheck

    func testPluginChecker() throws {
        let lib = try openPlugin("QuantizerRVQ")
        // Fully verified: one level (plain VQ-VAE), and the cumulative codebook loss at any depth,
        // whose backward is gamma/(1+gamma) of the value's slope in x and 1/(1+gamma) in the codebook.
        for hp: [String: Any] in [
            ["levels": 1], ["codebook_loss": "cumulative"], ["codebook_loss": "cumulative", "levels": 4],
            ["levels": 1, "commitment": 0.7, "codebook_size": 5],
        ] {
            let results = PluginChecker(library: lib, hyperparameters: plainVQVAE.merging(hp) { $1 }).run()
            XCTAssertTrue(
                results.allSatisfy(\.passed),
                "\(hp): " + results.filter { !$0.passed }.map(\.description).joined(separator: "\n"))
            let x = results.first { $0.name.hasPrefix("gradcheck x (direction") }
            XCTAssertTrue(x?.detail.contains("|analytic|/|numeric| 0.") == true, x?.detail ?? "missing")
            XCTAssertTrue(results.contains { $0.name == "gradcheck x [straight-through]" && $0.passed })
        }
        // The default (residual, SoundStream/lucidrains): the codebook's loss direction cannot
        // hold for L >= 2 — the loss VALUE depends on codebook l through every later residual
        // r_m (m > l), while the detached-residual backward gives codebook l only its own
        // level's term — so the checker reports it without judging (the tests above pin the
        // gradient by hand). The x direction and the straight-through checks are judged.
        for hp: [String: Any] in [[:], ["levels": 3]] {
            let results = PluginChecker(library: lib, hyperparameters: plainVQVAE.merging(hp) { $1 }).run()
            XCTAssertTrue(
                results.allSatisfy(\.passed),
                "\(hp): " + results.filter { !$0.passed }.map(\.description).joined(separator: "\n"))
            let codebook = results.first { $0.name == "gradcheck codebook (direction: stop-gradient loss) [loss]" }
            XCTAssertTrue(codebook?.detail.contains("reported only") == true, codebook?.detail ?? "missing")
            XCTAssertTrue(
                results.contains {
                    $0.name == "gradcheck x (direction: stop-gradient loss) [loss]" && $0.passed
                        && !$0.detail.contains("reported only")
                })
            XCTAssertGreaterThanOrEqual(results.count, 12)
        }
    }

    // MARK: codebook upkeep per level (EMA, k-means init, dead-code restart)

    /// The defaults (per-level EMA codebooks, k-means init, restarts) pass the framework's
    /// gradcheck: the loss is commitment · Σ_l mse(r_{l-1}, sg(q_l)), its x gradient exact.
    func testPluginCheckerAtDefaults() throws {
        let results = PluginChecker(library: try openPlugin("QuantizerRVQ")).run()
        XCTAssertTrue(
            results.allSatisfy(\.passed), results.filter { !$0.passed }.map(\.description).joined(separator: "\n"))
        let x = results.first { $0.name.hasPrefix("gradcheck x (direction") }
        XCTAssertTrue(x?.detail.contains("|analytic|/|numeric| 1.0000") == true, x?.detail ?? "missing")
    }

    /// One training forward with ema: each level's codebook takes the brute-force EMA step on
    /// that level's input r_{l-1} (= x for level 1, x − q_1 for level 2) with its own counts.
    func testEMAUpdatePerLevelByHand() throws {
        let d = 3, K = 4, n = 16, L = 2, decay = 0.7, eps = 1e-5
        let lib = try openPlugin("QuantizerRVQ")
        let core = try makeInstance(
            lib, dims: ModelDims(dModel: d, nCodes: K), hyperparameters: ["ema": true, "ema_decay": decay, "levels": L])
        let q = try QuantizerInstance(core)
        let C = try XCTUnwrap(core.buffer("codebook")), count = try XCTUnwrap(core.buffer("ema_count"))
        let before = (0..<(L * K * d)).map { Double(C.floats[$0]) }
        let x = randomNormal(n * d, seed: 11)
        // Brute force: nearest code per level on the running residual.
        var r = x.map(Double.init), inputs: [[Double]] = [], codes: [[Int]] = []
        for l in 0..<L {
            inputs.append(r)
            var c = [Int]()
            for t in 0..<n {
                let dist: [Double] = (0..<K).map { j in
                    (0..<d).reduce(0.0) { $0 + pow(r[t * d + $1] - before[(l * K + j) * d + $1], 2) }
                }
                c.append(dist.firstIndex(of: dist.min()!)!)
                for i in 0..<d { r[t * d + i] -= before[(l * K + c[t]) * d + i] }
            }
            codes.append(c)
        }
        var qo = [Float](repeating: 0, count: n * d), out = [Int32](repeating: 0, count: n * L)
        var cnt = [Float](repeating: 0, count: K)
        _ = try x.withUnsafeBufferPointer { xp in
            try q.forward(
                StepInfo(step: 0, totalSteps: 10, train: true, seed: 1), x: xp.baseAddress!, n: n, quantized: &qo,
                codes: &out, codeCounts: &cnt)
        }
        for l in 0..<L {
            XCTAssertEqual((0..<n).map { Int(out[$0 * L + l]) }, codes[l], "level \(l) codes")
            var N = [Double](repeating: 0, count: K), m = [Double](repeating: 0, count: K * d)
            for j in 0..<K {
                N[j] = decay + (1 - decay) * Double(codes[l].filter { $0 == j }.count)
                for i in 0..<d {
                    let s = (0..<n).filter { codes[l][$0] == j }.reduce(0.0) { $0 + inputs[l][$1 * d + i] }
                    m[j * d + i] = decay * before[(l * K + j) * d + i] + (1 - decay) * s
                }
            }
            let total = N.reduce(0, +)
            for j in 0..<K {
                XCTAssertEqual(Double(count.floats[l * K + j]), N[j], accuracy: 1e-5)
                let smoothed = (N[j] + eps) / (total + Double(K) * eps) * total
                for i in 0..<d {
                    XCTAssertEqual(Double(C.floats[(l * K + j) * d + i]), m[j * d + i] / smoothed, accuracy: 1e-5)
                }
            }
        }
    }

    /// k-means init runs level by level on the first training forward (state 'initialized'),
    /// so level 1's codes are the k-means clusters of x: each code is the mean of its tokens.
    func testKMeansInitPerLevel() throws {
        let d = 3, K = 3, n = 24
        let lib = try openPlugin("QuantizerRVQ")
        let core = try makeInstance(
            lib, dims: ModelDims(dModel: d, nCodes: K),
            hyperparameters: ["kmeans_init": true, "kmeans_iters": 50, "levels": 2])
        let q = try QuantizerInstance(core)
        let C = try XCTUnwrap(core.buffer("codebook")), flag = try XCTUnwrap(core.buffer("initialized"))
        XCTAssertEqual(flag.data.assumingMemoryBound(to: Int32.self).pointee, 0)
        let x = randomNormal(n * d, seed: 12)
        var qo = [Float](repeating: 0, count: n * d), out = [Int32](repeating: 0, count: n * 2)
        var cnt = [Float](repeating: 0, count: K)
        _ = try x.withUnsafeBufferPointer { xp in
            try q.forward(
                StepInfo(step: 0, totalSteps: 10, train: true, seed: 2), x: xp.baseAddress!, n: n, quantized: &qo,
                codes: &out, codeCounts: &cnt)
        }
        XCTAssertEqual(flag.data.assumingMemoryBound(to: Int32.self).pointee, 1)
        for j in 0..<K {
            let members = (0..<n).filter { out[$0 * 2] == Int32(j) }
            guard !members.isEmpty else { continue }
            for i in 0..<d {
                let mean = members.reduce(0.0) { $0 + Double(x[$1 * d + i]) } / Double(members.count)
                XCTAssertEqual(
                    Double(C.floats[j * d + i]), mean, accuracy: 1e-4, "level 1 code \(j) is its cluster's mean")
            }
        }
    }

}
