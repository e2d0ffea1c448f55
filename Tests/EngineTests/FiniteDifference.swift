import Foundation
import VQMoE
import XCTest

/// Seeded N(0, scale²) values.
func normals(_ count: Int, seed: UInt64, scale: Float = 1) -> [Float] {
    var r = HostRNG.make(seed: seed, stream: 7)
    return (0..<count).map { _ in HostRNG.normal(&r) * scale }
}

/// Compare an analytic gradient with central finite differences of `objective` over `target`
/// (every coordinate, or `sample` of them): |a − f| ≤ rtol·max(|a|,|f|) + atol·max(1, max|a|).
func assertGradient(
    _ label: String, target: UnsafeMutablePointer<Float>, count: Int, analytic: UnsafePointer<Float>,
    eps: Float = 1e-2, rtol: Double = 2e-2, atol: Double = 2e-3, sample: Int = 64,
    objective: () throws -> Double, file: StaticString = #filePath, line: UInt = #line
) rethrows {
    var coords = Array(0..<count)
    if count > sample {
        var r = HostRNG.make(seed: UInt64(count), stream: 3)
        coords = (0..<sample).map { _ in Int(HostRNG.next(&r) % UInt64(count)) }
    }
    let scale = max(1.0, (0..<count).map { Double(abs(analytic[$0])) }.max() ?? 0)
    var worst = 0.0, worstText = ""
    for i in coords {
        let orig = target[i]
        target[i] = orig + eps
        let plus = try objective()
        target[i] = orig - eps
        let minus = try objective()
        target[i] = orig
        let fd = (plus - minus) / Double(2 * eps), a = Double(analytic[i])
        let tol = rtol * max(abs(a), abs(fd)) + atol * scale
        let ratio = abs(a - fd) / tol
        if ratio > worst { worst = ratio; worstText = "\(label)[\(i)]: analytic \(a), numeric \(fd)" }
    }
    XCTAssertLessThanOrEqual(worst, 1.0, worstText, file: file, line: line)
}

/// Σ r·y in Double.
func weightedSum(_ y: UnsafePointer<Float>, _ r: [Float]) -> Double {
    var s = 0.0
    for i in 0..<r.count { s += Double(r[i]) * Double(y[i]) }
    return s
}
