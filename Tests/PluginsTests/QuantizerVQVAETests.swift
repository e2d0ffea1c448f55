import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `vqvae` quantizer plugin against a brute-force double-precision reference.
final class QuantizerVQVAETests: XCTestCase {
    let d = 6, K = 9

    /// A quantizer whose codebook (K,d) is overwritten with known random values.
    func makeQuantizer(
        K: Int, d: Int, hp: [String: Any] = [:], seed: UInt64 = 1,
        randomize: Bool = true
    ) throws -> (QuantizerInstance, [Float]) {
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
        XCTAssertEqual(
            lib.schema.map(\.name),
            [
                "codebook_size", "commitment", "init_scale", "ema", "ema_decay", "ema_epsilon",
                "kmeans_init", "kmeans_iters", "dead_code_threshold",
            ])
        let s = Dictionary(uniqueKeysWithValues: lib.schema.map { ($0.name, $0) })
        XCTAssertEqual(s["codebook_size"]?.type, .int)
        XCTAssertEqual(s["codebook_size"]?.defaultNumber, 0)
        XCTAssertEqual(s["codebook_size"]?.min, 0)
        XCTAssertEqual(s["commitment"]?.type, .float)
        XCTAssertEqual(s["commitment"]?.defaultNumber, 0.25)
        XCTAssertEqual(s["commitment"]?.min, 0)
        XCTAssertEqual(s["init_scale"]?.defaultNumber, 1.0)
        XCTAssertEqual(s["ema"]?.type, .bool)
        XCTAssertEqual(s["ema"]?.defaultNumber, 1)  // healthy defaults: EMA, k-means init, restarts
        XCTAssertEqual(s["ema_decay"]?.defaultNumber, 0.9)
        XCTAssertEqual(s["ema_decay"]?.min, 0)
        XCTAssertEqual(s["ema_decay"]?.max, 1)
        XCTAssertEqual(s["ema_epsilon"]?.defaultNumber, 1e-5)
        XCTAssertEqual(s["kmeans_init"]?.type, .bool)
        XCTAssertEqual(s["kmeans_init"]?.defaultNumber, 1)
        XCTAssertEqual(s["kmeans_iters"]?.type, .int)
        XCTAssertEqual(s["kmeans_iters"]?.defaultNumber, 10)
        XCTAssertEqual(s["kmeans_iters"]?.min, 1)
        XCTAssertEqual(s["kmeans_iters"]?.max, 100)
        XCTAssertEqual(s["dead_code_threshold"]?.type, .float)
        XCTAssertEqual(s["dead_code_threshold"]?.defaultNumber, 4)
        XCTAssertEqual(s["dead_code_threshold"]?.min, 0)
        XCTAssertTrue(s["dead_code_threshold"]!.description.contains("ema"))
        XCTAssertTrue(lib.summary.contains("k-means") && lib.summary.contains("dead-code"), lib.summary)
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
        let scaled = try makeInstance(
            lib, dims: ModelDims(dModel: d, nCodes: K), hyperparameters: ["init_scale": 0.5], seed: 5)
        for i in 0..<(K * d) {
            XCTAssertEqual(scaled.buffer("codebook")!.floats[i], 0.5 * cb.floats[i], accuracy: 1e-6)
        }

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
        XCTAssertNoThrow(
            try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 0), hyperparameters: ["codebook_size": 3]))
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 0, nCodes: 4))) { error in
            XCTAssertTrue("\(error)".contains("d_model"), "\(error)")
        }
        // ema_decay = 1 passes the schema's [0, 1] but is refused by the plugin ([0, 1)).
        XCTAssertThrowsError(
            try makeInstance(
                lib, dims: ModelDims(dModel: 4, nCodes: 4), hyperparameters: ["ema": true, "ema_decay": 1.0])
        ) { error in
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
        for (commitment, beta, withGradQ) in [
            (0.25, Float(0.08), true), (0.6, Float(1), false), (0.0, Float(0.5), true),
        ] {
            let n = 13
            let (q, cb) = try makeQuantizer(K: K, d: d, hp: ["commitment": commitment], seed: 6)
            let x = randomNormal(n * d, seed: 7)
            let out = try forward(q, x: x, n: n, step: train())
            let ref = reference(x: x, codebook: cb, n: n, K: K, d: d)
            let gq = withGradQ ? randomNormal(n * d, seed: 8) : nil
            let cbGrad = q.core.buffer("codebook")!.grad!
            cbGrad.update(repeating: 0.5, count: K * d)  // accumulation: += onto 0.5
            var gx = [Float](repeating: -1, count: n * d)  // += onto -1
            try backward(q, try XCTUnwrap(out.ctx), n: n, gq: gq, gradLoss: beta, gradX: &gx)
            let M = Double(n * d)
            var wantCB = [Double](repeating: 0.5, count: K * d)
            for t in 0..<n {
                for i in 0..<d {
                    let xi = Double(x[t * d + i]), qi = ref.q[t * d + i]
                    // straight-through + commitment: d/dx [gamma * mse(x, sg(q))] = gamma * 2/M (x - q)
                    let want =
                        -1 + (gq.map { Double($0[t * d + i]) } ?? 0) + Double(beta) * commitment * 2 / M * (xi - qi)
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
        let (q, cb0) = try makeQuantizer(
            K: K, d: d,
            hp: [
                "ema": true, "ema_decay": decay, "ema_epsilon": eps,
                "commitment": commitment,
            ], seed: 3)
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
            for j in 0..<K {
                XCTAssertEqual(Double(count[j]), emaCount[j], accuracy: 1e-5, "ema_count[\(j)] step \(step)")
            }
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
                    let want =
                        Double(gq[t * d + i]) + 2 * commitment * 2 / Double(n * d)
                        * (Double(x[t * d + i]) - ref.q[t * d + i])
                    XCTAssertEqual(Double(gx[t * d + i]), want, accuracy: 1e-5)
                }
            }
        }
        // Eval and frozen training forwards change no state.
        let snapshot = (
            Array(UnsafeBufferPointer(start: cb, count: K * d)), Array(UnsafeBufferPointer(start: count, count: K)),
            Array(UnsafeBufferPointer(start: sum, count: K * d))
        )
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

    // MARK: k-means initialisation

    /// The plugin's host streams (KMeans.swift, EMA.swift).
    static let kmeansStream: UInt64 = 0x6B6D_6561_6E73, deadCodeStream: UInt64 = 0x6465_6164_636F_6465

    /// Brute-force Lloyd in double. Initial centres: `start` (K,d) with rows j < min(K, N)
    /// replaced by the partial Fisher-Yates pick of the stream (seed, kmeansStream); then
    /// `iters` times: assign to the nearest centre (ties -> lowest), move each non-empty
    /// cluster's centre to its mean. Returns the centres and the initial rows.
    func lloydReference(
        x: [Float], n: Int, d: Int, K: Int, start: [Float], seed: UInt64,
        iters: Int
    ) -> (centres: [Double], rows: [Int]) {
        var c = start.map(Double.init)
        var r = HostRNG.make(seed: seed, stream: Self.kmeansStream)
        var rows = Array(0..<n)
        for j in 0..<min(K, n) {
            let p = j + Int(HostRNG.next(&r) % UInt64(n - j))
            rows.swapAt(j, p)
            for i in 0..<d { c[j * d + i] = Double(x[rows[j] * d + i]) }
        }
        let initialRows = Array(rows.prefix(min(K, n)))
        for _ in 0..<iters {
            var sums = [Double](repeating: 0, count: K * d), counts = [Double](repeating: 0, count: K)
            for t in 0..<n {
                var best = 0, bestDist = Double.infinity
                for j in 0..<K {
                    var s = 0.0
                    for i in 0..<d { let diff = Double(x[t * d + i]) - c[j * d + i]; s += diff * diff }
                    if s < bestDist { bestDist = s; best = j }
                }
                counts[best] += 1
                for i in 0..<d { sums[best * d + i] += Double(x[t * d + i]) }
            }
            for j in 0..<K where counts[j] > 0 { for i in 0..<d { c[j * d + i] = sums[j * d + i] / counts[j] } }
        }
        return (c, initialRows)
    }

    func testKMeansBuffersAndErrors() throws {
        let lib = try openPlugin("QuantizerVQVAE")
        let core = try makeInstance(lib, dims: ModelDims(dModel: 3, nCodes: 4), hyperparameters: ["kmeans_init": true])
        XCTAssertEqual(core.buffers.map(\.name), ["codebook", "initialized"])
        let flag = try XCTUnwrap(core.buffer("initialized"))
        XCTAssertFalse(flag.isParameter)
        XCTAssertEqual(flag.shape, [1])
        XCTAssertEqual(flag.dtype.code, UInt8(VQMOE_DTYPE_INT))
        XCTAssertEqual(flag.dtype.bits, 32)
        XCTAssertEqual(flag.data.load(as: Int32.self), 0)
        XCTAssertTrue(core.buffer("codebook")!.isParameter)
        let ema = try makeInstance(
            lib, dims: ModelDims(dModel: 3, nCodes: 4), hyperparameters: ["kmeans_init": true, "ema": true])
        XCTAssertEqual(ema.buffers.map(\.name), ["codebook", "ema_count", "ema_sum", "initialized"])
        // Off by default: no extra buffer (checkpoints of existing configurations are unchanged).
        XCTAssertEqual(
            try makeInstance(
                lib, dims: ModelDims(dModel: 3, nCodes: 4),
                hyperparameters: [
                    "ema": true,
                    "dead_code_threshold": 0.5,
                ]
            ).buffers.map(\.name), ["codebook", "ema_count", "ema_sum"])

        // dead_code_threshold needs ema: refused by the plugin with the reason.
        XCTAssertThrowsError(
            try makeInstance(lib, dims: ModelDims(dModel: 3, nCodes: 4), hyperparameters: ["dead_code_threshold": 0.5])
        ) { error in
            let msg = "\(error)"
            XCTAssertTrue(msg.contains("dead_code_threshold") && msg.contains("ema = true"), msg)
        }
        // Out-of-range values are refused by the schema, naming the key.
        for hp: [String: Any] in [["kmeans_iters": 0], ["kmeans_iters": 101], ["dead_code_threshold": -0.1]] {
            XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 3, nCodes: 4), hyperparameters: hp)) {
                error in
                XCTAssertTrue("\(error)".contains(hp.keys.first!), "\(error)")
            }
        }
    }

    func testKMeansInitMatchesLloydReference() throws {
        let n = 60, d = 2, K = 5
        // Five loose blobs: Lloyd needs several iterations from random rows.
        var x = randomNormal(n * d, seed: 31, scale: 0.9)
        for t in 0..<n { x[t * d] += Float(t % 5) * 1.5; x[t * d + 1] += Float((t * 3) % 5) * 0.7 }
        let once = lloydReference(x: x, n: n, d: d, K: K, start: [Float](repeating: 0, count: K * d), seed: 3, iters: 1)
            .centres
        let ten = lloydReference(x: x, n: n, d: d, K: K, start: [Float](repeating: 0, count: K * d), seed: 3, iters: 10)
            .centres
        XCTAssertGreaterThan(
            zip(once, ten).map { abs($0 - $1) }.max()!, 1e-3, "test data: 1 and 10 iterations should differ")
        for (iters, ema) in [(1, false), (2, false), (10, false), (10, true)] {
            let (q, cb0) = try makeQuantizer(
                K: K, d: d,
                hp: [
                    "kmeans_init": true, "kmeans_iters": iters, "ema": ema,
                    "ema_decay": 0.9, "commitment": 0.3,
                ], seed: 4)
            let ref = lloydReference(x: x, n: n, d: d, K: K, start: cb0, seed: 3, iters: iters)
            XCTAssertEqual(Set(ref.rows).count, K)  // K distinct rows
            let out = try forward(q, x: x, n: n, step: train())
            XCTAssertEqual(q.core.buffer("initialized")!.data.load(as: Int32.self), 1)
            // The forward quantizes with the k-means codebook.
            let centres = ref.centres.map(Float.init)
            let want = reference(x: x, codebook: centres, n: n, K: K, d: d)
            XCTAssertEqual(out.codes.map(Int.init), want.codes, "iters \(iters)")
            for i in 0..<(n * d) { XCTAssertEqual(Double(out.quantized[i]), want.q[i], accuracy: 1e-5) }
            XCTAssertEqual(Double(out.loss), (ema ? 0.3 : 1.3) * want.mse, accuracy: 1e-5)
            let cb = q.core.buffer("codebook")!.floats
            if !ema {
                for i in 0..<(K * d) {
                    XCTAssertEqual(Double(cb[i]), ref.centres[i], accuracy: 1e-5, "iters \(iters) codebook[\(i)]")
                }
            } else {
                // ema: ema_sum = centre, ema_count = 1, then this forward's EMA update.
                let count = q.core.buffer("ema_count")!.floats, sum = q.core.buffer("ema_sum")!.floats
                var newCount = [Double](repeating: 0, count: K)
                for j in 0..<K {
                    newCount[j] = 0.9 + 0.1 * want.counts[j]
                    XCTAssertEqual(Double(count[j]), newCount[j], accuracy: 1e-5)
                }
                let total = newCount.reduce(0, +), eps = 1e-5
                for j in 0..<K {
                    for i in 0..<d {
                        var s = 0.0
                        for t in 0..<n where want.codes[t] == j { s += Double(x[t * d + i]) }
                        let m = 0.9 * ref.centres[j * d + i] + 0.1 * s
                        XCTAssertEqual(Double(sum[j * d + i]), m, accuracy: 1e-5)
                        XCTAssertEqual(
                            Double(cb[j * d + i]), m / ((newCount[j] + eps) / (total + Double(K) * eps) * total),
                            accuracy: 1e-4)
                    }
                }
            }
        }
    }

    func testKMeansWithFewerRowsThanCodes() throws {
        // N = 3 < K = 5: codes 0..2 start from the three rows (in the shuffled order), codes 3
        // and 4 from their current values; all take part in Lloyd's iterations.
        let n = 3, d = 2, K = 5
        let (q, cb0) = try makeQuantizer(K: K, d: d, hp: ["kmeans_init": true], seed: 8)
        let x = randomNormal(n * d, seed: 12, scale: 2)
        _ = try forward(q, x: x, n: n, step: train())
        let ref = lloydReference(x: x, n: n, d: d, K: K, start: cb0, seed: 3, iters: 10)
        XCTAssertEqual(ref.rows.sorted(), [0, 1, 2])
        let cb = q.core.buffer("codebook")!.floats
        for i in 0..<(K * d) { XCTAssertEqual(Double(cb[i]), ref.centres[i], accuracy: 1e-5, "codebook[\(i)]") }
    }

    func testKMeansRunsOnceAndOnlyInTraining() throws {
        let n = 24, d = 3, K = 4
        let (q, cb0) = try makeQuantizer(K: K, d: d, hp: ["kmeans_init": true, "kmeans_iters": 5], seed: 2)
        let cb = q.core.buffer("codebook")!.floats, flag = q.core.buffer("initialized")!.data
        func codebook() -> [Float] { Array(UnsafeBufferPointer(start: cb, count: K * d)) }
        let x = randomNormal(n * d, seed: 70)
        // Eval and frozen training forwards do not initialise.
        let evalOut = try forward(q, x: x, n: n, step: eval)
        XCTAssertEqual(evalOut.codes.map(Int.init), reference(x: x, codebook: cb0, n: n, K: K, d: d).codes)
        _ = try forward(q, x: x, n: n, step: train(frozen: true))
        XCTAssertEqual(codebook(), cb0)
        XCTAssertEqual(flag.load(as: Int32.self), 0)
        // The first training forward does; its backward gives grad_x but no codebook gradient
        // (the codebook came from the batch).
        let first = try forward(q, x: x, n: n, step: train())
        XCTAssertEqual(flag.load(as: Int32.self), 1)
        let centres = codebook()
        let ref = lloydReference(x: x, n: n, d: d, K: K, start: cb0, seed: 3, iters: 5).centres
        for i in 0..<(K * d) { XCTAssertEqual(Double(centres[i]), ref[i], accuracy: 1e-5) }
        var gx = [Float](repeating: 0, count: n * d)
        let gq = randomNormal(n * d, seed: 71)
        try backward(q, try XCTUnwrap(first.ctx), n: n, gq: gq, gradLoss: 1, gradX: &gx)
        XCTAssertTrue((0..<(K * d)).allSatisfy { q.core.buffer("codebook")!.grad![$0] == 0 })
        let wantQ = reference(x: x, codebook: centres, n: n, K: K, d: d)
        for i in 0..<(n * d) {
            XCTAssertEqual(
                Double(gx[i]), Double(gq[i]) + 0.25 * 2 / Double(n * d) * (Double(x[i]) - wantQ.q[i]), accuracy: 1e-5)
        }
        // Later training forwards (another batch, another seed) leave the codebook alone and
        // give the usual codebook gradient.
        let x2 = randomNormal(n * d, seed: 72)
        let second = try forward(q, x: x2, n: n, step: StepInfo(step: 1, totalSteps: 10, train: true, seed: 99))
        XCTAssertEqual(codebook(), centres)
        gx = [Float](repeating: 0, count: n * d)
        try backward(q, try XCTUnwrap(second.ctx), n: n, gq: nil, gradLoss: 1, gradX: &gx)
        XCTAssertGreaterThan((0..<(K * d)).map { abs(q.core.buffer("codebook")!.grad![$0]) }.max()!, 0)
        // Restoring a checkpoint taken before the initialisation (initialized = 0) runs it again,
        // reproducing the same centres from the same batch and seed.
        cb.update(from: cb0, count: K * d)
        flag.storeBytes(of: 0, as: Int32.self)
        _ = try forward(q, x: x, n: n, step: train(noGrad: true))  // a no-grad training forward is a training forward
        XCTAssertEqual(codebook(), centres)
        XCTAssertEqual(flag.load(as: Int32.self), 1)
        // Re-initialising the instance clears the flag.
        try q.core.initBuffers(seed: 1)
        XCTAssertEqual(flag.load(as: Int32.self), 0)
    }

    // MARK: dead-code restart

    func testDeadCodeRestart() throws {
        let n = 16, d = 3, K = 6, decay = 0.9, threshold = 0.5
        let (q, cb0) = try makeQuantizer(
            K: K, d: d, hp: ["ema": true, "ema_decay": decay, "dead_code_threshold": threshold], seed: 5)
        let count = q.core.buffer("ema_count")!.floats, sum = q.core.buffer("ema_sum")!.floats
        let cb = q.core.buffer("codebook")!.floats
        // Known EMA counts: after the update N_j = 0.9 * c_j + 0.1 * n_j.
        let start: [Float] = [1.0, 0.2, 3.0, 0.1, 0.5, 2.0]
        count.update(from: start, count: K)
        let x = randomNormal(n * d, seed: 80, scale: 1.3)
        let ref = reference(x: x, codebook: cb0, n: n, K: K, d: d)
        let out = try forward(q, x: x, n: n, step: train())
        XCTAssertEqual(out.codes.map(Int.init), ref.codes)
        // Reference EMA update (Laplace smoothing as in testEMAUpdate).
        var emaCount = [Double](repeating: 0, count: K), emaSum = [Double](repeating: 0, count: K * d)
        var codebook = [Double](repeating: 0, count: K * d)
        for j in 0..<K {
            emaCount[j] = decay * Double(start[j]) + (1 - decay) * ref.counts[j]
            for i in 0..<d {
                var s = 0.0
                for t in 0..<n where ref.codes[t] == j { s += Double(x[t * d + i]) }
                emaSum[j * d + i] = decay * Double(cb0[j * d + i]) + (1 - decay) * s
            }
        }
        let total = emaCount.reduce(0, +)
        for j in 0..<K {
            let smoothed = (emaCount[j] + 1e-5) / (total + Double(K) * 1e-5) * total
            for i in 0..<d { codebook[j * d + i] = emaSum[j * d + i] / smoothed }
        }
        // Then the codes below the threshold, in order, take rows drawn from the step seed's stream.
        let dead = (0..<K).filter { emaCount[$0] < threshold }
        XCTAssertFalse(dead.isEmpty)
        XCTAssertLessThan(dead.count, K)
        XCTAssertTrue((0..<K).allSatisfy { abs(emaCount[$0] - threshold) > 0.01 })  // no borderline code
        var r = HostRNG.make(seed: 3, stream: Self.deadCodeStream)
        for j in dead {
            let t = Int(HostRNG.next(&r) % UInt64(n))
            emaCount[j] = 1
            for i in 0..<d { emaSum[j * d + i] = Double(x[t * d + i]); codebook[j * d + i] = Double(x[t * d + i]) }
        }
        for j in 0..<K {
            XCTAssertEqual(Double(count[j]), emaCount[j], accuracy: 1e-6, "ema_count[\(j)]")
            for i in 0..<d {
                XCTAssertEqual(Double(sum[j * d + i]), emaSum[j * d + i], accuracy: 1e-5, "ema_sum[\(j)][\(i)]")
                XCTAssertEqual(Double(cb[j * d + i]), codebook[j * d + i], accuracy: 1e-4, "codebook[\(j)][\(i)]")
            }
        }
        // The replaced rows are exactly batch rows.
        for j in dead {
            XCTAssertTrue((0..<n).contains { t in (0..<d).allSatisfy { cb[j * d + $0] == x[t * d + $0] } })
        }
        XCTAssertEqual(try q.core.metrics()["restarted_codes"], [Double(dead.count)])

        // Eval and frozen forwards restart nothing, even with counts below the threshold.
        count.update(repeating: 0.1, count: K)
        let snapshot = Array(UnsafeBufferPointer(start: cb, count: K * d))
        _ = try forward(q, x: x, n: n, step: eval)
        _ = try forward(q, x: x, n: n, step: train(frozen: true))
        XCTAssertEqual(Array(UnsafeBufferPointer(start: cb, count: K * d)), snapshot)
        XCTAssertTrue((0..<K).allSatisfy { count[$0] == 0.1 })
        // With every count far above the threshold nothing is replaced.
        count.update(repeating: 50, count: K)
        _ = try forward(q, x: x, n: n, step: train(1))
        XCTAssertEqual(try q.core.metrics()["restarted_codes"], [0])
        XCTAssertTrue((0..<K).allSatisfy { count[$0] > 40 })
    }

    // MARK: the framework's gradcheck

    func testPluginChecker() throws {
        let lib = try openPlugin("QuantizerVQVAE")
        // EMA: every check applies (the loss gradient is the exact derivative of
        // commitment * mse(x, sg(q)) in x, the codebook is state).
        let emaResults = PluginChecker(library: lib, hyperparameters: plainVQVAE.merging(["ema": true]) { $1 }).run()
        XCTAssertTrue(
            emaResults.allSatisfy(\.passed), emaResults.filter { !$0.passed }.map(\.detail).joined(separator: "\n"))
        // The defaults (EMA, k-means init, dead-code restart) pass every check.
        let defaults = PluginChecker(library: lib).run()
        XCTAssertTrue(
            defaults.allSatisfy(\.passed), defaults.filter { !$0.passed }.map(\.description).joined(separator: "\n"))
        // Plain VQ-VAE (codebook loss): mse(sg(x), q) + gamma * mse(x, sg(q)) has stop-gradients, which
        // the plugin declares (VQMOE_PLUGIN_STOPGRAD_LOSS): the checker then compares directions,
        // and the backward is gamma/(1+gamma) of the value's slope in x, 1/(1+gamma) in the codebook.
        let results = PluginChecker(library: lib, hyperparameters: plainVQVAE).run()
        XCTAssertTrue(
            results.allSatisfy(\.passed), results.filter { !$0.passed }.map(\.description).joined(separator: "\n"))
        let x = results.first { $0.name.hasPrefix("gradcheck x (direction") }
        XCTAssertTrue(x?.detail.contains("|analytic|/|numeric| 0.2000") == true, x?.detail ?? "missing")
        let codebook = results.first { $0.name.hasPrefix("gradcheck codebook (direction") }
        XCTAssertTrue(codebook?.detail.contains("|analytic|/|numeric| 0.8000") == true, codebook?.detail ?? "missing")
        XCTAssertTrue(results.contains { $0.name == "gradcheck x [straight-through]" && $0.passed })

        // k-means init (the checker restores the state "initialized" = 0 before every evaluation,
        // so each one re-runs k-means on its batch: the loss's slope in x is that of the converged
        // k-means reconstruction, 2 (x - q) by the envelope theorem, and the codebook parameter
        // has no effect -- and gets no gradient -- in the initialising forward).
        for hp: [String: Any] in [
            ["kmeans_init": true], ["kmeans_init": true, "kmeans_iters": 3, "commitment": 0.6],
            ["kmeans_init": true, "ema": true],
            ["ema": true, "dead_code_threshold": 0.5],
            ["ema": true, "dead_code_threshold": 0.5, "kmeans_init": true],
        ] {
            let r = PluginChecker(library: lib, hyperparameters: plainVQVAE.merging(hp) { $1 }).run()
            XCTAssertTrue(
                r.allSatisfy(\.passed), "\(hp): " + r.filter { !$0.passed }.map(\.description).joined(separator: "\n"))
            XCTAssertGreaterThanOrEqual(r.count, 10)
        }
    }
}
