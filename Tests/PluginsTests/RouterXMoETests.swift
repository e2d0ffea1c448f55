import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// The `xmoe` router plugin against a brute-force double-precision reference: forward,
/// hand-derived gradients (themselves checked by finite differences in Double), the
/// temperature modes and the expert-embedding rescale of begin_step.
final class RouterXMoETests: XCTestCase {
    let d = 5, E = 4, dr = 3

    // MARK: helpers

    /// Parameters of one router as the test set them.
    struct Params {
        var proj: [Float]  // (d_r,d)
        var emb: [Float]  // (E,d_r)
        var tau: Double  // exp(log_temperature) or the fixed temperature
    }

    /// A router whose buffers are overwritten with known random values (log_temperature =
    /// log(0.3) + 0.2 when learnable, so the buffer, not the hyperparameter, must be used).
    func makeRouter(E: Int, d: Int, hp: [String: Any] = [:], seed: UInt64 = 1) throws -> (RouterInstance, Params) {
        let lib = try openPlugin("RouterXMoE")
        let core = try makeInstance(lib, dims: ModelDims(dModel: d, nExperts: E), hyperparameters: hp, seed: seed)
        let router = try RouterInstance(core)
        let dr = hp["router_dim"] as? Int ?? 16
        let pBuf = try XCTUnwrap(core.buffer("proj.weight"))
        let eBuf = try XCTUnwrap(core.buffer("expert_embeddings"))
        pBuf.floats.update(from: randomNormal(dr * d, seed: seed &+ 100, scale: 0.6), count: dr * d)
        eBuf.floats.update(from: randomNormal(E * dr, seed: seed &+ 200), count: E * dr)
        var tau = hp["temperature"] as? Double ?? 0.3
        if let tBuf = core.buffer("log_temperature") {
            tBuf.floats[0] = Float(log(tau) + 0.2)
            tau = Double(exp(tBuf.floats[0]))
        }
        return (
            router,
            Params(
                proj: Array(UnsafeBufferPointer(start: pBuf.floats, count: dr * d)),
                emb: Array(UnsafeBufferPointer(start: eBuf.floats, count: E * dr)), tau: tau)
        )
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

    func train(_ step: Int = 0, frozen: Bool = false) -> StepInfo {
        StepInfo(step: step, totalSteps: 10, train: true, frozen: frozen, seed: 3)
    }

    /// Brute-force routing in double: h = P x, u = h/||h||, e^ = e/||e||, s = u.e^/tau, full
    /// softmax p, top-k (ties -> lower index, descending), kept softmax g, load, f, aux.
    struct Reference {
        var u: [Double], hNorm: [Double], eHat: [Double], eNorm: [Double]
        var scores: [Double], probs: [Double], index: [Int], gates: [Double], load: [Double], f: [Double], aux: Double
    }

    static func reference(
        x: [Double], proj: [Double], emb: [Double], tau: Double, n: Int, E: Int, d: Int, dr: Int,
        k: Int, balance: Double
    ) -> Reference {
        var u = [Double](repeating: 0, count: n * dr), hNorm = [Double](repeating: 0, count: n)
        for t in 0..<n {
            var h = [Double](repeating: 0, count: dr)
            for r in 0..<dr { for i in 0..<d { h[r] += proj[r * d + i] * x[t * d + i] } }
            let norm = h.map { $0 * $0 }.reduce(0, +).squareRoot()
            hNorm[t] = norm
            for r in 0..<dr { u[t * dr + r] = h[r] / norm }
        }
        var eHat = [Double](repeating: 0, count: E * dr), eNorm = [Double](repeating: 0, count: E)
        for e in 0..<E {
            let norm = (0..<dr).map { emb[e * dr + $0] * emb[e * dr + $0] }.reduce(0, +).squareRoot()
            eNorm[e] = norm
            for r in 0..<dr { eHat[e * dr + r] = emb[e * dr + r] / norm }
        }
        var scores = [Double](repeating: 0, count: n * E), probs = scores
        var index = [Int](), gates = [Double](), load = [Double](repeating: 0, count: E)
        for t in 0..<n {
            for e in 0..<E {
                var c = 0.0
                for r in 0..<dr { c += u[t * dr + r] * eHat[e * dr + r] }
                scores[t * E + e] = c / tau
            }
            let row = Array(scores[(t * E)..<(t * E + E)])
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
        return Reference(
            u: u, hNorm: hNorm, eHat: eHat, eNorm: eNorm, scores: scores, probs: probs, index: index,
            gates: gates, load: load, f: f, aux: balance * Double(E) * aux)
    }

    func reference(x: [Float], p: Params, n: Int, E: Int, d: Int, dr: Int, k: Int, balance: Double) -> Reference {
        Self.reference(
            x: x.map(Double.init), proj: p.proj.map(Double.init), emb: p.emb.map(Double.init), tau: p.tau,
            n: n, E: E, d: d, dr: dr, k: k, balance: balance)
    }

    struct Grads { var x: [Double], proj: [Double], emb: [Double], logTau: Double }

    /// Hand-derived gradients of  J = sum gw * g + gaux * aux  (f held constant):
    ///   ds from the kept softmax and the balance loss, d log tau = -sum ds s, dc = ds / tau,
    ///   du = dc e^, de^ = dc^T u, dh = (du - u (u.du)) / ||h||, de = (de^ - e^ (e^.de^)) / ||e||,
    ///   dx = dh P, dP = dh^T x.
    static func handGrads(
        _ ref: Reference, x: [Double], proj: [Double], tau: Double, gw: [Double]?, gaux: Double,
        balance: Double, n: Int, E: Int, d: Int, dr: Int, k: Int
    ) -> Grads {
        var ds = [Double](repeating: 0, count: n * E)
        for t in 0..<n {
            if let gw {
                for s in 0..<k {
                    for r in 0..<k {
                        let gs = ref.gates[t * k + s], gr = ref.gates[t * k + r]
                        ds[t * E + ref.index[t * k + r]] += gw[t * k + s] * gs * ((s == r ? 1 : 0) - gr)
                    }
                }
            }
            for e in 0..<E {
                let daux = gaux * balance * Double(E) * ref.f[e] / Double(n)
                for j in 0..<E {
                    let pe = ref.probs[t * E + e], pj = ref.probs[t * E + j]
                    ds[t * E + j] += daux * pe * ((e == j ? 1 : 0) - pj)
                }
            }
        }
        var logTau = 0.0
        for i in 0..<(n * E) { logTau -= ds[i] * ref.scores[i] }
        let dc = ds.map { $0 / tau }
        var dh = [Double](repeating: 0, count: n * dr), deHat = [Double](repeating: 0, count: E * dr)
        for t in 0..<n {
            for e in 0..<E {
                for r in 0..<dr {
                    dh[t * dr + r] += dc[t * E + e] * ref.eHat[e * dr + r]
                    deHat[e * dr + r] += dc[t * E + e] * ref.u[t * dr + r]
                }
            }
        }
        for t in 0..<n {
            let dot = (0..<dr).map { ref.u[t * dr + $0] * dh[t * dr + $0] }.reduce(0, +)
            for r in 0..<dr { dh[t * dr + r] = (dh[t * dr + r] - ref.u[t * dr + r] * dot) / ref.hNorm[t] }
        }
        var demb = deHat
        for e in 0..<E {
            let dot = (0..<dr).map { ref.eHat[e * dr + $0] * deHat[e * dr + $0] }.reduce(0, +)
            for r in 0..<dr { demb[e * dr + r] = (deHat[e * dr + r] - ref.eHat[e * dr + r] * dot) / ref.eNorm[e] }
        }
        var dx = [Double](repeating: 0, count: n * d), dP = [Double](repeating: 0, count: dr * d)
        for t in 0..<n {
            for r in 0..<dr {
                for i in 0..<d {
                    dx[t * d + i] += dh[t * dr + r] * proj[r * d + i]
                    dP[r * d + i] += dh[t * dr + r] * x[t * d + i]
                }
            }
        }
        return Grads(x: dx, proj: dP, emb: demb, logTau: logTau)
    }

    func handGrads(
        _ ref: Reference, x: [Float], p: Params, gw: [Float]?, gaux: Double, balance: Double,
        n: Int, E: Int, d: Int, dr: Int, k: Int
    ) -> Grads {
        Self.handGrads(
            ref, x: x.map(Double.init), proj: p.proj.map(Double.init), tau: p.tau, gw: gw?.map(Double.init),
            gaux: gaux, balance: balance, n: n, E: E, d: d, dr: dr, k: k)
    }

    // MARK: descriptor, schema, buffers

    func testDescriptorAndSchema() throws {
        let lib = try openPlugin("RouterXMoE")
        XCTAssertEqual(lib.name, "xmoe")
        XCTAssertEqual(lib.version, "1.0.0")
        XCTAssertEqual(lib.kind, .router)
        XCTAssertFalse(lib.hasNoGrad)
        XCTAssertFalse(lib.needsTokenIDs)
        XCTAssertEqual(
            lib.schema.map(\.name),
            ["k", "router_dim", "temperature", "temperature_mode", "embedding_norm", "balance_weight", "init_std"])
        let s = Dictionary(uniqueKeysWithValues: lib.schema.map { ($0.name, $0) })
        XCTAssertEqual(s["k"]?.type, .int)
        XCTAssertEqual(s["k"]?.defaultNumber, 2)
        XCTAssertEqual(s["k"]?.min, 1)
        XCTAssertEqual(s["k"]?.max, 64)
        XCTAssertEqual(s["router_dim"]?.type, .int)
        XCTAssertEqual(s["router_dim"]?.defaultNumber, 16)
        XCTAssertEqual(s["router_dim"]?.min, 1)
        XCTAssertEqual(s["router_dim"]?.max, 4096)
        XCTAssertEqual(s["temperature"]?.type, .float)
        XCTAssertEqual(s["temperature"]?.defaultNumber, 0.3)
        XCTAssertEqual(s["temperature_mode"]?.type, .string)
        XCTAssertEqual(s["temperature_mode"]?.defaultString, "learnable")
        XCTAssertEqual(s["temperature_mode"]?.choices, ["learnable", "fixed"])
        XCTAssertEqual(s["embedding_norm"]?.type, .float)
        XCTAssertEqual(s["embedding_norm"]?.defaultNumber, 0)
        XCTAssertEqual(s["embedding_norm"]?.min, 0)
        XCTAssertEqual(s["balance_weight"]?.defaultNumber, 0.01)
        XCTAssertEqual(s["balance_weight"]?.min, 0)
        XCTAssertEqual(s["init_std"]?.defaultNumber, 0.02)
        XCTAssertTrue(lib.schema.allSatisfy { !$0.description.isEmpty })
    }

    func testBuffersAndInit() throws {
        let lib = try openPlugin("RouterXMoE")
        let E = 8, d = 64
        let core = try makeInstance(lib, dims: ModelDims(dModel: d, nExperts: E), seed: 7)
        XCTAssertEqual(core.buffers.map(\.name), ["proj.weight", "expert_embeddings", "log_temperature"])
        XCTAssertTrue(core.buffers.allSatisfy { $0.isParameter && $0.grad != nil })
        let p = try XCTUnwrap(core.buffer("proj.weight")), e = try XCTUnwrap(core.buffer("expert_embeddings"))
        let t = try XCTUnwrap(core.buffer("log_temperature"))
        XCTAssertEqual(p.shape, [16, d])
        XCTAssertEqual(e.shape, [E, 16])
        XCTAssertEqual(t.shape, [1])
        XCTAssertEqual(t.flags & VQMOE_BUF_NO_DECAY, VQMOE_BUF_NO_DECAY)
        XCTAssertEqual(p.flags, 0)
        XCTAssertEqual(e.flags & VQMOE_BUF_NO_DECAY, VQMOE_BUF_NO_DECAY)
        // log_temperature = log(0.3): tau starts at the temperature hyperparameter.
        XCTAssertEqual(Double(t.floats[0]), log(0.3), accuracy: 1e-6)
        func stats(_ b: HostBuffer) -> (mean: Double, std: Double) {
            let v = Array(UnsafeBufferPointer(start: b.floats, count: b.count)).map(Double.init)
            let mean = v.reduce(0, +) / Double(v.count)
            return (mean, (v.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(v.count)).squareRoot())
        }
        // W_p ~ N(0, 0.02^2) (1024 draws), embeddings ~ N(0, 1) (128 draws).
        XCTAssertEqual(stats(p).std, 0.02, accuracy: 0.002)
        XCTAssertEqual(stats(p).mean, 0, accuracy: 0.002)
        XCTAssertEqual(stats(e).std, 1, accuracy: 0.15)
        XCTAssertEqual(stats(e).mean, 0, accuracy: 0.2)
        // Same seed, same buffers; another seed, other buffers; init_std scales W_p only.
        let again = try makeInstance(lib, dims: ModelDims(dModel: d, nExperts: E), seed: 7)
        for (a, b) in zip(core.buffers, again.buffers) {
            XCTAssertEqual(memcmp(a.data, b.data, a.byteCount), 0, a.name)
        }
        let other = try makeInstance(lib, dims: ModelDims(dModel: d, nExperts: E), seed: 8)
        XCTAssertNotEqual(memcmp(p.data, other.buffer("proj.weight")!.data, p.byteCount), 0)
        let wide = try makeInstance(
            lib, dims: ModelDims(dModel: d, nExperts: E),
            hyperparameters: ["init_std": 0.2, "router_dim": 16, "temperature": 0.07], seed: 7)
        for i in 0..<p.count { XCTAssertEqual(wide.buffer("proj.weight")!.floats[i], 10 * p.floats[i], accuracy: 1e-6) }
        XCTAssertEqual(memcmp(e.data, wide.buffer("expert_embeddings")!.data, e.byteCount), 0)
        XCTAssertEqual(Double(wide.buffer("log_temperature")!.floats[0]), log(0.07), accuracy: 1e-6)

        // Fixed temperature: no log_temperature buffer; router_dim sets d_r.
        let fixed = try makeInstance(
            lib, dims: ModelDims(dModel: d, nExperts: E),
            hyperparameters: ["temperature_mode": "fixed", "router_dim": 5])
        XCTAssertEqual(fixed.buffers.map(\.name), ["proj.weight", "expert_embeddings"])
        XCTAssertEqual(fixed.buffer("proj.weight")!.shape, [5, d])
        XCTAssertEqual(fixed.buffer("expert_embeddings")!.shape, [E, 5])
    }

    // MARK: errors

    func testBadHyperparametersAreErrors() throws {
        let lib = try openPlugin("RouterXMoE")
        let dims = ModelDims(dModel: 4, nExperts: 3)
        func message(_ hp: [String: Any], dims: ModelDims = ModelDims(dModel: 4, nExperts: 3)) -> String {
            do { _ = try makeInstance(lib, dims: dims, hyperparameters: hp); return "no error" } catch {
                return (error as? VQMoEError)?.message ?? "\(error)"
            }
        }
        var msg = message(["k": 4])
        XCTAssertTrue(msg.contains("k = 4") && msg.contains("n_experts = 3"), msg)
        XCTAssertTrue(msg.contains("INVALID_ARGUMENT") || msg.lowercased().contains("invalid"), msg)
        XCTAssertNoThrow(try makeInstance(lib, dims: dims, hyperparameters: ["k": 3]))
        msg = message(["temperature": 0.0])
        XCTAssertTrue(msg.contains("temperature") && msg.contains("> 0"), msg)
        msg = message(["temperature_mode": "annealed"])
        XCTAssertTrue(msg.contains("temperature_mode") && msg.contains("annealed"), msg)
        msg = message(["router_dim": 0])
        XCTAssertTrue(msg.contains("router_dim") && msg.contains("minimum"), msg)
        msg = message(["embedding_norm": -1.0])
        XCTAssertTrue(msg.contains("embedding_norm"), msg)
        msg = message([:], dims: ModelDims(dModel: 4, nExperts: 0))
        XCTAssertTrue(msg.contains("n_experts"), msg)
        msg = message([:], dims: ModelDims(dModel: 0, nExperts: 3))
        XCTAssertTrue(msg.contains("d_model"), msg)
    }

    func testNonFiniteInputIsANumericError() throws {
        let (r, _) = try makeRouter(E: E, d: d, hp: ["router_dim": dr])
        var x = randomNormal(3 * d, seed: 4)
        x[4] = .nan
        XCTAssertThrowsError(try forward(r, x: x, n: 3, k: 2, step: train())) { error in
            XCTAssertEqual((error as? VQMoEError)?.category, .numeric, "\(error)")
        }
    }

    // MARK: forward

    func checkForward(hp: [String: Any], n: Int = 23, E: Int = 4, d: Int = 5) throws {
        let k = hp["k"] as? Int ?? 2, dr = hp["router_dim"] as? Int ?? 16
        let balance = hp["balance_weight"] as? Double ?? 0.01
        let (r, p) = try makeRouter(E: E, d: d, hp: hp)
        let x = randomNormal(n * d, seed: 11)
        let out = try forward(r, x: x, n: n, k: k, step: train())
        let ref = reference(x: x, p: p, n: n, E: E, d: d, dr: dr, k: k, balance: balance)
        XCTAssertEqual(out.index.map(Int.init), ref.index, "\(hp)")
        for i in 0..<(n * k) { XCTAssertEqual(Double(out.weights[i]), ref.gates[i], accuracy: 1e-5, "\(hp)") }
        for t in 0..<n { XCTAssertEqual(out.weights[(t * k)..<(t * k + k)].reduce(0, +), 1, accuracy: 1e-5) }
        XCTAssertEqual(out.load.map(Double.init), ref.load, "\(hp)")
        XCTAssertEqual(Double(out.aux), ref.aux, accuracy: 1e-6 + 1e-5 * abs(ref.aux), "\(hp)")
        XCTAssertNotNil(out.ctx)
    }

    func testForwardMatchesReference() throws {
        try checkForward(hp: ["router_dim": 3])
        try checkForward(hp: ["router_dim": 3, "k": 1, "balance_weight": 0.5])
        try checkForward(hp: ["router_dim": 7, "k": 4, "balance_weight": 1.0])  // k = E
        try checkForward(hp: ["router_dim": 2, "k": 3, "balance_weight": 0.0, "temperature": 0.07])
        try checkForward(hp: ["router_dim": 4, "temperature_mode": "fixed", "temperature": 0.5, "balance_weight": 0.2])
        try checkForward(hp: [:], E: 6, d: 9)  // default d_r = 16 > d
    }

    func testScoresAreCosinesOverTemperatureOnHandExample() throws {
        // d = d_r = 2, W_p = I, e_0 = (3,0), e_1 = (0,0.5), e_2 = (-1,-1): x = (1,1) has cosines
        // (1/sqrt2, 1/sqrt2, -1); tau = 0.5 fixed -> scores (sqrt2, sqrt2, -2): the tie keeps
        // expert 0 first, weights 1/2 each.
        let (r, _) = try makeRouter(
            E: 3, d: 2,
            hp: [
                "router_dim": 2, "temperature_mode": "fixed", "temperature": 0.5,
                "balance_weight": 1.0,
            ])
        r.core.buffer("proj.weight")!.floats.update(from: [1, 0, 0, 1], count: 4)
        r.core.buffer("expert_embeddings")!.floats.update(from: [3, 0, 0, 0.5, -1, -1], count: 6)
        let out = try forward(r, x: [1, 1, 4, 0], n: 2, k: 2, step: train())
        XCTAssertEqual(out.index, [0, 1, 0, 1])
        XCTAssertEqual(out.weights[0], 0.5, accuracy: 1e-6)
        // x = (4,0): cosines (1, 0, -1/sqrt2) -> scores (2, 0, -sqrt2): g_0 = 1/(1+e^-2).
        XCTAssertEqual(Double(out.weights[2]), 1 / (1 + exp(-2.0)), accuracy: 1e-6)
        XCTAssertEqual(out.load, [2, 2, 0])
        // aux = E * sum_e f_e P_e with f = (1/2, 1/2, 0).
        let r2 = Double(2).squareRoot()
        let s1 = [r2, r2, -2.0], s2 = [2.0, 0, -r2]
        func softmax(_ v: [Double]) -> [Double] { let z = v.map { exp($0) }.reduce(0, +); return v.map { exp($0) / z } }
        let p1 = softmax(s1), p2 = softmax(s2)
        let aux = 3 * (0.5 * (p1[0] + p2[0]) / 2 + 0.5 * (p1[1] + p2[1]) / 2)
        XCTAssertEqual(Double(out.aux), aux, accuracy: 1e-6)
    }

    func testEvalAndNoGradSaveNoContext() throws {
        let (r, _) = try makeRouter(E: E, d: d, hp: ["router_dim": dr])
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
        XCTAssertEqual(noGrad.weights, tr.weights)
    }

    // MARK: backward

    /// The hand-derived reference gradients agree with central differences of the Double
    /// reference objective (so the reference itself is right).
    func testHandGradientsMatchFiniteDifferencesInDouble() throws {
        let n = 7, k = 2, balance = 0.7, gaux = 1.3, E = 4, d = 5, dr = 3
        let x = randomNormal(n * d, seed: 41).map(Double.init)
        let proj = randomNormal(dr * d, seed: 42, scale: 0.6).map(Double.init)
        let emb = randomNormal(E * dr, seed: 43).map(Double.init)
        let logTau = log(0.3) + 0.1
        let gw = randomNormal(n * k, seed: 44).map(Double.init)
        /// Parameters as one flat vector: x, proj, emb, log tau.
        let theta = x + proj + emb + [logTau]
        func objective(_ v: [Double]) -> (Double, [Int]) {
            let xs = Array(v[0..<x.count]), ps = Array(v[x.count..<(x.count + proj.count)])
            let es = Array(v[(x.count + proj.count)..<(v.count - 1)])
            let ref = Self.reference(
                x: xs, proj: ps, emb: es, tau: exp(v[v.count - 1]), n: n, E: E, d: d, dr: dr, k: k, balance: balance)
            var value = gaux * ref.aux
            for i in 0..<(n * k) { value += gw[i] * ref.gates[i] }
            return (value, ref.index)
        }
        let ref = Self.reference(
            x: x, proj: proj, emb: emb, tau: exp(logTau), n: n, E: E, d: d, dr: dr, k: k, balance: balance)
        let hand = Self.handGrads(
            ref, x: x, proj: proj, tau: exp(logTau), gw: gw, gaux: gaux, balance: balance,
            n: n, E: E, d: d, dr: dr, k: k)
        let handFlat = hand.x + hand.proj + hand.emb + [hand.logTau]
        let h = 1e-6
        var checked = 0
        for i in 0..<theta.count {
            var plus = theta, minus = theta
            plus[i] += h
            minus[i] -= h
            let (fp, ip) = objective(plus), (fm, im) = objective(minus)
            guard ip == ref.index && im == ref.index else { continue }
            checked += 1
            let g = (fp - fm) / (2 * h)
            XCTAssertEqual(handFlat[i], g, accuracy: 1e-6 * max(1, abs(g)), "coordinate \(i)")
        }
        XCTAssertEqual(checked, x.count + proj.count + emb.count + 1)
        // Non-trivial gradients (the check above is not comparing zeros).
        XCTAssertGreaterThan(hand.x.map(abs).max()!, 1e-2)
        XCTAssertGreaterThan(hand.emb.map(abs).max()!, 1e-2)
        XCTAssertGreaterThan(abs(hand.logTau), 1e-2)
    }

    func checkBackward(hp: [String: Any], gradWeightsPresent: Bool, gaux: Float, frozen: Bool = false) throws {
        let n = 19, E = 4, d = 5
        let k = hp["k"] as? Int ?? 2, dr = hp["router_dim"] as? Int ?? 16
        let balance = hp["balance_weight"] as? Double ?? 0.01
        let (r, p) = try makeRouter(E: E, d: d, hp: hp, seed: 4)
        let x = randomNormal(n * d, seed: 21)
        let out = try forward(r, x: x, n: n, k: k, step: train(frozen: frozen))
        let ctx = try XCTUnwrap(out.ctx)
        let ref = reference(x: x, p: p, n: n, E: E, d: d, dr: dr, k: k, balance: balance)
        let gw = gradWeightsPresent ? randomNormal(n * k, seed: 31) : nil
        // Gradients accumulate: start from non-zero grad_x and parameter grads.
        for b in r.core.parameters { b.grad!.update(repeating: 0.25, count: b.count) }
        var gx = [Float](repeating: 1, count: n * d)
        try backward(r, ctx, n: n, k: k, gw: gw, gaux: gaux, gradX: &gx)
        let want = handGrads(
            ref, x: x, p: p, gw: gw, gaux: Double(gaux), balance: balance, n: n, E: E, d: d, dr: dr, k: k)
        let label = "\(hp) gw \(gradWeightsPresent) gaux \(gaux) frozen \(frozen)"
        for i in 0..<(n * d) {
            XCTAssertEqual(
                Double(gx[i]), 1 + want.x[i], accuracy: 1e-4 * max(1, abs(want.x[i])), "grad_x[\(i)] \(label)")
        }
        let gP = r.core.buffer("proj.weight")!.grad!, gE = r.core.buffer("expert_embeddings")!.grad!
        for i in 0..<(dr * d) {
            XCTAssertEqual(
                Double(gP[i]), 0.25 + (frozen ? 0 : want.proj[i]), accuracy: 1e-4 * max(1, abs(want.proj[i])),
                "grad_P[\(i)] \(label)")
        }
        for i in 0..<(E * dr) {
            XCTAssertEqual(
                Double(gE[i]), 0.25 + (frozen ? 0 : want.emb[i]), accuracy: 1e-4 * max(1, abs(want.emb[i])),
                "grad_e[\(i)] \(label)")
        }
        if let gT = r.core.buffer("log_temperature")?.grad {
            XCTAssertEqual(
                Double(gT[0]), 0.25 + (frozen ? 0 : want.logTau), accuracy: 1e-4 * max(1, abs(want.logTau)),
                "grad_logtau \(label)")
        }
        if !frozen && (gradWeightsPresent && k > 1 || balance > 0 && gaux != 0) {
            XCTAssertGreaterThan(want.x.map(abs).max()!, 1e-3, "the check compares real gradients")
        }
    }

    func testBackwardMatchesHandGradients() throws {
        try checkBackward(hp: ["router_dim": 3], gradWeightsPresent: true, gaux: 1)
        try checkBackward(hp: ["router_dim": 3, "k": 3, "balance_weight": 0.7], gradWeightsPresent: true, gaux: 1.5)
        // weights constant 1
        try checkBackward(hp: ["router_dim": 3, "k": 1, "balance_weight": 0.2], gradWeightsPresent: true, gaux: 1)
        // balance loss alone
        try checkBackward(hp: ["router_dim": 4, "balance_weight": 0.4], gradWeightsPresent: false, gaux: 2)
        // routing weights alone
        try checkBackward(hp: ["router_dim": 4, "balance_weight": 0.4], gradWeightsPresent: true, gaux: 0)
        try checkBackward(
            hp: ["router_dim": 2, "temperature_mode": "fixed", "temperature": 0.2, "balance_weight": 0.3],
            gradWeightsPresent: true, gaux: 1)
        try checkBackward(hp: [:], gradWeightsPresent: true, gaux: 1)  // d_r = 16 > d
        try checkBackward(
            hp: ["router_dim": 3, "balance_weight": 0.3], gradWeightsPresent: true, gaux: 1, frozen: true)
    }

    func testBackwardUsesForwardTimeValues() throws {
        // Changing the parameters after forward must not change the gradients.
        let n = 8, k = 2
        let (r, p) = try makeRouter(E: E, d: d, hp: ["router_dim": dr])
        let x = randomNormal(n * d, seed: 12)
        let out = try forward(r, x: x, n: n, k: k, step: train())
        let gw = randomNormal(n * k, seed: 13)
        for b in r.core.parameters { b.floats.update(repeating: 3, count: b.count) }
        var gx = [Float](repeating: 0, count: n * d)
        try backward(r, try XCTUnwrap(out.ctx), n: n, k: k, gw: gw, gaux: 1, gradX: &gx)
        let ref = reference(x: x, p: p, n: n, E: E, d: d, dr: dr, k: k, balance: 0.01)
        let want = handGrads(ref, x: x, p: p, gw: gw, gaux: 1, balance: 0.01, n: n, E: E, d: d, dr: dr, k: k)
        for i in 0..<(n * d) { XCTAssertEqual(Double(gx[i]), want.x[i], accuracy: 1e-4 * max(1, abs(want.x[i]))) }
        XCTAssertEqual(
            Double(r.core.buffer("log_temperature")!.grad![0]), want.logTau, accuracy: 1e-4 * max(1, abs(want.logTau)))
    }

    func testLargerProblemOnTwoThreads() throws {
        let threads = HostRuntime.threads
        HostRuntime.configure(threads: 2)
        defer { HostRuntime.configure(threads: threads) }
        let n = 600, E = 16, d = 24, k = 4, dr = 8
        let hp: [String: Any] = ["k": k, "router_dim": dr, "balance_weight": 0.1]
        let (r, p) = try makeRouter(E: E, d: d, hp: hp, seed: 2)
        let x = randomNormal(n * d, seed: 5)
        let out = try forward(r, x: x, n: n, k: k, step: train())
        let ref = reference(x: x, p: p, n: n, E: E, d: d, dr: dr, k: k, balance: 0.1)
        XCTAssertEqual(out.index.map(Int.init), ref.index)
        for i in 0..<(n * k) { XCTAssertEqual(Double(out.weights[i]), ref.gates[i], accuracy: 1e-5) }
        XCTAssertEqual(out.load.map(Double.init), ref.load)
        XCTAssertEqual(Double(out.aux), ref.aux, accuracy: 1e-5 * ref.aux)
        let gw = randomNormal(n * k, seed: 6)
        var gx = [Float](repeating: 0, count: n * d)
        try backward(r, try XCTUnwrap(out.ctx), n: n, k: k, gw: gw, gaux: 1, gradX: &gx)
        let want = handGrads(ref, x: x, p: p, gw: gw, gaux: 1, balance: 0.1, n: n, E: E, d: d, dr: dr, k: k)
        for i in 0..<(n * d) { XCTAssertEqual(Double(gx[i]), want.x[i], accuracy: 1e-4 * max(1, abs(want.x[i]))) }
        let gP = r.core.buffer("proj.weight")!.grad!, gE = r.core.buffer("expert_embeddings")!.grad!
        for i in 0..<(dr * d) {
            XCTAssertEqual(Double(gP[i]), want.proj[i], accuracy: 1e-4 * max(1, abs(want.proj[i])))
        }
        for i in 0..<(E * dr) { XCTAssertEqual(Double(gE[i]), want.emb[i], accuracy: 1e-4 * max(1, abs(want.emb[i]))) }
        let gT = Double(r.core.buffer("log_temperature")!.grad![0])
        XCTAssertEqual(gT, want.logTau, accuracy: 1e-4 * max(1, abs(want.logTau)))
    }

    // MARK: begin_step: expert-embedding rescale

    func testBeginStepRescalesExpertEmbeddings() throws {
        let (r, p) = try makeRouter(E: E, d: d, hp: ["router_dim": dr, "embedding_norm": 1.5])
        let eBuf = r.core.buffer("expert_embeddings")!
        // Row 2 all zero: left alone (no direction to keep).
        for i in 0..<dr { eBuf.floats[2 * dr + i] = 0 }
        var before = p.emb
        for i in 0..<dr { before[2 * dr + i] = 0 }
        let x = randomNormal(9 * d, seed: 3)
        let out0 = try forward(r, x: x, n: 9, k: 2, step: train())

        // FROZEN: no change.
        try r.core.beginStep(train(0, frozen: true))
        XCTAssertEqual(Array(UnsafeBufferPointer(start: eBuf.floats, count: E * dr)), before)

        try r.core.beginStep(train(0))
        for e in 0..<E {
            let old = (0..<dr).map { Double(before[e * dr + $0]) }
            let new = (0..<dr).map { Double(eBuf.floats[e * dr + $0]) }
            let oldNorm = old.map { $0 * $0 }.reduce(0, +).squareRoot()
            if oldNorm == 0 { XCTAssertEqual(new, old); continue }
            // Brute force: e <- 1.5 e / ||e||, same direction.
            for i in 0..<dr { XCTAssertEqual(new[i], 1.5 * old[i] / oldNorm, accuracy: 1e-6, "row \(e)") }
            XCTAssertEqual(new.map { $0 * $0 }.reduce(0, +).squareRoot(), 1.5, accuracy: 1e-6)
        }
        // The projection and temperature are untouched.
        XCTAssertEqual(Array(UnsafeBufferPointer(start: r.core.buffer("proj.weight")!.floats, count: dr * d)), p.proj)
        // Cosine scores are scale-invariant: the routing is the same after the rescale.
        let out1 = try forward(r, x: x, n: 9, k: 2, step: train(1))
        XCTAssertEqual(out1.index, out0.index)
        for i in 0..<out0.weights.count { XCTAssertEqual(out1.weights[i], out0.weights[i], accuracy: 1e-6) }
        // Idempotent (a second call at the same norm changes nothing beyond rounding).
        let once = Array(UnsafeBufferPointer(start: eBuf.floats, count: E * dr))
        try r.core.beginStep(train(1))
        for i in 0..<(E * dr) { XCTAssertEqual(eBuf.floats[i], once[i], accuracy: 1e-6) }

        // embedding_norm = 0 (default): begin_step leaves the embeddings alone.
        let (plain, pp) = try makeRouter(E: E, d: d, hp: ["router_dim": dr])
        try plain.core.beginStep(train(0))
        XCTAssertEqual(
            Array(UnsafeBufferPointer(start: plain.core.buffer("expert_embeddings")!.floats, count: E * dr)), pp.emb)
    }

    func testRescaleChangesEmbeddingGradientByInverseNorm() throws {
        // d s / d e = (I - e^ e^T) / ||e|| ...: after the rescale the embedding gradient is the
        // old one times ||e_old|| / 1.5 (the other gradients are unchanged).
        let n = 11, k = 2
        let hp: [String: Any] = ["router_dim": dr, "embedding_norm": 1.5, "balance_weight": 0.2]
        let (r, p) = try makeRouter(E: E, d: d, hp: hp)
        let x = randomNormal(n * d, seed: 17), gw = randomNormal(n * k, seed: 18)
        func grads() throws -> ([Float], [Float]) {
            r.core.zeroGrads()
            let out = try forward(r, x: x, n: n, k: k, step: train())
            var gx = [Float](repeating: 0, count: n * d)
            try backward(r, try XCTUnwrap(out.ctx), n: n, k: k, gw: gw, gaux: 1, gradX: &gx)
            return (gx, Array(UnsafeBufferPointer(start: r.core.buffer("expert_embeddings")!.grad!, count: E * dr)))
        }
        let (gx0, ge0) = try grads()
        try r.core.beginStep(train(0))
        let (gx1, ge1) = try grads()
        for i in 0..<(n * d) { XCTAssertEqual(gx1[i], gx0[i], accuracy: 1e-5) }
        for e in 0..<E {
            let norm = (0..<dr).map { Double(p.emb[e * dr + $0]) * Double(p.emb[e * dr + $0]) }.reduce(0, +)
                .squareRoot()
            for i in 0..<dr {
                XCTAssertEqual(
                    Double(ge1[e * dr + i]), Double(ge0[e * dr + i]) * norm / 1.5,
                    accuracy: 1e-5 * max(1, abs(Double(ge0[e * dr + i]))))
            }
        }
    }

    // MARK: temperature

    func testTemperatureModesAndMetrics() throws {
        // Learnable: tau comes from the buffer (changing log_temperature changes the weights).
        let n = 6, x = randomNormal(n * 5, seed: 8)
        let (r, p) = try makeRouter(E: 4, d: 5, hp: ["router_dim": 3])
        let a = try forward(r, x: x, n: n, k: 2, step: train())
        r.core.buffer("log_temperature")!.floats[0] = Float(log(2.0))
        let b = try forward(r, x: x, n: n, k: 2, step: train())
        var q = p
        q.tau = 2
        let ref = reference(x: x, p: q, n: n, E: 4, d: 5, dr: 3, k: 2, balance: 0.01)
        for i in 0..<(n * 2) { XCTAssertEqual(Double(b.weights[i]), ref.gates[i], accuracy: 1e-5) }
        XCTAssertNotEqual(a.weights, b.weights)
        let m = try r.core.metrics()
        XCTAssertEqual(m["temperature"]?.first ?? 0, 2, accuracy: 1e-6)
        let meanNorm =
            (0..<4).map { e in
                (0..<3).map { Double(p.emb[e * 3 + $0]) * Double(p.emb[e * 3 + $0]) }.reduce(0, +).squareRoot()
            }
            .reduce(0, +) / 4
        XCTAssertEqual(m["expert_embedding_norm"]?.first ?? 0, meanNorm, accuracy: 1e-5)

        // Fixed: tau = temperature, no parameter, reported as such.
        let (f, _) = try makeRouter(
            E: 4, d: 5, hp: ["router_dim": 3, "temperature_mode": "fixed", "temperature": 0.25])
        XCTAssertNil(f.core.buffer("log_temperature"))
        XCTAssertEqual(try f.core.metrics()["temperature"]?.first ?? 0, 0.25, accuracy: 1e-7)
    }

    // MARK: the framework's gradcheck

    func testPluginChecker() throws {
        let lib = try openPlugin("RouterXMoE")
        let configs: [[String: Any]] = [
            [:],
            ["temperature_mode": "fixed", "k": 3, "balance_weight": 0.5],
            ["embedding_norm": 1.5, "router_dim": 3, "init_std": 0.5, "temperature": 0.07],
            ["k": 1, "balance_weight": 1.0, "init_std": 1.0],
            ["init_std": 1.0, "temperature": 1.0],
        ]
        for hp in configs {
            let results = PluginChecker(library: lib, hyperparameters: hp).run()
            XCTAssertTrue(
                results.allSatisfy(\.passed),
                "\(hp): " + results.filter { !$0.passed }.map(\.description).joined(separator: "\n"))
            XCTAssertTrue(results.contains { $0.name == "gradcheck expert_embeddings" }, "\(hp)")
        }
    }
}
