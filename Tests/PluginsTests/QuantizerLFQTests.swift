import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `lfq` quantizer plugin against a brute-force double-precision reference that sums the
/// full K-way softmax p(c|z) = softmax_c(2 z·code_c / tau).
final class QuantizerLFQTests: XCTestCase {
    static let bufferNames = ["proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias"]

    /// Hyperparameters of the reference (the plugin's defaults unless set).
    struct HP {
        var entropyWeight = 0.1, diversityGamma = 1.0, temperature = 1.0, commitment = 0.25, scale = 1.0
        var dictionary: [String: Any] {
            [
                "entropy_weight": entropyWeight, "diversity_gamma": diversityGamma, "temperature": temperature,
                "commitment": commitment, "scale": scale,
            ]
        }
    }

    /// A quantizer with K codes whose parameters are overwritten with known random values.
    func makeQuantizer(
        d: Int, K: Int, hp: HP = HP(), seed: UInt64 = 1, randomize: Bool = true
    ) throws -> QuantizerInstance {
        let lib = try openPlugin("QuantizerLFQ")
        let core = try makeInstance(
            lib, dims: ModelDims(dModel: d, nCodes: K), hyperparameters: hp.dictionary, seed: seed)
        if randomize {
            for (i, name) in Self.bufferNames.enumerated() {
                let b = try XCTUnwrap(core.buffer(name))
                b.floats.update(from: randomNormal(b.count, seed: seed &+ 100 &+ UInt64(i), scale: 0.6), count: b.count)
            }
        }
        return try QuantizerInstance(core)
    }

    /// proj_in = identity (d = b), proj_in.bias = 0: then z = x and grad_x = dL/dz.
    func makeIdentityQuantizer(K: Int, hp: HP = HP()) throws -> QuantizerInstance {
        let b = K.trailingZeroBitCount
        let q = try makeQuantizer(d: b, K: K, hp: hp)
        let w = q.core.buffer("proj_in.weight")!.floats
        w.update(repeating: 0, count: b * b)
        for i in 0..<b { w[i * b + i] = 1 }
        q.core.buffer("proj_in.bias")!.floats.update(repeating: 0, count: b)
        return q
    }

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

    /// code_c = scale · (2 bit_i(c) − 1), bit i of c weighing 2^i.
    func code(_ c: Int, b: Int, scale: Double) -> [Double] { (0..<b).map { (c >> $0) & 1 == 1 ? scale : -scale } }

    /// p(.|z_t) (K) = softmax_c(2 z_t·code_c / tau), the full K-way softmax.
    func probs(_ z: ArraySlice<Double>, K: Int, hp: HP) -> [Double] {
        let b = z.count
        let logits = (0..<K).map { c in
            2 * zip(z, code(c, b: b, scale: hp.scale)).map { $0 * $1 }.reduce(0, +) / hp.temperature
        }
        let m = logits.max()!
        let e = logits.map { exp($0 - m) }
        let s = e.reduce(0, +)
        return e.map { $0 / s }
    }

    func entropy(_ p: [Double]) -> Double { -p.filter { $0 > 0 }.map { $0 * log($0) }.reduce(0, +) }

    /// (mean_t H(p(.|z_t)), H(mean_t p(.|z_t))) by brute force over the K codes.
    func entropies(_ z: [Double], n: Int, K: Int, hp: HP) -> (perSample: Double, codebook: Double) {
        let b = K.trailingZeroBitCount
        var mean = [Double](repeating: 0, count: K), perSample = 0.0
        for t in 0..<n {
            let p = probs(z[(t * b)..<((t + 1) * b)], K: K, hp: hp)
            perSample += entropy(p) / Double(n)
            for c in 0..<K { mean[c] += p[c] / Double(n) }
        }
        return (perSample, entropy(mean))
    }

    /// The entropy part of the loss as a function of z.
    func entropyLoss(_ z: [Double], n: Int, K: Int, hp: HP) -> Double {
        let h = entropies(z, n: n, K: K, hp: hp)
        return hp.entropyWeight * (h.perSample - hp.diversityGamma * h.codebook)
    }

