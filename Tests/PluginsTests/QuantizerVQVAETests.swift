import Foundation
import VQMoE
import XCTest

/// The `vqvae` quantizer plugin against a brute-force double-precision reference.
final class QuantizerVQVAETests: XCTestCase {
    let d = 6, K = 9

    /// A quantizer whose codebook (K,d) is overwritten with known random values.
    func makeQuantizer(K: Int, d: Int, hp: [String: Any] = [:], seed: UInt64 = 1,
                       randomize: Bool = true) throws -> (QuantizerInstance, [Float]) {
        let lib = try openPlugin("QuantizerVQVAE")
        let core = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), hyperparameters: hp, seed: seed)
        let q = try QuantizerInstance(core)
        let cb = try XCTUnwrap(core.buffer("codebook"))
        if randomize {
            cb.floats.update(from: randomNormal(K * d, seed: seed &+ 100), count: K * d)
            if let sum = core.buffer("ema_sum") { sum.floats.update(from: cb.floats, count: K * d) }
        }
        return (q, Array(UnsafeBufferPointer(start: cb.floats, count: K * d)))
    }

    struct Outputs {
        var quantized: [Float], codes: [Int32], counts: [Float], loss: Float, ctx: PluginContext?
    }

    func forward(_ q: QuantizerInstance, x: [Float], n: Int, step: StepInfo) throws -> Outputs {
        var qo = [Float](repeating: -7, count: n * q.dModel), codes = [Int32](repeating: -1, count: n)
        var counts = [Float](repeating: -1, count: q.codebookSize)
        let (loss, ctx) = try x.withUnsafeBufferPointer { xp in
            try qo.withUnsafeMutableBufferPointer { qp in
                try codes.withUnsafeMutableBufferPointer { cp in
                    try counts.withUnsafeMutableBufferPointer { kp in
                        try q.forward(step, x: xp.baseAddress!, n: n, quantized: qp.baseAddress!, codes: cp.baseAddress!,
                                      codeCounts: kp.baseAddress!)
                    }
                }
            }
        }
        return Outputs(quantized: qo, codes: codes, counts: counts, loss: loss, ctx: ctx)
    }

    func backward(_ q: QuantizerInstance, _ ctx: PluginContext, n: Int, gq: [Float]?, gradLoss: Float,
                  gradX: inout [Float]) throws {
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

    /// Brute force in double: nearest code by squared distance (ties -> lowest index),
    /// q = e_c, counts, mse = sum ||x - q||^2 / (N d).
    struct Reference { var codes: [Int], q: [Double], counts: [Double], mse: Double }

    func reference(x: [Float], codebook: [Float], n: Int, K: Int, d: Int) -> Reference {
        var codes = [Int](), q = [Double](), counts = [Double](repeating: 0, count: K), sse = 0.0
        for t in 0..<n {
            var best = 0, bestDist = Double.infinity
            for j in 0..<K {
                var s = 0.0
                for i in 0..<d { let diff = Double(x[t * d + i]) - Double(codebook[j * d + i]); s += diff * diff }
                if s < bestDist { bestDist = s; best = j }
            }
            codes.append(best)
            counts[best] += 1
            sse += bestDist
            for i in 0..<d { q.append(Double(codebook[best * d + i])) }
        }
        return Reference(codes: codes, q: q, counts: counts, mse: n > 0 ? sse / Double(n * d) : 0)
    }

    func train(_ step: Int = 0, frozen: Bool = false, surrogate: Bool = false, noGrad: Bool = false) -> StepInfo {
        StepInfo(step: step, totalSteps: 10, train: true, noGrad: noGrad, frozen: frozen, surrogate: surrogate, seed: 3)
    }

    var eval: StepInfo { StepInfo(step: 0, totalSteps: 10, train: false, seed: 3) }

    // MARK: descriptor, schema, buffers

    func testDescriptorAndSchema() throws {
        let lib = try openPlugin("QuantizerVQVAE")
        XCTAssertEqual(lib.name, "vqvae")
        XCTAssertEqual(lib.version, "1.0.0")
        XCTAssertEqual(lib.kind, .quantizer)
        XCTAssertEqual(lib.schema.map(\.name), ["codebook_size", "commitment", "init_scale", "ema", "ema_decay", "ema_epsilon"])
        let s = Dictionary(uniqueKeysWithValues: lib.schema.map { ($0.name, $0) })
        XCTAssertEqual(s["codebook_size"]?.type, .int)
        XCTAssertEqual(s["codebook_size"]?.defaultNumber, 0)
        XCTAssertEqual(s["codebook_size"]?.min, 0)
        XCTAssertEqual(s["commitment"]?.type, .float)
        XCTAssertEqual(s["commitment"]?.defaultNumber, 0.25)
        XCTAssertEqual(s["commitment"]?.min, 0)
        XCTAssertEqual(s["init_scale"]?.defaultNumber, 1.0)
        XCTAssertEqual(s["ema"]?.type, .bool)
        XCTAssertEqual(s["ema"]?.defaultNumber, 0)
        XCTAssertEqual(s["ema_decay"]?.defaultNumber, 0.99)
        XCTAssertEqual(s["ema_decay"]?.min, 0)
        XCTAssertEqual(s["ema_decay"]?.max, 1)
        XCTAssertEqual(s["ema_epsilon"]?.defaultNumber, 1e-5)
        XCTAssertTrue(lib.schema.allSatisfy { !$0.description.isEmpty })
        XCTAssertNotNil(lib.feature("vqmoe.metrics/1"))
        XCTAssertNil(lib.feature("vqmoe.no-such-feature/1"))
    }

    func testBuffersAndInit() throws {
        let lib = try openPlugin("QuantizerVQVAE")
        let K = 16, d = 32
        let core = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), seed: 5)
        XCTAssertEqual(core.buffers.map(\.name), ["codebook"])
        let cb = try XCTUnwrap(core.buffer("codebook"))
        XCTAssertTrue(cb.isParameter)
        XCTAssertEqual(cb.shape, [K, d])
        XCTAssertEqual(try QuantizerInstance(core).codebookSize, K)
        XCTAssertEqual(try QuantizerInstance(core).codesPerToken, 1)
        // N(0, 1) init: sample std of 512 draws within 10%.
        let vals = Array(UnsafeBufferPointer(start: cb.floats, count: K * d)).map(Double.init)
        let mean = vals.reduce(0, +) / Double(vals.count)
        let std = (vals.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(vals.count)).squareRoot()
        XCTAssertEqual(std, 1, accuracy: 0.1)
        XCTAssertEqual(mean, 0, accuracy: 0.15)
        let again = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), seed: 5)
        XCTAssertEqual(memcmp(cb.data, again.buffer("codebook")!.data, cb.byteCount), 0)
        let scaled = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), hyperparameters: ["init_scale": 0.5], seed: 5)
        for i in 0..<(K * d) { XCTAssertEqual(scaled.buffer("codebook")!.floats[i], 0.5 * cb.floats[i], accuracy: 1e-6) }

        // codebook_size overrides n_codes.
        let own = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), hyperparameters: ["codebook_size": 5])
        XCTAssertEqual(own.buffer("codebook")?.shape, [5, d])
        XCTAssertEqual(try QuantizerInstance(own).codebookSize, 5)

        // ema: the codebook is state, plus ema_count (K) = 1 and ema_sum (K,d) = codebook.
        let ema = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), hyperparameters: ["ema": true], seed: 5)
        XCTAssertEqual(ema.buffers.map(\.name), ["codebook", "ema_count", "ema_sum"])
        XCTAssertEqual(ema.buffers.map(\.shape), [[K, d], [K], [K, d]])
        XCTAssertTrue(ema.buffers.allSatisfy { !$0.isParameter })
        XCTAssertEqual(memcmp(ema.buffer("codebook")!.data, cb.data, cb.byteCount), 0)
        XCTAssertEqual(memcmp(ema.buffer("ema_sum")!.data, cb.data, cb.byteCount), 0)
        XCTAssertTrue((0..<K).allSatisfy { ema.buffer("ema_count")!.floats[$0] == 1 })
    }

    func testEmptyCodebookIsAnError() throws {
        let lib = try openPlugin("QuantizerVQVAE")
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 0))) { error in
            let msg = (error as? VQMoEError)?.message ?? "\(error)"
            XCTAssertTrue(msg.contains("codebook"), msg)
            XCTAssertTrue(msg.contains("INVALID_ARGUMENT") || msg.lowercased().contains("invalid"), msg)
        }
        XCTAssertNoThrow(try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 0), hyperparameters: ["codebook_size": 3]))
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 0, nCodes: 4))) { error in
            XCTAssertTrue("\(error)".contains("d_model"), "\(error)")
        }
        // ema_decay = 1 passes the schema's [0, 1] but is refused by the plugin ([0, 1)).
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 4), hyperparameters: ["ema": true, "ema_decay": 1.0])) { error in
            XCTAssertTrue("\(error)".contains("ema_decay"), "\(error)")
        }
    }

    // MARK: forward

    func testForwardMatchesReference() throws {
        for (commitment, n) in [(0.25, 37), (1.3, 5), (0.0, 64)] {
            let (q, cb) = try makeQuantizer(K: K, d: d, hp: ["commitment": commitment])
            let x = randomNormal(n * d, seed: 17, scale: 1.2)
            let out = try forward(q, x: x, n: n, step: train())
            let ref = reference(x: x, codebook: cb, n: n, K: K, d: d)
            XCTAssertEqual(out.codes.map(Int.init), ref.codes)
            for i in 0..<(n * d) { XCTAssertEqual(Double(out.quantized[i]), ref.q[i], accuracy: 1e-7) }
            XCTAssertEqual(out.counts.map(Double.init), ref.counts)
            XCTAssertEqual(Double(out.loss), (1 + commitment) * ref.mse, accuracy: 1e-5 * max(1, ref.mse))
            XCTAssertNotNil(out.ctx)
        }
    }

    func testLargerProblemMatchesReference() throws {
        // Enough tokens to split over the host's threads, and a wider codebook.
        let threads = HostRuntime.threads
        HostRuntime.configure(threads: 2)
        defer { HostRuntime.configure(threads: threads) }
        let n = 300, d = 24, K = 40
        let (q, cb) = try makeQuantizer(K: K, d: d, seed: 9)
        let x = randomNormal(n * d, seed: 10)
        let out = try forward(q, x: x, n: n, step: eval)
        let ref = reference(x: x, codebook: cb, n: n, K: K, d: d)
        XCTAssertEqual(out.codes.map(Int.init), ref.codes)
        XCTAssertEqual(out.counts.map(Double.init), ref.counts)
        XCTAssertEqual(Double(out.loss), 1.25 * ref.mse, accuracy: 1e-5 * ref.mse)
        XCTAssertNil(out.ctx)
    }

    func testTiesGoToLowestIndex() throws {
        // Codes 1, 3 and 4 are equal; x equal to them picks 1. An all-zero codebook picks 0.
        let d = 3, K = 5
        let (q, _) = try makeQuantizer(K: K, d: d, randomize: false)
        let cb: [Float] = [9, 9, 9, 0.3, -1.7, 2.9, -5, 5, -5, 0.3, -1.7, 2.9, 0.3, -1.7, 2.9]
        q.core.buffer("codebook")!.floats.update(from: cb, count: K * d)
        let out = try forward(q, x: [0.3, -1.7, 2.9, 0.31, -1.69, 2.9, -5, 5, -5.5], n: 3, step: train())
        XCTAssertEqual(out.codes, [1, 1, 2])
        XCTAssertEqual(out.counts, [0, 2, 1, 0, 0])
        q.core.buffer("codebook")!.floats.update(repeating: 0, count: K * d)
        XCTAssertEqual(try forward(q, x: [1, 2, 3], n: 1, step: train()).codes, [0])
    }

    func testSurrogateOutputsXWithUsualCodesAndLoss() throws {
        let n = 11
        let (q, cb) = try makeQuantizer(K: K, d: d)
        let x = randomNormal(n * d, seed: 2)
        let normal = try forward(q, x: x, n: n, step: train())
        let sur = try forward(q, x: x, n: n, step: train(surrogate: true))
        XCTAssertEqual(sur.quantized, x)
        XCTAssertEqual(sur.codes, normal.codes)
        XCTAssertEqual(sur.counts, normal.counts)
        XCTAssertEqual(sur.loss, normal.loss)
        XCTAssertEqual(normal.codes.map(Int.init), reference(x: x, codebook: cb, n: n, K: K, d: d).codes)
    }

    func testEvalAndNoGradSaveNoContext() throws {
        let (q, _) = try makeQuantizer(K: K, d: d)
        let x = randomNormal(4 * d, seed: 2)
        XCTAssertNil(try forward(q, x: x, n: 4, step: eval).ctx)
        XCTAssertNil(try forward(q, x: x, n: 4, step: train(noGrad: true)).ctx)
        XCTAssertNotNil(try forward(q, x: x, n: 4, step: train()).ctx)
    }

    func testNonFiniteInputIsANumericError() throws {
        let (q, _) = try makeQuantizer(K: K, d: d)
        var x = randomNormal(2 * d, seed: 2)
        x[3] = .infinity
        XCTAssertThrowsError(try forward(q, x: x, n: 2, step: train())) { error in
            XCTAssertEqual((error as? VQMoEError)?.category, .numeric, "\(error)")
        }
    }

    // MARK: backward

    func testBackwardMatchesHandGradients() throws {
        for (commitment, beta, withGradQ) in [(0.25, Float(0.08), true), (0.6, Float(1), false), (0.0, Float(0.5), true)] {
            let n = 13
            let (q, cb) = try makeQuantizer(K: K, d: d, hp: ["commitment": commitment], seed: 6)
            let x = randomNormal(n * d, seed: 7)
            let out = try forward(q, x: x, n: n, step: train())
            let ref = reference(x: x, codebook: cb, n: n, K: K, d: d)
            let gq = withGradQ ? randomNormal(n * d, seed: 8) : nil
            let cbGrad = q.core.buffer("codebook")!.grad!
            cbGrad.update(repeating: 0.5, count: K * d)          // accumulation: += onto 0.5
            var gx = [Float](repeating: -1, count: n * d)        // += onto -1
            try backward(q, try XCTUnwrap(out.ctx), n: n, gq: gq, gradLoss: beta, gradX: &gx)
            let M = Double(n * d)
            var wantCB = [Double](repeating: 0.5, count: K * d)
            for t in 0..<n {
                for i in 0..<d {
                    let xi = Double(x[t * d + i]), qi = ref.q[t * d + i]
                    // straight-through + commitment: d/dx [gamma * mse(x, sg(q))] = gamma * 2/M (x - q)
                    let want = -1 + (gq.map { Double($0[t * d + i]) } ?? 0) + Double(beta) * commitment * 2 / M * (xi - qi)
                    XCTAssertEqual(Double(gx[t * d + i]), want, accuracy: 1e-5, "grad_x[\(t),\(i)]")
                    // codebook: d/dq mse(sg(x), q) = 2/M (q - x), scattered to row c_t
                    wantCB[ref.codes[t] * d + i] += Double(beta) * 2 / M * (qi - xi)
                }
            }
            for i in 0..<(K * d) { XCTAssertEqual(Double(cbGrad[i]), wantCB[i], accuracy: 1e-5, "grad_codebook[\(i)]") }
        }
    }

    func testFrozenHasNoCodebookGradient() throws {
        let n = 6
        let (q, _) = try makeQuantizer(K: K, d: d)
        let x = randomNormal(n * d, seed: 7)
        let out = try forward(q, x: x, n: n, step: train(frozen: true))
        var gx = [Float](repeating: 0, count: n * d)
        try backward(q, try XCTUnwrap(out.ctx), n: n, gq: randomNormal(n * d, seed: 1), gradLoss: 1, gradX: &gx)
        XCTAssertTrue((0..<(K * d)).allSatisfy { q.core.buffer("codebook")!.grad![$0] == 0 })
        XCTAssertGreaterThan(gx.map { abs($0) }.max()!, 0)
    }

    // MARK: EMA

    func testEMAUpdate() throws {
        let n = 21, K = 4, d = 3, decay = 0.9, eps = 1e-3, commitment = 0.4
        let (q, cb0) = try makeQuantizer(K: K, d: d, hp: ["ema": true, "ema_decay": decay, "ema_epsilon": eps,
                                                          "commitment": commitment], seed: 3)
        let count = q.core.buffer("ema_count")!.floats, sum = q.core.buffer("ema_sum")!.floats
        let cb = q.core.buffer("codebook")!.floats
        XCTAssertNil(q.core.buffer("codebook")!.grad)
        var codebook = cb0.map(Double.init)
        var emaCount = [Double](repeating: 1, count: K), emaSum = codebook
        for step in 0..<3 {
            let x = randomNormal(n * d, seed: 40 + UInt64(step), scale: 1.5)
            let out = try forward(q, x: x, n: n, step: train(step))
            // Outputs use the pre-update codebook; the loss is the commitment term only.
            let ref = reference(x: x, codebook: codebook.map(Float.init), n: n, K: K, d: d)
            XCTAssertEqual(out.codes.map(Int.init), ref.codes)
            for i in 0..<(n * d) { XCTAssertEqual(Double(out.quantized[i]), ref.q[i], accuracy: 1e-5) }
            XCTAssertEqual(Double(out.loss), commitment * ref.mse, accuracy: 1e-5)
            // Reference EMA update.
            for j in 0..<K {
                emaCount[j] = decay * emaCount[j] + (1 - decay) * ref.counts[j]
                for i in 0..<d {
                    var s = 0.0
                    for t in 0..<n where ref.codes[t] == j { s += Double(x[t * d + i]) }
                    emaSum[j * d + i] = decay * emaSum[j * d + i] + (1 - decay) * s
                }
            }
            let total = emaCount.reduce(0, +)
            for j in 0..<K {
                let smoothed = (emaCount[j] + eps) / (total + Double(K) * eps) * total
                for i in 0..<d { codebook[j * d + i] = emaSum[j * d + i] / smoothed }
            }
            for j in 0..<K { XCTAssertEqual(Double(count[j]), emaCount[j], accuracy: 1e-5, "ema_count[\(j)] step \(step)") }
            for i in 0..<(K * d) {
                XCTAssertEqual(Double(sum[i]), emaSum[i], accuracy: 1e-5, "ema_sum[\(i)] step \(step)")
                XCTAssertEqual(Double(cb[i]), codebook[i], accuracy: 1e-4, "codebook[\(i)] step \(step)")
            }
            // Backward: straight-through + commitment only, no codebook gradient anywhere.
            var gx = [Float](repeating: 0, count: n * d)
            let gq = randomNormal(n * d, seed: 50)
            try backward(q, try XCTUnwrap(out.ctx), n: n, gq: gq, gradLoss: 2, gradX: &gx)
            for t in 0..<n {
                for i in 0..<d {
                    let want = Double(gq[t * d + i]) + 2 * commitment * 2 / Double(n * d) * (Double(x[t * d + i]) - ref.q[t * d + i])
                    XCTAssertEqual(Double(gx[t * d + i]), want, accuracy: 1e-5)
                }
            }
        }
        // Eval and frozen training forwards change no state.
        let snapshot = (Array(UnsafeBufferPointer(start: cb, count: K * d)), Array(UnsafeBufferPointer(start: count, count: K)),
                        Array(UnsafeBufferPointer(start: sum, count: K * d)))
        let x = randomNormal(n * d, seed: 60)
        _ = try forward(q, x: x, n: n, step: eval)
        _ = try forward(q, x: x, n: n, step: train(frozen: true))
        XCTAssertEqual(Array(UnsafeBufferPointer(start: cb, count: K * d)), snapshot.0)
        XCTAssertEqual(Array(UnsafeBufferPointer(start: count, count: K)), snapshot.1)
        XCTAssertEqual(Array(UnsafeBufferPointer(start: sum, count: K * d)), snapshot.2)
        // A no-grad training forward still updates (it is a training forward).
        _ = try forward(q, x: x, n: n, step: train(noGrad: true))
        XCTAssertNotEqual(Array(UnsafeBufferPointer(start: count, count: K)), snapshot.1)
    }

    // MARK: metrics

    func testMetrics() throws {
        let d = 2, K = 4
        let (q, _) = try makeQuantizer(K: K, d: d, randomize: false)
        XCTAssertEqual(try q.core.metrics(), [:])  // nothing before the first forward
        q.core.buffer("codebook")!.floats.update(from: [0, 0, 10, 10, -10, 10, 10, -10], count: K * d)
        // Codes 0, 0, 0, 1, 1, 3 -> counts 3, 2, 0, 1.
        let x: [Float] = [0, 0, 0.1, 0, 0, 0.2, 9, 9, 11, 10, 9, -9]
        let out = try forward(q, x: x, n: 6, step: train())
        XCTAssertEqual(out.codes, [0, 0, 0, 1, 1, 3])
        let m = try q.core.metrics()
        XCTAssertEqual(m["code_counts"], [3, 2, 0, 1])
        XCTAssertEqual(m["dead_codes"], [1])
        let p = [3.0, 2.0, 1.0].map { $0 / 6 }
        let ppl = exp(-p.map { $0 * log($0) }.reduce(0, +))
        XCTAssertEqual(try XCTUnwrap(m["usage_perplexity"]?.first), ppl, accuracy: 1e-9)
        // An eval forward after a training forward does not replace the training stats.
        _ = try forward(q, x: [0, 0], n: 1, step: eval)
        XCTAssertEqual(try q.core.metrics()["code_counts"], [3, 2, 0, 1])
        // Every code used equally: perplexity K, no dead codes.
        _ = try forward(q, x: [0, 0, 10, 10, -10, 10, 10, -10], n: 4, step: train(1))
        let m2 = try q.core.metrics()
        XCTAssertEqual(try XCTUnwrap(m2["usage_perplexity"]?.first), 4, accuracy: 1e-9)
        XCTAssertEqual(m2["dead_codes"], [0])
    }

    // MARK: the framework's gradcheck

    func testPluginChecker() throws {
        let lib = try openPlugin("QuantizerVQVAE")
        // EMA: every check applies (the loss gradient is the exact derivative of
        // commitment * mse(x, sg(q)) in x, the codebook is state).
        let emaResults = PluginChecker(library: lib, hyperparameters: ["ema": true]).run()
        XCTAssertTrue(emaResults.allSatisfy(\.passed), emaResults.filter { !$0.passed }.map(\.detail).joined(separator: "\n"))
        // Default (codebook loss): mse(sg(x), q) + gamma * mse(x, sg(q)) has stop-gradients, which
        // the plugin declares (VQMOE_PLUGIN_STOPGRAD_LOSS): the checker then compares directions,
        // and the backward is gamma/(1+gamma) of the value's slope in x, 1/(1+gamma) in the codebook.
        let results = PluginChecker(library: lib).run()
        XCTAssertTrue(results.allSatisfy(\.passed), results.filter { !$0.passed }.map(\.description).joined(separator: "\n"))
        let x = results.first { $0.name.hasPrefix("gradcheck x (direction") }
        XCTAssertTrue(x?.detail.contains("|analytic|/|numeric| 0.2000") == true, x?.detail ?? "missing")
        let codebook = results.first { $0.name.hasPrefix("gradcheck codebook (direction") }
        XCTAssertTrue(codebook?.detail.contains("|analytic|/|numeric| 0.8000") == true, codebook?.detail ?? "missing")
        XCTAssertTrue(results.contains { $0.name == "gradcheck x [straight-through]" && $0.passed })
    }
}
