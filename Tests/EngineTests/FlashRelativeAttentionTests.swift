import Foundation
import VQMoE
import XCTest

/// `FlashRelativeAttention` (blockwise Transformer-XL attention) against `RelativeAttention`
/// (saves the (B,H,T,K) probabilities), the reference: y and every gradient (dqkv, dr, du, dv) to
/// 1e-5 relative, with and without memory, for lengths across the 64-row query and 512-row key
/// blocks; and finite differences.
final class FlashRelativeAttentionTests: XCTestCase {
    /// Largest |a − b| over the largest |b| (at least 1).
    func relativeError(_ a: [Float], _ b: [Float]) -> Float {
        let scale = max(b.map { abs($0) }.max() ?? 0, 1)
        return zip(a, b).map { abs($0 - $1) }.max()! / scale
    }

    struct Inputs {
        let qkv, r, u, v, dy: [Float]
    }

    func inputs(b: Int, t: Int, mem: Int, c: Int, seed: UInt64) -> Inputs {
        let k = mem + t
        return Inputs(
            qkv: normals(b * k * 3 * c, seed: seed).map { $0 * 1.5 }, r: normals(k * c, seed: seed + 1),
            u: normals(c, seed: seed + 2), v: normals(c, seed: seed + 3), dy: normals(b * t * c, seed: seed + 4))
    }

    func compare(b: Int, t: Int, mem: Int, c: Int, heads: Int, seed: UInt64) {
        let x = inputs(b: b, t: t, mem: mem, c: c, seed: seed), k = mem + t
        var yRef = [Float](repeating: 0, count: b * t * c), att = [Float](repeating: 0, count: b * heads * t * k)
        RelativeAttention.forward(
            y: &yRef, att: &att, qkv: x.qkv, r: x.r, u: x.u, v: x.v, b: b, t: t, mem: mem, c: c, heads: heads)
        var dRef = [Float](repeating: 0, count: b * k * 3 * c), drRef = [Float](repeating: 0, count: k * c)
        var duRef = [Float](repeating: 0, count: c), dvRef = [Float](repeating: 0, count: c)
        var work = [Float](
            repeating: 0, count: RelativeAttention.scratchCount(b: b, t: t, mem: mem, c: c, heads: heads))
        RelativeAttention.backward(
            dqkv: &dRef, dr: &drRef, du: &duRef, dv: &dvRef, dy: x.dy, qkv: x.qkv, r: x.r, u: x.u, v: x.v, att: att,
            b: b, t: t, mem: mem, c: c, heads: heads, scratch: &work)

        var y = [Float](repeating: .nan, count: b * t * c), lse = [Float](repeating: .nan, count: b * heads * t)
        FlashRelativeAttention.forward(
            y: &y, lse: &lse, qkv: x.qkv, r: x.r, u: x.u, v: x.v, b: b, t: t, mem: mem, c: c, heads: heads)
        var d = [Float](repeating: 0, count: b * k * 3 * c), dr = [Float](repeating: 0, count: k * c)
        var du = [Float](repeating: 0, count: c), dv = [Float](repeating: 0, count: c)
        var fwork = [Float](
            repeating: 0, count: FlashRelativeAttention.scratchCount(b: b, t: t, mem: mem, c: c, heads: heads))
        FlashRelativeAttention.backward(
            dqkv: &d, dr: &dr, du: &du, dv: &dv, dy: x.dy, y: y, lse: lse, qkv: x.qkv, r: x.r, u: x.u, v: x.v,
            b: b, t: t, mem: mem, c: c, heads: heads, scratch: &fwork)
        let what = "B \(b) T \(t) M \(mem) C \(c) H \(heads)"
        XCTAssertLessThan(relativeError(y, yRef), 1e-5, "\(what): y")
        XCTAssertLessThan(relativeError(d, dRef), 1e-5, "\(what): dqkv")
        XCTAssertLessThan(relativeError(dr, drRef), 1e-5, "\(what): dr")
        XCTAssertLessThan(relativeError(du, duRef), 1e-5, "\(what): du")
        XCTAssertLessThan(relativeError(dv, dvRef), 1e-5, "\(what): dv")
    }

    func testMatchesTheReferenceAcrossBlockBoundaries() {
        for (t, mem) in [(1, 0), (7, 0), (7, 5), (65, 0), (70, 30), (200, 600), (513, 0), (530, 100)] {
            compare(b: 2, t: t, mem: mem, c: 16, heads: 2, seed: UInt64(t * 1000 + mem))
        }
        compare(b: 1, t: 600, mem: 64, c: 128, heads: 2, seed: 9)  // Dh 64
    }

    func testFiniteDifferences() {
        let b = 1, t = 70, mem = 520, c = 8, h = 2, k = mem + t
        let x = inputs(b: b, t: t, mem: mem, c: c, seed: 31)
        var qkv = x.qkv, r = x.r
        let dy = x.dy
        var y = [Float](repeating: 0, count: b * t * c), lse = [Float](repeating: 0, count: b * h * t)
        func f() -> Double {
            FlashRelativeAttention.forward(
                y: &y, lse: &lse, qkv: qkv, r: r, u: x.u, v: x.v, b: b, t: t, mem: mem, c: c, heads: h)
            return weightedSum(y, dy)
        }
        _ = f()
        var d = [Float](repeating: 0, count: b * k * 3 * c), dr = [Float](repeating: 0, count: k * c)
        var du = [Float](repeating: 0, count: c), dv = [Float](repeating: 0, count: c)
        var work = [Float](
            repeating: 0, count: FlashRelativeAttention.scratchCount(b: b, t: t, mem: mem, c: c, heads: h))
        FlashRelativeAttention.backward(
            dqkv: &d, dr: &dr, du: &du, dv: &dv, dy: dy, y: y, lse: lse, qkv: qkv, r: r, u: x.u, v: x.v,
            b: b, t: t, mem: mem, c: c, heads: h, scratch: &work)
        assertGradient("qkv", target: &qkv, count: b * k * 3 * c, analytic: d, eps: 1e-3, sample: 96, objective: f)
        assertGradient("r", target: &r, count: k * c, analytic: dr, eps: 1e-3, sample: 64, objective: f)
    }
}