    /// d entropyLoss / dz through the K-way softmax Jacobians:
    ///   d mean_t H_t / dl_{t,c} = −p_tc (log p_tc + H_t) / N
    ///   d H(p̄) / dl_{t,c}      = p_tc (−log p̄_c + Σ_j p_tj log p̄_j) / N
    ///   dl_{t,c} / dz_{t,i}      = 2 code_{c,i} / tau
    func entropyLossGradient(_ z: [Double], n: Int, K: Int, hp: HP) -> [Double] {
        let b = K.trailingZeroBitCount
        let p = (0..<n).map { probs(z[($0 * b)..<(($0 + 1) * b)], K: K, hp: hp) }
        var mean = [Double](repeating: 0, count: K)
        for t in 0..<n { for c in 0..<K { mean[c] += p[t][c] / Double(n) } }
        var g = [Double](repeating: 0, count: n * b)
        for t in 0..<n {
            let h = entropy(p[t])
            let avgLog = (0..<K).map { p[t][$0] * log(mean[$0]) }.reduce(0, +)
            for c in 0..<K {
                let dH = -p[t][c] * (log(p[t][c]) + h) / Double(n)
                let dHbar = p[t][c] * (-log(mean[c]) + avgLog) / Double(n)
                let dl = hp.entropyWeight * (dH - hp.diversityGamma * dHbar)
                let cv = code(c, b: b, scale: hp.scale)
                for i in 0..<b { g[t * b + i] += dl * 2 * cv[i] / hp.temperature }
            }
        }
        return g
    }

    struct Reference {
        var z: [Double], q: [Double]  // (N,b)
        var codes: [Int], counts: [Double]
        var quantized: [Double], surrogate: [Double]  // (N,d)
        var perSample: Double, codebook: Double, loss: Double
    }

    func reference(x: [Float], p: [String: [Double]], n: Int, d: Int, K: Int, hp: HP) -> Reference {
        let b = K.trailingZeroBitCount
        let wIn = p["proj_in.weight"]!, bIn = p["proj_in.bias"]!, wOut = p["proj_out.weight"]!,
            bOut = p["proj_out.bias"]!
        var r = Reference(
            z: [], q: [], codes: [], counts: [Double](repeating: 0, count: K), quantized: [], surrogate: [],
            perSample: 0, codebook: 0, loss: 0)
        var sse = 0.0
        for t in 0..<n {
            var index = 0
            for i in 0..<b {
                var z = bIn[i]
                for k in 0..<d { z += wIn[i * d + k] * Double(x[t * d + k]) }
                let q = z > 0 ? hp.scale : -hp.scale
                if z > 0 { index += 1 << i }  // index = Σ_i bit_i 2^i
                r.z.append(z); r.q.append(q)
                sse += (z - q) * (z - q)
            }
            r.codes.append(index)
            r.counts[index] += 1
            for o in 0..<d {
                var qv = bOut[o], sv = bOut[o]
                for i in 0..<b { qv += wOut[o * b + i] * r.q[t * b + i]; sv += wOut[o * b + i] * r.z[t * b + i] }
                r.quantized.append(qv); r.surrogate.append(sv)
            }
        }
        let h = entropies(r.z, n: n, K: K, hp: hp)
        r.perSample = h.perSample; r.codebook = h.codebook
        r.loss = hp.entropyWeight * (h.perSample - hp.diversityGamma * h.codebook) + hp.commitment * sse / Double(n * b)
        return r
    }

