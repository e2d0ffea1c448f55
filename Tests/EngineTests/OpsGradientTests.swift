import Foundation
import VQMoE
import XCTest

/// Every op's backward against central finite differences of Σ r·forward(...) for random r.
final class OpsGradientTests: XCTestCase {
    func testLinear() {
        let n = 5, i = 7, o = 6
        var x = normals(n * i, seed: 1), w = normals(o * i, seed: 2), b = normals(o, seed: 3)
        let r = normals(n * o, seed: 4)
        var y = [Float](repeating: 0, count: n * o)
        func f() -> Double {
            Linear.forward(out: &y, inp: x, weight: w, bias: b, n: n, inFeatures: i, outFeatures: o)
            return weightedSum(y, r)
        }
        var dx = [Float](repeating: 0.5, count: n * i), dw = [Float](repeating: 0, count: o * i),
            db = [Float](repeating: 0, count: o)
        Linear.backward(
            dinp: &dx, dweight: &dw, dbias: &db, dout: r, inp: x, weight: w, n: n, inFeatures: i, outFeatures: o)
        for k in 0..<(n * i) { dx[k] -= 0.5 }  // backward accumulates (+=)
        assertGradient("x", target: &x, count: n * i, analytic: dx, objective: f)
        assertGradient("w", target: &w, count: o * i, analytic: dw, objective: f)
        assertGradient("b", target: &b, count: o, analytic: db, objective: f)
    }

    func testLayerNorm() {
        let n = 4, c = 10
        var x = normals(n * c, seed: 5, scale: 2), g = normals(c, seed: 6), b = normals(c, seed: 7)
        let r = normals(n * c, seed: 8)
        var y = [Float](repeating: 0, count: n * c), mean = [Float](repeating: 0, count: n),
            rstd = [Float](repeating: 0, count: n)
        func f() -> Double {
            LayerNorm.forward(out: &y, mean: &mean, rstd: &rstd, inp: x, weight: g, bias: b, n: n, c: c)
            return weightedSum(y, r)
        }
        _ = f()
        var dx = [Float](repeating: 0, count: n * c), dg = [Float](repeating: 0, count: c),
            db = [Float](repeating: 0, count: c)
        LayerNorm.backward(
            dinp: &dx, dweight: &dg, dbias: &db, dout: r, inp: x, weight: g, mean: mean, rstd: rstd, n: n, c: c)
        assertGradient("x", target: &x, count: n * c, analytic: dx, eps: 1e-3, objective: f)
        assertGradient("gamma", target: &g, count: c, analytic: dg, objective: f)
        assertGradient("beta", target: &b, count: c, analytic: db, objective: f)
        // Normalised rows: mean 0, variance 1 before the affine part.
        LayerNorm.forward(
            out: &y, mean: &mean, rstd: &rstd, inp: x, weight: [Float](repeating: 1, count: c),
            bias: [Float](repeating: 0, count: c), n: n, c: c)
        XCTAssertEqual(Double(y[0..<c].reduce(0, +)), 0, accuracy: 1e-5)
        XCTAssertEqual(Double(y[0..<c].map { $0 * $0 }.reduce(0, +)) / Double(c), 1, accuracy: 1e-3)
    }

    func testActivations() {
        for act in Activation.allCases {
            let n = 50
            var x = normals(n, seed: 9, scale: 2)
            for k in 0..<n where abs(x[k]) < 0.05 { x[k] += 0.2 }  // keep ReLU away from its kink
            let r = normals(n, seed: 10)
            var y = [Float](repeating: 0, count: n)
            func f() -> Double { act.forward(out: &y, inp: x, count: n); return weightedSum(y, r) }
            var dx = [Float](repeating: 0, count: n)
            act.backward(dinp: &dx, dout: r, inp: x, count: n)
            assertGradient("\(act)", target: &x, count: n, analytic: dx, eps: 1e-3, objective: f)
        }
        // Exact GELU values: x·Φ(x).
        var y = [Float](repeating: 0, count: 3)
        Activation.gelu.forward(out: &y, inp: [-1, 0, 2], count: 3)
        XCTAssertEqual(y[0], -0.15865525, accuracy: 1e-6)
        XCTAssertEqual(y[1], 0, accuracy: 1e-7)
        XCTAssertEqual(y[2], 1.9544997, accuracy: 1e-6)
    }

