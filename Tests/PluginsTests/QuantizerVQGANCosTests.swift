import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `vqgan_cos` quantizer plugin against a brute-force double-precision reference.
final class QuantizerVQGANCosTests: XCTestCase {
    static let bufferNames = ["proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias", "codebook"]

    /// A quantizer whose parameters are overwritten with known random values (biases too).
    func makeQuantizer(
        d: Int, K: Int, hp: [String: Any] = [:], seed: UInt64 = 1,
        randomize: Bool = true
    ) throws -> QuantizerInstance {
        let lib = try openPlugin("QuantizerVQGANCos")
        let core = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), hyperparameters: hp, seed: seed)
        if randomize {
            for (i, name) in Self.bufferNames.enumerated() {
                let b = try XCTUnwrap(core.buffer(name))
                b.floats.update(from: randomNormal(b.count, seed: seed &+ 100 &+ UInt64(i), scale: 0.7), count: b.count)
            }
        }
        return try QuantizerInstance(core)
    }

    /// The parameters as doubles, by buffer name.
    func parameters(_ q: QuantizerInstance) -> [String: [Double]] {
        var out: [String: [Double]] = [:]
        for b in q.core.parameters {
            out[b.name] = Array(UnsafeBufferPointer(start: b.floats, count: b.count)).map(Double.init)
        }
        return out
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

    func train(_ step: Int = 0, frozen: Bool = false, surrogate: Bool = false, noGrad: Bool = false) -> StepInfo {
        StepInfo(step: step, totalSteps: 10, train: true, noGrad: noGrad, frozen: frozen, surrogate: surrogate, seed: 3)
    }

    var eval: StepInfo { StepInfo(step: 0, totalSteps: 10, train: false, seed: 3) }

    // MARK: the brute-force reference

    /// Everything the reference computes, in double.
    struct Reference {
        var codes: [Int]
        var zHat: [Double], zNorm: [Double]  // (N,d_c), (N)
        var eHat: [Double], eNorm: [Double]  // (K,d_c), (K)
        var quantized: [Double], surrogate: [Double]  // (N,d) W_out ê_c + b_out, W_out ẑ + b_out
        var counts: [Double]
        var loss: Double
    }

    func normalize(_ v: ArraySlice<Double>) -> ([Double], Double) {
        let norm = v.map { $0 * $0 }.reduce(0, +).squareRoot()
        return (v.map { $0 / max(norm, 1e-12) }, norm)
    }

    func reference(x: [Float], p: [String: [Double]], n: Int, d: Int, dc: Int, K: Int, commitment: Double) -> Reference
    {
        let wIn = p["proj_in.weight"]!, bIn = p["proj_in.bias"]!, wOut = p["proj_out.weight"]!,
            bOut = p["proj_out.bias"]!
        let e = p["codebook"]!
        var r = Reference(
            codes: [], zHat: [], zNorm: [], eHat: [], eNorm: [], quantized: [], surrogate: [],
            counts: [Double](repeating: 0, count: K), loss: 0)
        for j in 0..<K { let (h, nrm) = normalize(e[(j * dc)..<((j + 1) * dc)]); r.eHat += h; r.eNorm.append(nrm) }
        var sse = 0.0
        for t in 0..<n {
            var z = [Double](repeating: 0, count: dc)
            for i in 0..<dc {
                z[i] = bIn[i]
                for k in 0..<d { z[i] += wIn[i * d + k] * Double(x[t * d + k]) }
            }
            let (zh, nz) = normalize(z[...])
            r.zHat += zh; r.zNorm.append(nz)
            var best = 0, bestDot = -Double.infinity
            for j in 0..<K {
                var s = 0.0
                for i in 0..<dc { s += zh[i] * r.eHat[j * dc + i] }
                if s > bestDot { bestDot = s; best = j }
            }
            r.codes.append(best)
            r.counts[best] += 1
            for i in 0..<dc { let diff = zh[i] - r.eHat[best * dc + i]; sse += diff * diff }
            for o in 0..<d {
                var qv = bOut[o], sv = bOut[o]
                for i in 0..<dc { qv += wOut[o * dc + i] * r.eHat[best * dc + i]; sv += wOut[o * dc + i] * zh[i] }
                r.quantized.append(qv); r.surrogate.append(sv)
            }
        }
        r.loss = n > 0 ? (1 + commitment) * sse / Double(n * dc) : 0
        return r
    }

    /// (I − v̂v̂ᵀ) g / ‖v‖: the Jacobian of v/‖v‖ applied to g.
    func normalizeBackward(_ vHat: ArraySlice<Double>, _ norm: Double, _ g: [Double]) -> [Double] {
        let dot = zip(vHat, g).map { $0 * $1 }.reduce(0, +)
        return zip(vHat, g).map { ($1 - $0 * dot) / norm }
    }

    /// Reference gradients of the straight-through estimator (G = grad_quantized) and of the
    /// stop-gradient loss (weight g), by buffer name plus "x".
    func referenceGradients(
        x: [Float], p: [String: [Double]], ref: Reference, gq: [Float]?, g: Double, n: Int, d: Int,
        dc: Int, K: Int, commitment: Double
    ) -> [String: [Double]] {
        let wIn = p["proj_in.weight"]!, wOut = p["proj_out.weight"]!
        var out: [String: [Double]] = [
            "x": [Double](repeating: 0, count: n * d),
            "proj_in.weight": [Double](repeating: 0, count: dc * d),
            "proj_in.bias": [Double](repeating: 0, count: dc),
            "proj_out.weight": [Double](repeating: 0, count: d * dc),
            "proj_out.bias": [Double](repeating: 0, count: d),
            "codebook": [Double](repeating: 0, count: K * dc),
        ]
        let M = Double(n * dc)
        var geHat = [Double](repeating: 0, count: K * dc)
        for t in 0..<n {
            let c = ref.codes[t]
            let zh = ref.zHat[(t * dc)..<((t + 1) * dc)], ec = ref.eHat[(c * dc)..<((c + 1) * dc)]
            var gzh = [Double](repeating: 0, count: dc)
            if let gq {
                for o in 0..<d {
                    let G = Double(gq[t * d + o])
                    out["proj_out.bias"]![o] += G
                    for i in 0..<dc {
                        gzh[i] += wOut[o * dc + i] * G  // identity through the STE
                        out["proj_out.weight"]![o * dc + i] += G * ec[ec.startIndex + i]  // value of z_q = ê_c
                    }
                }
            }
            for i in 0..<dc {
                gzh[i] += g * commitment * 2 / M * (zh[zh.startIndex + i] - ec[ec.startIndex + i])
                geHat[c * dc + i] += g * 2 / M * (ec[ec.startIndex + i] - zh[zh.startIndex + i])
            }
            let gz = normalizeBackward(zh, ref.zNorm[t], gzh)
            for i in 0..<dc {
                out["proj_in.bias"]![i] += gz[i]
                for k in 0..<d {
                    out["proj_in.weight"]![i * d + k] += gz[i] * Double(x[t * d + k])
                    out["x"]![t * d + k] += gz[i] * wIn[i * d + k]
                }
            }
        }
        for j in 0..<K {
            let ge = normalizeBackward(
                ref.eHat[(j * dc)..<((j + 1) * dc)], ref.eNorm[j], Array(geHat[(j * dc)..<((j + 1) * dc)]))
            for i in 0..<dc { out["codebook"]![j * dc + i] = ge[i] }
        }
        return out
    }

    // MARK: descriptor, schema, buffers

    func testDescriptorAndSchema() throws {
        let lib = try openPlugin("QuantizerVQGANCos")
        XCTAssertEqual(lib.name, "vqgan_cos")
        XCTAssertEqual(lib.version, "1.0.0")
        XCTAssertEqual(lib.kind, .quantizer)
        XCTAssertTrue(lib.hasStopGradientLoss)
        XCTAssertFalse(lib.hasNoGrad)
        XCTAssertEqual(
            lib.schema.map(\.name),
            [
                "codebook_size", "code_dim", "commitment", "ema", "ema_decay", "ema_epsilon", "kmeans_init",
                "kmeans_iters",
                "dead_code_threshold",
            ])
        XCTAssertEqual(lib.schema.first { $0.name == "ema" }?.defaultNumber, 1)  // healthy defaults
        XCTAssertEqual(lib.schema.first { $0.name == "kmeans_init" }?.defaultNumber, 1)
        XCTAssertEqual(lib.schema.first { $0.name == "dead_code_threshold" }?.defaultNumber, 16)
        let s = Dictionary(uniqueKeysWithValues: lib.schema.map { ($0.name, $0) })
        XCTAssertEqual(s["codebook_size"]?.type, .int)
        XCTAssertEqual(s["codebook_size"]?.defaultNumber, 0)
        XCTAssertEqual(s["codebook_size"]?.min, 0)
        XCTAssertEqual(s["code_dim"]?.type, .int)
        XCTAssertEqual(s["code_dim"]?.defaultNumber, 16)
        XCTAssertEqual(s["code_dim"]?.min, 1)
        XCTAssertEqual(s["code_dim"]?.max, 1024)
        XCTAssertEqual(s["commitment"]?.type, .float)
        XCTAssertEqual(s["commitment"]?.defaultNumber, 0.25)
        XCTAssertEqual(s["commitment"]?.min, 0)
        XCTAssertTrue(lib.schema.allSatisfy { !$0.description.isEmpty })
        XCTAssertNotNil(lib.feature("vqmoe.metrics/1"))
        XCTAssertNil(lib.feature("vqmoe.no-such-feature/1"))
    }

    func testBuffersAndInit() throws {
        let lib = try openPlugin("QuantizerVQGANCos")
        let K = 16, d = 64, dc = 16
        let core = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), seed: 5)
        XCTAssertEqual(core.buffers.map(\.name), Self.bufferNames)
        XCTAssertEqual(core.buffers.map(\.shape), [[dc, d], [dc], [d, dc], [d], [K, dc]])
        XCTAssertTrue(core.buffers.allSatisfy { $0.isParameter && $0.grad != nil })
        XCTAssertTrue(core.buffers.allSatisfy { $0.flags & VQMOE_BUF_FREEZE_FT != 0 })
        XCTAssertEqual(core.buffers.map { $0.flags & VQMOE_BUF_NO_DECAY != 0 }, [false, true, false, true, true])
        let q = try QuantizerInstance(core)
        XCTAssertEqual(q.codebookSize, K)
        XCTAssertEqual(q.codesPerToken, 1)
        // proj_in ~ N(0, 1/d), proj_out ~ N(0, 1/d_c), codebook ~ N(0, 1), biases 0.
        func stats(_ name: String) -> (mean: Double, std: Double) {
            let b = core.buffer(name)!
            let v = Array(UnsafeBufferPointer(start: b.floats, count: b.count)).map(Double.init)
            let mean = v.reduce(0, +) / Double(v.count)
            return (mean, (v.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(v.count)).squareRoot())
        }
        XCTAssertEqual(stats("proj_in.weight").std, 1 / 8, accuracy: 0.1 / 8)
        XCTAssertEqual(stats("proj_out.weight").std, 1 / 4, accuracy: 0.1 / 4)
        XCTAssertEqual(stats("codebook").std, 1, accuracy: 0.12)
        XCTAssertEqual(stats("codebook").mean, 0, accuracy: 0.15)
        for name in ["proj_in.bias", "proj_out.bias"] {
            let b = core.buffer(name)!
            XCTAssertTrue((0..<b.count).allSatisfy { b.floats[$0] == 0 }, name)
        }
        // Same seed, same buffers; another seed, other buffers.
        let again = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), seed: 5)
        let other = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), seed: 6)
        for (a, b) in zip(core.buffers, again.buffers) {
            XCTAssertEqual(memcmp(a.data, b.data, a.byteCount), 0, a.name)
        }
        XCTAssertNotEqual(
            memcmp(core.buffer("codebook")!.data, other.buffer("codebook")!.data, core.buffer("codebook")!.byteCount), 0
        )

        // codebook_size overrides n_codes; code_dim sets the code space.
        let own = try makeInstance(
            lib, dims: ModelDims(dModel: 10, nCodes: K), hyperparameters: ["codebook_size": 5, "code_dim": 3])
        XCTAssertEqual(own.buffers.map(\.shape), [[3, 10], [3], [10, 3], [10], [5, 3]])
        XCTAssertEqual(try QuantizerInstance(own).codebookSize, 5)
        // code_dim may exceed d_model.
        XCTAssertNoThrow(
            try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 4), hyperparameters: ["code_dim": 32]))
    }

    func testBadHyperparametersAndDims() throws {
        let lib = try openPlugin("QuantizerVQGANCos")
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 0))) { error in
            let msg = "\(error)"
            XCTAssertTrue(msg.contains("codebook size K = 0"), msg)
            XCTAssertTrue(msg.contains("INVALID_ARGUMENT"), msg)
        }
        XCTAssertNoThrow(
            try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 0), hyperparameters: ["codebook_size": 3]))
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 0, nCodes: 4))) { error in
            XCTAssertTrue("\(error)".contains("d_model"), "\(error)")
        }
        for bad in [0, 1025] {
            XCTAssertThrowsError(
                try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 4), hyperparameters: ["code_dim": bad])
            ) { error in
                XCTAssertTrue("\(error)".contains("code_dim"), "\(error)")
            }
        }
        XCTAssertThrowsError(
            try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 4), hyperparameters: ["commitment": -0.5])
        ) { error in
            XCTAssertTrue("\(error)".contains("commitment"), "\(error)")
        }
    }

    // MARK: forward

    func testForwardMatchesReference() throws {
        for (commitment, n, d, dc, K) in [
            (0.25, 37, 12, 16, 9), (1.3, 5, 6, 3, 4), (0.0, 64, 8, 8, 16), (0.25, 1, 5, 1, 3),
        ] {
            let q = try makeQuantizer(d: d, K: K, hp: ["commitment": commitment, "code_dim": dc], seed: UInt64(n))
            let x = randomNormal(n * d, seed: 17, scale: 1.2)
            let out = try forward(q, x: x, n: n, step: train())
            let ref = reference(x: x, p: parameters(q), n: n, d: d, dc: dc, K: K, commitment: commitment)
            XCTAssertEqual(out.codes.map(Int.init), ref.codes, "d_c \(dc)")
            for i in 0..<(n * d) {
                XCTAssertEqual(
                    Double(out.quantized[i]), ref.quantized[i], accuracy: 1e-5 * max(1, abs(ref.quantized[i])))
            }
            XCTAssertEqual(out.counts.map(Double.init), ref.counts)
            XCTAssertEqual(Double(out.loss), ref.loss, accuracy: 1e-5 * max(1, ref.loss))
            XCTAssertNotNil(out.ctx)
        }
    }

    func testLargerProblemOnThreadsMatchesReference() throws {
        let threads = HostRuntime.threads
        HostRuntime.configure(threads: 2)
        defer { HostRuntime.configure(threads: threads) }
        let n = 300, d = 24, dc = 8, K = 40
        let q = try makeQuantizer(d: d, K: K, hp: ["code_dim": dc], seed: 9)
        let x = randomNormal(n * d, seed: 10)
        let out = try forward(q, x: x, n: n, step: eval)
        let ref = reference(x: x, p: parameters(q), n: n, d: d, dc: dc, K: K, commitment: 0.25)
        XCTAssertEqual(out.codes.map(Int.init), ref.codes)
        XCTAssertEqual(out.counts.map(Double.init), ref.counts)
        XCTAssertEqual(Double(out.loss), ref.loss, accuracy: 1e-5 * ref.loss)
        XCTAssertNil(out.ctx)
    }

    func testCosineTiesGoToLowestIndexAndNormIsIgnored() throws {
        // proj_in = identity, so z = x. Codes 1 and 3 point the same way (3 = 2 · 1, exactly); code 0 is
        // long but off-direction: cosine, not dot product, decides.
        let d = 3, K = 4
        let q = try makeQuantizer(d: d, K: K, hp: ["code_dim": d], randomize: false)
        let wIn = q.core.buffer("proj_in.weight")!.floats
        wIn.update(repeating: 0, count: d * d)
        for i in 0..<d { wIn[i * d + i] = 1 }
        let cb: [Float] = [40, 40, 0, 0.2, -0.4, 0.8, -1, 0, 0, 0.4, -0.8, 1.6]
        q.core.buffer("codebook")!.floats.update(from: cb, count: K * d)
        let out = try forward(q, x: [0.1, -0.2, 0.4, 3, 3.1, 0, -0.1, 0, 0.01], n: 3, step: train())
        XCTAssertEqual(out.codes, [1, 0, 2])
        XCTAssertEqual(out.counts, [1, 1, 1, 0])
        // An all-equal codebook picks code 0.
        q.core.buffer("codebook")!.floats.update(repeating: 1, count: K * d)
        XCTAssertEqual(try forward(q, x: [1, 2, 3], n: 1, step: train()).codes, [0])
    }

    func testSurrogateOutputsProjectedNormalisedInputWithUsualCodesAndLoss() throws {
        let n = 11, d = 7, dc = 5, K = 6
        let q = try makeQuantizer(d: d, K: K, hp: ["code_dim": dc])
        let x = randomNormal(n * d, seed: 2)
        let normal = try forward(q, x: x, n: n, step: train())
        let sur = try forward(q, x: x, n: n, step: train(surrogate: true))
        let ref = reference(x: x, p: parameters(q), n: n, d: d, dc: dc, K: K, commitment: 0.25)
        for i in 0..<(n * d) {
            XCTAssertEqual(Double(sur.quantized[i]), ref.surrogate[i], accuracy: 1e-5 * max(1, abs(ref.surrogate[i])))
        }
        XCTAssertEqual(sur.codes, normal.codes)
        XCTAssertEqual(sur.counts, normal.counts)
        XCTAssertEqual(sur.loss, normal.loss)
    }

    func testEvalAndNoGradSaveNoContext() throws {
        let q = try makeQuantizer(d: 6, K: 5)
        let x = randomNormal(4 * 6, seed: 2)
        XCTAssertNil(try forward(q, x: x, n: 4, step: eval).ctx)
        XCTAssertNil(try forward(q, x: x, n: 4, step: train(noGrad: true)).ctx)
        XCTAssertNotNil(try forward(q, x: x, n: 4, step: train()).ctx)
        // An empty batch: zero loss and counts.
        let empty = try forward(q, x: [], n: 0, step: train())
        XCTAssertEqual(empty.loss, 0)
        XCTAssertEqual(empty.counts, [0, 0, 0, 0, 0])
    }

    func testNonFiniteInputIsANumericError() throws {
        let q = try makeQuantizer(d: 6, K: 5)
        var x = randomNormal(2 * 6, seed: 2)
        x[3] = .nan
        XCTAssertThrowsError(try forward(q, x: x, n: 2, step: train())) { error in
            XCTAssertEqual((error as? VQMoEError)?.category, .numeric, "\(error)")
        }
    }

    // MARK: backward

    func testBackwardMatchesReference() throws {
        for (commitment, beta, withGradQ, dc) in [
            (0.25, 0.08, true, 4), (0.6, 1.0, false, 6), (0.0, 0.5, true, 2), (1.0, 0.0, true, 5),
        ] {
            let n = 13, d = 6, K = 5
            let q = try makeQuantizer(d: d, K: K, hp: ["commitment": commitment, "code_dim": dc], seed: 6)
            let x = randomNormal(n * d, seed: 7)
            let p = parameters(q)
            let out = try forward(q, x: x, n: n, step: train())
            let ref = reference(x: x, p: p, n: n, d: d, dc: dc, K: K, commitment: commitment)
            XCTAssertEqual(out.codes.map(Int.init), ref.codes)
            let gq = withGradQ ? randomNormal(n * d, seed: 8) : nil
            for b in q.core.parameters { b.grad!.update(repeating: 0.5, count: b.count) }  // accumulation: += onto 0.5
            var gx = [Float](repeating: -1, count: n * d)  // += onto -1
            try backward(q, try XCTUnwrap(out.ctx), n: n, gq: gq, gradLoss: Float(beta), gradX: &gx)
            let want = referenceGradients(
                x: x, p: p, ref: ref, gq: gq, g: beta, n: n, d: d, dc: dc, K: K, commitment: commitment)
            for i in 0..<(n * d) {
                XCTAssertEqual(
                    Double(gx[i]), -1 + want["x"]![i], accuracy: 1e-4 * max(1, abs(want["x"]![i])), "grad_x[\(i)]")
            }
            for b in q.core.parameters {
                let w = want[b.name]!
                for i in 0..<b.count {
                    XCTAssertEqual(
                        Double(b.grad![i]), 0.5 + w[i], accuracy: 1e-4 * max(1, abs(w[i])),
                        "grad \(b.name)[\(i)] case dc=\(dc)")
                }
            }
        }
    }

    func testFrozenHasNoParameterGradients() throws {
        let n = 6, d = 5
        let q = try makeQuantizer(d: d, K: 4, hp: ["code_dim": 3])
        let x = randomNormal(n * d, seed: 7)
        let out = try forward(q, x: x, n: n, step: train(frozen: true))
        var gx = [Float](repeating: 0, count: n * d)
        try backward(q, try XCTUnwrap(out.ctx), n: n, gq: randomNormal(n * d, seed: 1), gradLoss: 1, gradX: &gx)
        for b in q.core.parameters { XCTAssertTrue((0..<b.count).allSatisfy { b.grad![$0] == 0 }, b.name) }
        XCTAssertGreaterThan(gx.map { abs($0) }.max()!, 0)
    }

    // MARK: metrics

    func testMetrics() throws {
        let d = 2, K = 4
        let q = try makeQuantizer(d: d, K: K, hp: ["code_dim": d], randomize: false)
        XCTAssertEqual(try q.core.metrics(), [:])  // nothing before the first forward
        let wIn = q.core.buffer("proj_in.weight")!.floats
        wIn.update(from: [1, 0, 0, 1], count: 4)
        q.core.buffer("codebook")!.floats.update(from: [1, 0, 0, 1, -1, 0, 0, -1], count: K * d)
        // Directions → codes 0, 0, 0, 1, 1, 3: counts 3, 2, 0, 1.
        let x: [Float] = [1, 0, 2, 0.1, 5, -1, 0, 1, 0.2, 3, 0.1, -2]
        let out = try forward(q, x: x, n: 6, step: train())
        XCTAssertEqual(out.codes, [0, 0, 0, 1, 1, 3])
        let m = try q.core.metrics()
        XCTAssertEqual(m["code_counts"], [3, 2, 0, 1])
        XCTAssertEqual(m["dead_codes"], [1])
        let pr = [3.0, 2.0, 1.0].map { $0 / 6 }
        XCTAssertEqual(
            try XCTUnwrap(m["usage_perplexity"]?.first), exp(-pr.map { $0 * log($0) }.reduce(0, +)), accuracy: 1e-9)
        // An eval forward after a training forward does not replace the training stats.
        _ = try forward(q, x: [0, 1], n: 1, step: eval)
        XCTAssertEqual(try q.core.metrics()["code_counts"], [3, 2, 0, 1])
        // Every code used once: perplexity K, no dead codes.
        _ = try forward(q, x: [1, 0, 0, 1, -1, 0, 0, -1], n: 4, step: train(1))
        let m2 = try q.core.metrics()
        XCTAssertEqual(try XCTUnwrap(m2["usage_perplexity"]?.first), 4, accuracy: 1e-9)
        XCTAssertEqual(m2["dead_codes"], [0])
    }

    // MARK: the framework's gradcheck

    func testPluginChecker() throws {
        let lib = try openPlugin("QuantizerVQGANCos")
        // The loss has stop-gradients (declared), so the checker compares directions: the
        // backward is gamma/(1+gamma) of the value's slope for x and proj_in, 1/(1+gamma) for
        // the codebook, and proj_out gets no loss gradient.
        for (hp, ratioIn, ratioCodebook) in [
            ([String: Any](), "0.2000", "0.8000"), (["commitment": 1.5], "0.6000", "0.4000"),
            (["code_dim": 3, "codebook_size": 20], "0.2000", "0.8000"),
        ] {
            let results = PluginChecker(library: lib, hyperparameters: plainVQVAE.merging(hp) { $1 }).run()
            XCTAssertTrue(
                results.allSatisfy(\.passed),
                "\(hp): " + results.filter { !$0.passed }.map(\.description).joined(separator: "\n"))
            XCTAssertEqual(results.count, 21, "\(hp)")
            for name in ["x", "proj_in.weight", "proj_in.bias"] {
                let r = results.first { $0.name.hasPrefix("gradcheck \(name) (direction") }
                XCTAssertTrue(
                    r?.detail.contains("|analytic|/|numeric| \(ratioIn)") == true, r?.detail ?? "missing \(name)")
            }
            let codebook = results.first { $0.name.hasPrefix("gradcheck codebook (direction") }
            XCTAssertTrue(
                codebook?.detail.contains("|analytic|/|numeric| \(ratioCodebook)") == true,
                codebook?.detail ?? "missing")
            for name in Self.bufferNames + ["x"] {
                XCTAssertTrue(results.contains { $0.name == "gradcheck \(name) [straight-through]" && $0.passed }, name)
            }
        }
    }

    // MARK: codebook upkeep (EMA, spherical k-means init, dead-code restart)

    /// ẑ_t = normalize(W_in x_t + b_in) in double.
    static func unitProjection(_ wIn: [Double], _ bIn: [Double], _ x: [Float], t: Int, d: Int, dc: Int) -> [Double] {
        var z = [Double](repeating: 0, count: dc)
        for i in 0..<dc {
            var v = bIn[i]
            for j in 0..<d { v += wIn[i * d + j] * Double(x[t * d + j]) }
            z[i] = v
        }
        let r = z.reduce(0.0) { $0 + $1 * $1 }.squareRoot()
        return z.map { $0 / r }
    }

    /// The defaults (EMA codebook, k-means init, restarts) pass every check of the framework's
    /// gradcheck: with EMA the loss is commitment · mse(ẑ, sg(ê_c)) and its gradient exact
    /// (ratio 1); k-means runs in the checked forward and its converged centres are stationary.
    func testPluginCheckerAtDefaults() throws {
        let results = PluginChecker(library: try openPlugin("QuantizerVQGANCos")).run()
        XCTAssertTrue(
            results.allSatisfy(\.passed), results.filter { !$0.passed }.map(\.description).joined(separator: "\n"))
        let x = results.first { $0.name.hasPrefix("gradcheck x (direction") }
        XCTAssertTrue(x?.detail.contains("|analytic|/|numeric| 1.0000") == true, x?.detail ?? "missing")
        XCTAssertFalse(results.contains { $0.name.contains("gradcheck codebook") }, "the codebook is EMA state")
    }

    /// One training forward with ema (no k-means, no restart) against a brute-force EMA step on
    /// the normalised codes: N_j = δN_j + (1−δ)n_j, m_j = δm_j + (1−δ)Σ_{c_t=j} ẑ_t,
    /// e_j = m_j / ((N_j + ε)/(ΣN + Kε)·ΣN); the loss is γ·mse(ẑ, ê_c); eval forwards change nothing.
    func testEMAUpdateOnNormalisedCodesByHand() throws {
        let d = 6, K = 4, n = 12, decay = 0.8, gamma = 0.25, eps = 1e-5
        let q = try makeQuantizer(d: d, K: K, hp: ["ema": true, "ema_decay": decay, "code_dim": 3])
        let dc = 3, core = q.core
        let C = try XCTUnwrap(core.buffer("codebook")), count = try XCTUnwrap(core.buffer("ema_count"))
        let sum = try XCTUnwrap(core.buffer("ema_sum"))
        XCTAssertFalse(C.isParameter)
        for i in 0..<(K * dc) { sum.floats[i] = C.floats[i] }  // state as init leaves it
        for j in 0..<K { count.floats[j] = 1 }
        let x = randomNormal(n * d, seed: 9)
        let p = parameters(q), wIn = p["proj_in.weight"]!, bIn = p["proj_in.bias"]!
        // ẑ_t = normalize(W_in x_t + b_in); c_t = argmax_j ẑ_t·ê_j.
        var zHat = [[Double]](), codes = [Int]()
        let e0 = (0..<K).map { j in (0..<dc).map { Double(C.floats[j * dc + $0]) } }
        func unit(_ v: [Double]) -> [Double] {
            let r = v.map { $0 * $0 }.reduce(0, +).squareRoot(); return v.map { $0 / r }
        }
        for t in 0..<n {
            let u = Self.unitProjection(wIn, bIn, x, t: t, d: d, dc: dc)
            zHat.append(u)
            let sims: [Double] = (0..<K).map { j in
                let e = unit(e0[j])
                return (0..<dc).reduce(0.0) { $0 + u[$1] * e[$1] }
            }
            codes.append(sims.firstIndex(of: sims.max()!)!)
        }
        let eval = try forward(q, x: x, n: n, step: StepInfo(step: 0, totalSteps: 10, train: false, seed: 1))
        XCTAssertEqual(eval.codes.map(Int.init), codes)
        XCTAssertEqual((0..<(K * dc)).map { Double(C.floats[$0]) }, e0.flatMap { $0 }, "eval changes nothing")
        let out = try forward(q, x: x, n: n, step: StepInfo(step: 0, totalSteps: 10, train: true, seed: 1))
        var mse = 0.0
        for t in 0..<n { let e = unit(e0[codes[t]]); for i in 0..<dc { mse += pow(zHat[t][i] - e[i], 2) } }
        XCTAssertEqual(Double(out.loss), gamma * mse / Double(n * dc), accuracy: 1e-5)
        var N = [Double](repeating: 0, count: K), m = e0
        for j in 0..<K {
            let nj = Double(codes.filter { $0 == j }.count)
            N[j] = decay * 1 + (1 - decay) * nj
            for i in 0..<dc {
                let s = (0..<n).filter { codes[$0] == j }.reduce(0.0) { $0 + zHat[$1][i] }
                m[j][i] = decay * e0[j][i] + (1 - decay) * s
            }
        }
        let total = N.reduce(0, +)
        for j in 0..<K {
            XCTAssertEqual(Double(count.floats[j]), N[j], accuracy: 1e-5)
            let smoothed = (N[j] + eps) / (total + Double(K) * eps) * total
            for i in 0..<dc { XCTAssertEqual(Double(C.floats[j * dc + i]), m[j][i] / smoothed, accuracy: 1e-5) }
        }
    }

    /// k-means init: the first training forward clusters ẑ with normalised centres (a converged
    /// spherical k-means: every ẑ_t's nearest centre by cosine is its cluster, each centre the
    /// normalised mean of its cluster), sets 'initialized', and later forwards leave it; a dead
    /// code (EMA count below the threshold) restarts from a batch row of ẑ.
    func testSphericalKMeansInitAndDeadCodeRestart() throws {
        let d = 5, K = 3, n = 30, dc = 4
        let q = try makeQuantizer(
            d: d, K: K, hp: ["ema": true, "kmeans_init": true, "code_dim": dc, "kmeans_iters": 50])
        let core = q.core, C = try XCTUnwrap(core.buffer("codebook")), flag = try XCTUnwrap(core.buffer("initialized"))
        flag.data.assumingMemoryBound(to: Int32.self).pointee = 0
        let x = randomNormal(n * d, seed: 4)
        let out = try forward(q, x: x, n: n, step: StepInfo(step: 0, totalSteps: 10, train: true, seed: 3))
        XCTAssertEqual(flag.data.assumingMemoryBound(to: Int32.self).pointee, 1)
        // ẑ rows, from the parameters.
        let p = parameters(q), wIn = p["proj_in.weight"]!, bIn = p["proj_in.bias"]!
        func unit(_ v: [Double]) -> [Double] {
            let r = v.map { $0 * $0 }.reduce(0, +).squareRoot(); return v.map { $0 / r }
        }
        let zHat: [[Double]] = (0..<n).map { t in Self.unitProjection(wIn, bIn, x, t: t, d: d, dc: dc) }
        // The codebook after the EMA step has the centres' directions (each cluster's EMA mixes the
        // centre with the same cluster's sum), so each code's cluster is the tokens coded to it.
        for j in 0..<K {
            let members = (0..<n).filter { Int(out.codes[$0]) == j }
            guard !members.isEmpty else { continue }
            let mean = unit((0..<dc).map { i in members.reduce(0.0) { $0 + zHat[$1][i] } })
            let e = unit((0..<dc).map { Double(C.floats[j * dc + $0]) })
            XCTAssertEqual(
                zip(mean, e).map(*).reduce(0, +), 1, accuracy: 1e-4, "code \(j) points at its cluster's mean")
        }
        // Dead codes restart from rows of ẑ: with a threshold above every EMA count, all of them.
        let restarting = try makeQuantizer(
            d: d, K: K, hp: ["ema": true, "code_dim": dc, "dead_code_threshold": 1000.0])
        _ = try forward(restarting, x: x, n: n, step: StepInfo(step: 1, totalSteps: 10, train: true, seed: 5))
        let rC = try XCTUnwrap(restarting.core.buffer("codebook"))
        let count = try XCTUnwrap(restarting.core.buffer("ema_count"))
        let rp = parameters(restarting), rw = rp["proj_in.weight"]!, rb = rp["proj_in.bias"]!
        let rows: [[Double]] = (0..<n).map { Self.unitProjection(rw, rb, x, t: $0, d: d, dc: dc) }
        for j in 0..<K {
            let e = (0..<dc).map { Double(rC.floats[j * dc + $0]) }
            XCTAssertTrue(
                rows.contains { row in zip(row, e).allSatisfy { abs($0 - $1) < 1e-6 } }, "code \(j) is a row of ẑ")
            XCTAssertEqual(count.floats[j], 1)
        }
    }

}