    /// Reference gradients: straight-through (G = grad_quantized) plus g · d(loss)/dz, chained
    /// through proj_in; by buffer name plus "x".
    func referenceGradients(
        x: [Float], p: [String: [Double]], ref: Reference, gq: [Float]?, g: Double, n: Int, d: Int,
        K: Int, hp: HP
    ) -> [String: [Double]] {
        let b = K.trailingZeroBitCount
        let wIn = p["proj_in.weight"]!, wOut = p["proj_out.weight"]!
        var out: [String: [Double]] = [
            "x": [Double](repeating: 0, count: n * d),
            "proj_in.weight": [Double](repeating: 0, count: b * d),
            "proj_in.bias": [Double](repeating: 0, count: b),
            "proj_out.weight": [Double](repeating: 0, count: d * b),
            "proj_out.bias": [Double](repeating: 0, count: d),
        ]
        let ent = entropyLossGradient(ref.z, n: n, K: K, hp: hp)
        for t in 0..<n {
            var gz = [Double](repeating: 0, count: b)
            if let gq {
                for o in 0..<d {
                    let G = Double(gq[t * d + o])
                    out["proj_out.bias"]![o] += G
                    for i in 0..<b {
                        gz[i] += wOut[o * b + i] * G
                        out["proj_out.weight"]![o * b + i] += G * ref.q[t * b + i]
                    }
                }
            }
            for i in 0..<b {
                let zi = ref.z[t * b + i], qi = ref.q[t * b + i]
                gz[i] += g * (ent[t * b + i] + hp.commitment * 2 * (zi - qi) / Double(n * b))
            }
            for i in 0..<b {
                out["proj_in.bias"]![i] += gz[i]
                for k in 0..<d {
                    out["proj_in.weight"]![i * d + k] += gz[i] * Double(x[t * d + k])
                    out["x"]![t * d + k] += gz[i] * wIn[i * d + k]
                }
            }
        }
        return out
    }

    // MARK: descriptor, schema, buffers

    func testDescriptorAndSchema() throws {
        let lib = try openPlugin("QuantizerLFQ")
        XCTAssertEqual(lib.name, "lfq")
        XCTAssertEqual(lib.version, "1.0.0")
        XCTAssertEqual(lib.kind, .quantizer)
        // The backward is the exact derivative of the loss: no stop-gradient flag.
        XCTAssertFalse(lib.hasStopGradientLoss)
        XCTAssertFalse(lib.hasNoGrad)
        XCTAssertEqual(
            lib.schema.map(\.name),
            ["codebook_size", "entropy_weight", "diversity_gamma", "temperature", "commitment", "scale"])
        let s = Dictionary(uniqueKeysWithValues: lib.schema.map { ($0.name, $0) })
        XCTAssertEqual(s["codebook_size"]?.type, .int)
        XCTAssertEqual(s["codebook_size"]?.defaultNumber, 0)
        XCTAssertEqual(s["codebook_size"]?.min, 0)
        XCTAssertEqual(s["codebook_size"]?.max, 65536)
        for (name, value) in [
            ("entropy_weight", 0.1), ("diversity_gamma", 1.0), ("temperature", 1.0), ("commitment", 0.25),
            ("scale", 1.0),
        ] {
            XCTAssertEqual(s[name]?.type, .float, name)
            XCTAssertEqual(s[name]?.defaultNumber, value, name)
            XCTAssertNotNil(s[name]?.min, name)
        }
        XCTAssertTrue(lib.schema.allSatisfy { !$0.description.isEmpty })
        XCTAssertNotNil(lib.feature("vqmoe.metrics/1"))
    }