    func testAttentionMatchesReferenceAndGradients() {
        for (b, t, c, h) in [(2, 5, 8, 2), (1, 70, 8, 1)] {  // the second crosses a 64-row block
            let n = b * t
            var qkv = normals(n * 3 * c, seed: 11)
            let r = normals(n * c, seed: 12)
            var y = [Float](repeating: 0, count: n * c), att = [Float](repeating: 0, count: b * h * t * t)
            func f() -> Double {
                Attention.forward(y: &y, att: &att, qkv: qkv, b: b, t: t, c: c, heads: h)
                return weightedSum(y, r)
            }
            _ = f()
            // Brute-force reference for one (batch, head, query).
            let dh = c / h, bi = b - 1, hh = h - 1, i = t - 1
            var scores = [Double](repeating: 0, count: i + 1)
            for j in 0...i {
                var s = 0.0
                for k in 0..<dh {
                    s +=
                        Double(qkv[(bi * t + i) * 3 * c + hh * dh + k])
                        * Double(qkv[(bi * t + j) * 3 * c + c + hh * dh + k])
                }
                scores[j] = s / Double(dh).squareRoot()
            }
            let m = scores.max()!, e = scores.map { exp($0 - m) }, z = e.reduce(0, +)
            for k in 0..<dh {
                var out = 0.0
                for j in 0...i { out += e[j] / z * Double(qkv[(bi * t + j) * 3 * c + 2 * c + hh * dh + k]) }
                XCTAssertEqual(Double(y[(bi * t + i) * c + hh * dh + k]), out, accuracy: 1e-5)
            }
            var dqkv = [Float](repeating: 0, count: n * 3 * c)
            Attention.backward(dqkv: &dqkv, dy: r, qkv: qkv, att: att, b: b, t: t, c: c, heads: h)
            assertGradient("qkv", target: &qkv, count: n * 3 * c, analytic: dqkv, eps: 1e-3, sample: 96, objective: f)
        }
    }

    /// Full (non-causal) attention, as the ViT uses: every query sees every key.
    func testBidirectionalAttention() {
        let b = 2, t = 70, c = 8, h = 2, n = b * t
        var qkv = normals(n * 3 * c, seed: 41)
        let r = normals(n * c, seed: 42)
        var y = [Float](repeating: 0, count: n * c), att = [Float](repeating: 0, count: b * h * t * t)
        func f() -> Double {
            Attention.forward(y: &y, att: &att, qkv: qkv, b: b, t: t, c: c, heads: h, causal: false)
            return weightedSum(y, r)
        }
        _ = f()
        let dh = c / h, i = 3  // an early query that a causal mask would restrict
        var scores = [Double](repeating: 0, count: t)
        for j in 0..<t {
            var s = 0.0
            for k in 0..<dh { s += Double(qkv[i * 3 * c + k]) * Double(qkv[j * 3 * c + c + k]) }
            scores[j] = s / Double(dh).squareRoot()
        }
        let m = scores.max()!, e = scores.map { exp($0 - m) }, z = e.reduce(0, +)
        for k in 0..<dh {
            var out = 0.0
            for j in 0..<t { out += e[j] / z * Double(qkv[j * 3 * c + 2 * c + k]) }
            XCTAssertEqual(Double(y[i * c + k]), out, accuracy: 1e-5)
        }
        var dqkv = [Float](repeating: 0, count: n * 3 * c)
        Attention.backward(dqkv: &dqkv, dy: r, qkv: qkv, att: att, b: b, t: t, c: c, heads: h, causal: false)
        assertGradient("qkv", target: &qkv, count: n * 3 * c, analytic: dqkv, eps: 1e-3, sample: 96, objective: f)
    }

