import Foundation
import VQMoE
import XCTest

/// Transformer-XL's relative attention: a brute-force reference of the scores
/// ((q+u)·k_j + (q+v)·r_{M+i−j}) / √Dh over [memory; segment], finite differences for every
/// input (qkv, r, u, v), and the sinusoid table.
final class RelativeAttentionTests: XCTestCase {
    /// y[b, i, head] from the definition, in Double. r rows in Transformer-XL order (row m = distance K−1−m).
    func reference(
        qkv: [Float], r: [Float], u: [Float], v: [Float], b bi: Int, i: Int, head: Int,
        t: Int, mem: Int, c: Int, heads: Int
    ) -> [Double] {
        let dh = c / heads, keys = mem + t, ld = 3 * c
        func q(_ k: Int) -> Double { Double(qkv[(bi * keys + mem + i) * ld + head * dh + k]) }
        var s = [Double](repeating: 0, count: mem + i + 1)
        for j in 0...(mem + i) {
            let d = mem + i - j, row = keys - 1 - d
            var a = 0.0
            for k in 0..<dh {
                let key = Double(qkv[(bi * keys + j) * ld + c + head * dh + k])
                a +=
                    (q(k) + Double(u[head * dh + k])) * key + (q(k) + Double(v[head * dh + k]))
                    * Double(r[row * c + head * dh + k])
            }
            s[j] = a / Double(dh).squareRoot()
        }
        let m = s.max()!, e = s.map { exp($0 - m) }, z = e.reduce(0, +)
        return (0..<dh).map { k in
            (0...(mem + i)).reduce(0.0) { $0 + e[$1] / z * Double(qkv[(bi * keys + $1) * ld + 2 * c + head * dh + k]) }
        }
    }

    func testMatchesReferenceAndGradients() {
        // (B, T, M, C, H): with and without memory; the last crosses a 64-row query block.
        for (b, t, mem, c, h) in [(2, 5, 3, 8, 2), (1, 6, 0, 4, 1), (1, 70, 9, 4, 1)] {
            let keys = mem + t
            var qkv = normals(b * keys * 3 * c, seed: 51), r = normals(keys * c, seed: 52)
            var u = normals(c, seed: 53), v = normals(c, seed: 54)
            let w = normals(b * t * c, seed: 55)
            var y = [Float](repeating: 0, count: b * t * c), att = [Float](repeating: 0, count: b * h * t * keys)
            func f() -> Double {
                RelativeAttention.forward(
                    y: &y, att: &att, qkv: qkv, r: r, u: u, v: v, b: b, t: t, mem: mem, c: c, heads: h)
                return weightedSum(y, w)
            }
            _ = f()
            let dh = c / h
            for (bi, i, head) in [(b - 1, t - 1, h - 1), (0, 0, 0), (0, t / 2, 0)] {
                let ref = reference(qkv: qkv, r: r, u: u, v: v, b: bi, i: i, head: head, t: t, mem: mem, c: c, heads: h)
                for k in 0..<dh {
                    XCTAssertEqual(
                        Double(y[(bi * t + i) * c + head * dh + k]), ref[k], accuracy: 1e-5, "B\(b) T\(t) M\(mem)")
                }
            }
            // Rows of P sum to 1 over the visible keys and are 0 beyond them.
            for i in 0..<t {
                let row = att[(i * keys)..<((i + 1) * keys)]
                XCTAssertEqual(Double(row.prefix(mem + i + 1).reduce(0, +)), 1, accuracy: 1e-5)
                XCTAssertTrue(row.dropFirst(mem + i + 1).allSatisfy { $0 == 0 })
            }
            var dqkv = [Float](repeating: 0, count: b * keys * 3 * c), dr = [Float](repeating: 0, count: keys * c)
            var du = [Float](repeating: 0, count: c), dv = [Float](repeating: 0, count: c)
            var scratch = [Float](
                repeating: 0, count: RelativeAttention.scratchCount(b: b, t: t, mem: mem, c: c, heads: h))
            RelativeAttention.backward(
                dqkv: &dqkv, dr: &dr, du: &du, dv: &dv, dy: w, qkv: qkv, r: r, u: u, v: v, att: att,
                b: b, t: t, mem: mem, c: c, heads: h, scratch: &scratch)
            // The memory rows' queries are unused: no gradient.
            for bi in 0..<b {
                for j in 0..<mem { for k in 0..<c { XCTAssertEqual(dqkv[(bi * keys + j) * 3 * c + k], 0) } }
            }
            assertGradient("qkv", target: &qkv, count: qkv.count, analytic: dqkv, eps: 1e-3, sample: 128, objective: f)
            assertGradient("r", target: &r, count: r.count, analytic: dr, eps: 1e-3, sample: 96, objective: f)
            assertGradient("u", target: &u, count: c, analytic: du, eps: 1e-3, objective: f)
            assertGradient("v", target: &v, count: c, analytic: dv, eps: 1e-3, objective: f)
        }
    }

    func testThreadCountIndependent() {
        let b = 3, t = 20, mem = 7, c = 16, h = 4, keys = mem + t
        let qkv = normals(b * keys * 3 * c, seed: 56), r = normals(keys * c, seed: 57), u = normals(c, seed: 58),
            v = normals(c, seed: 59)
        let w = normals(b * t * c, seed: 60)
        var outs: [[Float]] = []
        for threads in [1, 2] {
            HostRuntime.configure(threads: threads)
            var y = [Float](repeating: 0, count: b * t * c), att = [Float](repeating: 0, count: b * h * t * keys)
            RelativeAttention.forward(
                y: &y, att: &att, qkv: qkv, r: r, u: u, v: v, b: b, t: t, mem: mem, c: c, heads: h)
            var dqkv = [Float](repeating: 0, count: b * keys * 3 * c), dr = [Float](repeating: 0, count: keys * c)
            var du = [Float](repeating: 0, count: c), dv = [Float](repeating: 0, count: c)
            var scratch = [Float](
                repeating: 0, count: RelativeAttention.scratchCount(b: b, t: t, mem: mem, c: c, heads: h))
            RelativeAttention.backward(
                dqkv: &dqkv, dr: &dr, du: &du, dv: &dv, dy: w, qkv: qkv, r: r, u: u, v: v, att: att,
                b: b, t: t, mem: mem, c: c, heads: h, scratch: &scratch)
            outs.append(y + dqkv + dr + du + dv)
        }
        HostRuntime.configure(threads: 1)
        XCTAssertEqual(outs[0], outs[1])
    }

    /// Transformer-XL's PositionalEmbedding: pos_seq = K−1 … 0, [sin(d f) | cos(d f)], f_i = 10000^(−2i/C).
    func testSinusoidTable() {
        let keys = 5, c = 6
        var table = [Float](repeating: 0, count: keys * c)
        RelativeAttention.positions(out: &table, keys: keys, c: c)
        XCTAssertEqual(Array(table[(4 * c)..<(5 * c)]), [0, 0, 0, 1, 1, 1])  // last row: distance 0
        let d = 4.0, f1 = pow(10000.0, -2.0 / 6.0)
        XCTAssertEqual(Double(table[1]), sin(d * f1), accuracy: 1e-6)  // row 0: distance K−1 = 4
        XCTAssertEqual(Double(table[3 + 1]), cos(d * f1), accuracy: 1e-6)
    }
}