    func testBuffersAndInit() throws {
        let lib = try openPlugin("QuantizerLFQ")
        let d = 64, K = 256, b = 8
        let core = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), seed: 5)
        XCTAssertEqual(core.buffers.map(\.name), Self.bufferNames)
        XCTAssertEqual(core.buffers.map(\.shape), [[b, d], [b], [d, b], [d]])
        XCTAssertTrue(
            core.buffers.allSatisfy { $0.isParameter && $0.grad != nil && $0.flags & VQMOE_BUF_FREEZE_FT != 0 })
        XCTAssertEqual(core.buffers.map { $0.flags & VQMOE_BUF_NO_DECAY != 0 }, [false, true, false, true])
        let q = try QuantizerInstance(core)
        XCTAssertEqual(q.codebookSize, K)
        XCTAssertEqual(q.codesPerToken, 1)
        func std(_ name: String) -> Double {
            let bf = core.buffer(name)!
            let v = Array(UnsafeBufferPointer(start: bf.floats, count: bf.count)).map(Double.init)
            let mean = v.reduce(0, +) / Double(v.count)
            return (v.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(v.count)).squareRoot()
        }
        XCTAssertEqual(std("proj_in.weight"), 1 / 8, accuracy: 0.1 / 8)  // N(0, 1/d)
        // N(0, 1/b)
        XCTAssertEqual(std("proj_out.weight"), 1 / Double(b).squareRoot(), accuracy: 0.1 / Double(b).squareRoot())
        for name in ["proj_in.bias", "proj_out.bias"] {
            let bf = core.buffer(name)!
            XCTAssertTrue((0..<bf.count).allSatisfy { bf.floats[$0] == 0 }, name)
        }
        let again = try makeInstance(lib, dims: ModelDims(dModel: d, nCodes: K), seed: 5)
        for (x, y) in zip(core.buffers, again.buffers) {
            XCTAssertEqual(memcmp(x.data, y.data, x.byteCount), 0, x.name)
        }
        // codebook_size overrides n_codes: K = 2 is one bit.
        let two = try makeInstance(lib, dims: ModelDims(dModel: 5, nCodes: 16), hyperparameters: ["codebook_size": 2])
        XCTAssertEqual(two.buffers.map(\.shape), [[1, 5], [1], [5, 1], [5]])
        XCTAssertEqual(try QuantizerInstance(two).codebookSize, 2)
    }

    func testCodebookSizeMustBeAPowerOfTwo() throws {
        let lib = try openPlugin("QuantizerLFQ")
        // K = 12 from the model's n_codes, and from the hyperparameter.
        for (nCodes, hp, source) in [(12, [String: Any](), "n_codes"), (16, ["codebook_size": 12], "codebook_size")] {
            XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: nCodes), hyperparameters: hp))
            { error in
                let msg = "\(error)"
                XCTAssertTrue(msg.contains("INVALID_ARGUMENT"), msg)
                XCTAssertTrue(msg.contains("K = 12"), msg)
                XCTAssertTrue(msg.contains("must be a power of two"), msg)
                XCTAssertTrue(msg.contains(source), msg)
            }
        }
        for bad in [0, 1, 3, 24] {
            XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: bad)), "K = \(bad)") {
                error in
                XCTAssertTrue("\(error)".contains("K = \(bad)") && "\(error)".contains("power of two"), "\(error)")
            }
        }
        // Past 2^16: the schema refuses the hyperparameter, the plugin refuses n_codes.
        XCTAssertThrowsError(
            try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 4), hyperparameters: ["codebook_size": 1 << 17])
        ) { error in
            XCTAssertTrue("\(error)".contains("codebook_size"), "\(error)")
        }
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 1 << 17))) { error in
            XCTAssertTrue("\(error)".contains("maximum 65536"), "\(error)")
        }
        XCTAssertThrowsError(
            try makeInstance(lib, dims: ModelDims(dModel: 4, nCodes: 4), hyperparameters: ["temperature": 0.0])
        ) { error in
            XCTAssertTrue("\(error)".contains("temperature"), "\(error)")
        }
        XCTAssertThrowsError(try makeInstance(lib, dims: ModelDims(dModel: 0, nCodes: 4))) { error in
            XCTAssertTrue("\(error)".contains("d_model"), "\(error)")
        }
        for k in [2, 4, 8, 1024, 65536] {
            XCTAssertNoThrow(try makeInstance(lib, dims: ModelDims(dModel: 2, nCodes: k)), "K = \(k)")
        }
    }

    // MARK: forward

    func testIndexIsSumOfBitsTimesPowersOfTwo() throws {
        // z = x (identity proj_in); proj_out = identity: quantized = q = ±scale.
        var hp = HP()
        hp.scale = 0.5
        let q = try makeIdentityQuantizer(K: 8, hp: hp)
        let wOut = q.core.buffer("proj_out.weight")!.floats
        wOut.update(repeating: 0, count: 9)
        for i in 0..<3 { wOut[i * 3 + i] = 1 }
        q.core.buffer("proj_out.bias")!.floats.update(repeating: 0, count: 3)
        let x: [Float] = [1, -1, 1, -1, -1, -1, 0.1, 0.2, 0.3, -2, 3, 0, 0, 0, 1e-3, 5, 0, -5]
        let out = try forward(q, x: x, n: 6, step: train())
        // bits (z_i > 0) little-endian: 101 -> 5, 000 -> 0, 111 -> 7, 010 -> 2 (z = 0 is bit 0), 001 -> 4, 100 -> 1
        XCTAssertEqual(out.codes, [5, 0, 7, 2, 4, 1])
        XCTAssertEqual(out.counts, [1, 1, 1, 0, 1, 1, 0, 1])
        XCTAssertEqual(
            out.quantized,
            [0.5, -0.5, 0.5, -0.5, -0.5, -0.5, 0.5, 0.5, 0.5, -0.5, 0.5, -0.5, -0.5, -0.5, 0.5, 0.5, -0.5, -0.5])
    }

    func testForwardMatchesBruteForceReference() throws {
        var sharp = HP(); sharp.temperature = 0.5; sharp.scale = 2; sharp.diversityGamma = 0.5; sharp.entropyWeight = 1;
        sharp.commitment = 0.7
        var noEntropy = HP(); noEntropy.entropyWeight = 0
        for (hp, n, d, K) in [
            (HP(), 37, 12, 16), (sharp, 9, 5, 8), (HP(), 20, 6, 2), (noEntropy, 7, 4, 4), (HP(), 30, 10, 256),
        ] {
            let q = try makeQuantizer(d: d, K: K, hp: hp, seed: UInt64(n))
            let x = randomNormal(n * d, seed: 17, scale: 1.2)
            let out = try forward(q, x: x, n: n, step: train())
            let ref = reference(x: x, p: parameters(q), n: n, d: d, K: K, hp: hp)
            XCTAssertEqual(out.codes.map(Int.init), ref.codes, "K \(K)")
            XCTAssertEqual(out.counts.map(Double.init), ref.counts)
            for i in 0..<(n * d) {
                XCTAssertEqual(
                    Double(out.quantized[i]), ref.quantized[i], accuracy: 1e-5 * max(1, abs(ref.quantized[i])))
            }
            XCTAssertEqual(Double(out.loss), ref.loss, accuracy: 1e-5 * max(1, abs(ref.loss)), "K \(K)")
            // The entropy terms themselves, reported through the metrics.
            let m = try q.core.metrics()
            XCTAssertEqual(try XCTUnwrap(m["per_sample_entropy"]?.first), ref.perSample, accuracy: 1e-5, "K \(K)")
            XCTAssertEqual(try XCTUnwrap(m["codebook_entropy"]?.first), ref.codebook, accuracy: 1e-5, "K \(K)")
            XCTAssertNotNil(out.ctx)
        }
    }

    func testEntropyTermsAtKnownPoints() throws {
        // z = 0 (proj_in = 0): p(.|z) is uniform, so both entropies are b log 2 = log K and the
        // loss is entropy_weight (1 − gamma_div) log K + commitment · scale².
        var hp = HP(); hp.diversityGamma = 0.3; hp.scale = 1.5
        let K = 32, n = 5, d = 3
        let q = try makeQuantizer(d: d, K: K, hp: hp)
        for name in ["proj_in.weight", "proj_in.bias"] {
            let b = q.core.buffer(name)!; b.floats.update(repeating: 0, count: b.count)
        }
        let out = try forward(q, x: randomNormal(n * d, seed: 4), n: n, step: train())
        let logK = log(Double(K))
        XCTAssertEqual(Double(out.loss), 0.1 * (1 - 0.3) * logK + 0.25 * 1.5 * 1.5, accuracy: 1e-6)
        XCTAssertEqual(out.codes, [0, 0, 0, 0, 0])
        let m = try q.core.metrics()
        XCTAssertEqual(try XCTUnwrap(m["per_sample_entropy"]?.first), logK, accuracy: 1e-9)
        XCTAssertEqual(try XCTUnwrap(m["codebook_entropy"]?.first), logK, accuracy: 1e-9)
        // Confident tokens on two opposite codes: per-sample entropy → 0, codebook entropy → log 2.
        let qi = try makeIdentityQuantizer(K: 4, hp: HP())
        _ = try forward(qi, x: [30, 30, -30, -30], n: 2, step: train())
        let m2 = try qi.core.metrics()
        XCTAssertEqual(try XCTUnwrap(m2["per_sample_entropy"]?.first), 0, accuracy: 1e-9)
        XCTAssertEqual(try XCTUnwrap(m2["codebook_entropy"]?.first), log(2), accuracy: 1e-9)
    }

    func testSurrogateOutputsProjectedInputWithUsualCodesAndLoss() throws {
        let n = 11, d = 7, K = 16
        let q = try makeQuantizer(d: d, K: K)
        let x = randomNormal(n * d, seed: 2)
        let normal = try forward(q, x: x, n: n, step: train())
        let sur = try forward(q, x: x, n: n, step: train(surrogate: true))
        let ref = reference(x: x, p: parameters(q), n: n, d: d, K: K, hp: HP())
        for i in 0..<(n * d) {
            XCTAssertEqual(Double(sur.quantized[i]), ref.surrogate[i], accuracy: 1e-5 * max(1, abs(ref.surrogate[i])))
        }
        XCTAssertEqual(sur.codes, normal.codes)
        XCTAssertEqual(sur.counts, normal.counts)
        XCTAssertEqual(sur.loss, normal.loss)
    }

    func testEvalAndNoGradSaveNoContextAndEmptyBatch() throws {
        let q = try makeQuantizer(d: 6, K: 8)
        let x = randomNormal(4 * 6, seed: 2)
        XCTAssertNil(try forward(q, x: x, n: 4, step: eval).ctx)
        XCTAssertNil(try forward(q, x: x, n: 4, step: train(noGrad: true)).ctx)
        XCTAssertNotNil(try forward(q, x: x, n: 4, step: train()).ctx)
        let empty = try forward(q, x: [], n: 0, step: train())
        XCTAssertEqual(empty.loss, 0)
        XCTAssertEqual(empty.counts, [Float](repeating: 0, count: 8))
    }

    func testNonFiniteInputIsANumericError() throws {
        let q = try makeQuantizer(d: 6, K: 8)
        var x = randomNormal(2 * 6, seed: 2)
        x[5] = -.infinity
        XCTAssertThrowsError(try forward(q, x: x, n: 2, step: train())) { error in
            XCTAssertEqual((error as? VQMoEError)?.category, .numeric, "\(error)")
        }
    }

    // MARK: backward

    func testReferenceEntropyGradientMatchesFiniteDifferences() {
        // The test's own K-way softmax-Jacobian gradient against central differences in double.
        var hp = HP(); hp.temperature = 0.7; hp.diversityGamma = 0.8; hp.entropyWeight = 1; hp.scale = 1.3
        let n = 4, K = 8
        let z = randomNormal(n * 3, seed: 31).map(Double.init)
        let g = entropyLossGradient(z, n: n, K: K, hp: hp)
        for i in 0..<z.count {
            var zp = z, zm = z
            zp[i] += 1e-6; zm[i] -= 1e-6
            let fd = (entropyLoss(zp, n: n, K: K, hp: hp) - entropyLoss(zm, n: n, K: K, hp: hp)) / 2e-6
            XCTAssertEqual(g[i], fd, accuracy: 1e-7 * max(1, abs(fd)), "dz[\(i)]")
        }
    }

    func testEntropyLossGradientMatchesReference() throws {
        // z = x, so grad_x is dL/dz itself: commitment 0 leaves only the entropy terms, which must
        // be the exact derivative (no stop-gradient) -- checked against the K-way reference and
        // against central differences of the brute-force loss.
        var hp = HP(); hp.commitment = 0; hp.entropyWeight = 1
        for (K, temperature, gamma, scale) in [
            (8, 1.0, 1.0, 1.0), (16, 0.5, 0.3, 2.0), (2, 2.0, 1.0, 0.7), (64, 1.0, 2.0, 1.0),
        ] {
            hp.temperature = temperature; hp.diversityGamma = gamma; hp.scale = scale
            let b = K.trailingZeroBitCount, n = 9
            let q = try makeIdentityQuantizer(K: K, hp: hp)
            let x = randomNormal(n * b, seed: 23, scale: 0.8)
            let out = try forward(q, x: x, n: n, step: train())
            var gx = [Float](repeating: 0.25, count: n * b)  // += onto 0.25
            let beta: Float = 1.5
            try backward(q, try XCTUnwrap(out.ctx), n: n, gq: nil, gradLoss: beta, gradX: &gx)
            let z = x.map(Double.init)
            let want = entropyLossGradient(z, n: n, K: K, hp: hp)
            for i in 0..<(n * b) {
                let got = (Double(gx[i]) - 0.25) / Double(beta)
                XCTAssertEqual(got, want[i], accuracy: 2e-6 * max(1, abs(want[i])), "K \(K) dL/dz[\(i)]")
                var zp = z, zm = z
                zp[i] += 1e-6; zm[i] -= 1e-6
                let fd = (entropyLoss(zp, n: n, K: K, hp: hp) - entropyLoss(zm, n: n, K: K, hp: hp)) / 2e-6
                XCTAssertEqual(got, fd, accuracy: 2e-6 * max(1, abs(fd)), "K \(K) finite difference at \(i)")
            }
            // proj_out gets no loss gradient.
            XCTAssertTrue((0..<(b * b)).allSatisfy { q.core.buffer("proj_out.weight")!.grad![$0] == 0 })
        }
    }

    func testBackwardMatchesReference() throws {
        var sharp = HP(); sharp.temperature = 0.5; sharp.scale = 2; sharp.diversityGamma = 0.5; sharp.entropyWeight = 1;
        sharp.commitment = 0.7
        for (hp, beta, withGradQ, K) in [
            (HP(), 0.08, true, 16), (sharp, 1.0, false, 8), (sharp, 0.5, true, 4), (HP(), 0.0, true, 32),
        ] {
            let n = 13, d = 6
            let q = try makeQuantizer(d: d, K: K, hp: hp, seed: 6)
            let x = randomNormal(n * d, seed: 7)
            let p = parameters(q)
            let out = try forward(q, x: x, n: n, step: train())
            let ref = reference(x: x, p: p, n: n, d: d, K: K, hp: hp)
            XCTAssertEqual(out.codes.map(Int.init), ref.codes)
            let gq = withGradQ ? randomNormal(n * d, seed: 8) : nil
            for b in q.core.parameters { b.grad!.update(repeating: 0.5, count: b.count) }  // accumulation: += onto 0.5
            var gx = [Float](repeating: -1, count: n * d)  // += onto -1
            try backward(q, try XCTUnwrap(out.ctx), n: n, gq: gq, gradLoss: Float(beta), gradX: &gx)
            let want = referenceGradients(x: x, p: p, ref: ref, gq: gq, g: beta, n: n, d: d, K: K, hp: hp)
            for i in 0..<(n * d) {
                XCTAssertEqual(
                    Double(gx[i]), -1 + want["x"]![i], accuracy: 1e-5 * max(1, abs(want["x"]![i])),
                    "grad_x[\(i)] K \(K)")
            }
            for b in q.core.parameters {
                let w = want[b.name]!
                for i in 0..<b.count {
                    XCTAssertEqual(
                        Double(b.grad![i]), 0.5 + w[i], accuracy: 1e-5 * max(1, abs(w[i])),
                        "grad \(b.name)[\(i)] K \(K)")
                }
            }
        }
    }

    func testFrozenHasNoParameterGradients() throws {
        let n = 6, d = 5
        let q = try makeQuantizer(d: d, K: 8)
        let x = randomNormal(n * d, seed: 7)
        let out = try forward(q, x: x, n: n, step: train(frozen: true))
        var gx = [Float](repeating: 0, count: n * d)
        try backward(q, try XCTUnwrap(out.ctx), n: n, gq: randomNormal(n * d, seed: 1), gradLoss: 1, gradX: &gx)
        for b in q.core.parameters { XCTAssertTrue((0..<b.count).allSatisfy { b.grad![$0] == 0 }, b.name) }
        XCTAssertGreaterThan(gx.map { abs($0) }.max()!, 0)
    }

    // MARK: metrics

    func testMetrics() throws {
        let q = try makeIdentityQuantizer(K: 4)
        XCTAssertEqual(try q.core.metrics(), [:])  // nothing before the first forward
        // Codes 3, 3, 3, 1, 1, 0 -> counts 1, 2, 0, 3.
        let x: [Float] = [1, 1, 2, 3, 0.5, 0.1, 1, -1, 2, -3, -1, -1]
        let out = try forward(q, x: x, n: 6, step: train())
        XCTAssertEqual(out.codes, [3, 3, 3, 1, 1, 0])
        let m = try q.core.metrics()
        XCTAssertEqual(m["code_counts"], [1, 2, 0, 3])
        XCTAssertEqual(m["dead_codes"], [1])
        let pr = [1.0, 2.0, 3.0].map { $0 / 6 }
        XCTAssertEqual(
            try XCTUnwrap(m["usage_perplexity"]?.first), exp(-pr.map { $0 * log($0) }.reduce(0, +)), accuracy: 1e-9)
        let h = entropies(x.map(Double.init), n: 6, K: 4, hp: HP())
        XCTAssertEqual(try XCTUnwrap(m["per_sample_entropy"]?.first), h.perSample, accuracy: 1e-6)
        XCTAssertEqual(try XCTUnwrap(m["codebook_entropy"]?.first), h.codebook, accuracy: 1e-6)
        // An eval forward after a training forward does not replace the training stats.
        _ = try forward(q, x: [1, 1], n: 1, step: eval)
        XCTAssertEqual(try q.core.metrics()["code_counts"], [1, 2, 0, 3])
        _ = try forward(q, x: [-1, -1, 1, -1, -1, 1, 1, 1], n: 4, step: train(1))
        let m2 = try q.core.metrics()
        XCTAssertEqual(try XCTUnwrap(m2["usage_perplexity"]?.first), 4, accuracy: 1e-9)
        XCTAssertEqual(m2["dead_codes"], [0])
    }

    // MARK: the framework's gradcheck

    func testPluginChecker() throws {
        let lib = try openPlugin("QuantizerLFQ")
        // No stop-gradient flag: every loss gradient is compared by value with finite differences.
        let settings: [[String: Any]] = [
            [:], ["codebook_size": 16, "temperature": 0.5, "scale": 2.0],
            ["diversity_gamma": 0.0, "entropy_weight": 1.0], ["commitment": 0.0, "entropy_weight": 2.0],
            ["codebook_size": 2], ["codebook_size": 64, "diversity_gamma": 0.5],
        ]
        for hp in settings {
            let results = PluginChecker(library: lib, hyperparameters: hp).run()
            XCTAssertTrue(
                results.allSatisfy(\.passed),
                "\(hp): " + results.filter { !$0.passed }.map(\.description).joined(separator: "\n"))
            XCTAssertEqual(results.count, 19, "\(hp)")
            XCTAssertFalse(results.contains { $0.name.contains("direction") })
            for name in Self.bufferNames + ["x"] {
                XCTAssertTrue(results.contains { $0.name == "gradcheck \(name) [loss]" && $0.passed }, "\(hp) \(name)")
                XCTAssertTrue(
                    results.contains { $0.name == "gradcheck \(name) [straight-through]" && $0.passed }, "\(hp) \(name)"
                )
            }
        }
    }
}