    func testAttentionIsThreadCountIndependent() {
        let b = 3, t = 20, c = 16, h = 4, n = b * t
        let qkv = normals(n * 3 * c, seed: 13)
        var y1 = [Float](repeating: 0, count: n * c), y2 = y1, att = [Float](repeating: 0, count: b * h * t * t)
        HostRuntime.configure(threads: 1)
        Attention.forward(y: &y1, att: &att, qkv: qkv, b: b, t: t, c: c, heads: h)
        HostRuntime.configure(threads: 2)
        Attention.forward(y: &y2, att: &att, qkv: qkv, b: b, t: t, c: c, heads: h)
        HostRuntime.configure(threads: 1)
        XCTAssertEqual(y1, y2)
    }

    func testEmbeddingAndDropout() {
        let b = 2, t = 3, c = 4, v = 5
        var wte = normals(v * c, seed: 14), wpe = normals(t * c, seed: 15)
        let tokens: [Int32] = [1, 4, 1, 0, 2, 3]
        let r = normals(b * t * c, seed: 16)
        var y = [Float](repeating: 0, count: b * t * c)
        func f() -> Double {
            Embedding.forward(out: &y, tokens: tokens, wte: wte, wpe: wpe, b: b, t: t, c: c); return weightedSum(y, r)
        }
        var dwte = [Float](repeating: 0, count: v * c), dwpe = [Float](repeating: 0, count: t * c)
        Embedding.backward(dwte: &dwte, dwpe: &dwpe, dout: r, tokens: tokens, b: b, t: t, c: c)
        assertGradient("wte", target: &wte, count: v * c, analytic: dwte, objective: f)
        assertGradient("wpe", target: &wpe, count: t * c, analytic: dwpe, objective: f)

        let n = 10_000
        let x = [Float](repeating: 1, count: n)
        var out = [Float](repeating: 0, count: n), mask = [Float](repeating: 0, count: n)
        Dropout.forward(out: &out, mask: &mask, inp: x, count: n, p: 0.25, seed: 3)
        let kept = mask.filter { $0 != 0 }.count
        XCTAssertEqual(Double(kept) / Double(n), 0.75, accuracy: 0.02)
        XCTAssertTrue(mask.allSatisfy { $0 == 0 || abs($0 - 1 / 0.75) < 1e-6 })
        var dx = [Float](repeating: 0, count: n)
        Dropout.backward(dinp: &dx, dout: x, mask: mask, count: n)
        XCTAssertEqual(dx, mask)
    }

    /// HostRuntime.sgemm against a plain triple loop for every transpose pair, with padded
    /// leading dimensions, for products with one row or one column (sent to SGEMV) and a general
    /// one; β = 0 must ignore NaN already in C.
    func testSgemmMatrixVectorShapes() {
        var r = HostRNG.make(seed: 31, stream: 0)
        for (m, n, k) in [(1, 5, 3), (4, 1, 3), (1, 1, 3), (3, 4, 2)] {
            for transA in [false, true] {
                for transB in [false, true] {
                    for beta: Float in [0, 0.5] {
                        let lda = (transA ? m : k) + 2, ldb = (transB ? k : n) + 1, ldc = n + 3
                        let a = (0..<((transA ? k : m) * lda)).map { _ in HostRNG.normal(&r) }
                        let b = (0..<((transB ? n : k) * ldb)).map { _ in HostRNG.normal(&r) }
                        let c0 = (0..<(m * ldc)).map { _ in beta == 0 ? Float.nan : HostRNG.normal(&r) }
                        var c = c0
                        HostRuntime.sgemm(
                            transA: transA, transB: transB, m: m, n: n, k: k, alpha: 1.5, a: a, lda: lda, b: b,
                            ldb: ldb,
                            beta: beta, c: &c, ldc: ldc)
                        for i in 0..<m {
                            for j in 0..<n {
                                var sum: Float = 0
                                for p in 0..<k {
                                    sum +=
                                        (transA ? a[p * lda + i] : a[i * lda + p])
                                        * (transB ? b[j * ldb + p] : b[p * ldb + j])
                                }
                                let want = 1.5 * sum + (beta == 0 ? 0 : beta * c0[i * ldc + j])
                                XCTAssertEqual(
                                    c[i * ldc + j], want, accuracy: 1e-5,
                                    "m \(m) n \(n) k \(k) transA \(transA) transB \(transB) beta \(beta) [\(i),\(j)]")
                            }
                        }
                    }
                }
            }
        }
    }
}
