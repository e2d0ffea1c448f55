// Small shared additions the routers on the kit use (kept apart from PluginKit.swift).
import Glibc
import VQMoEABI

extension Host {
    /// C (m,n) = alpha op(A) @ op(B) + beta C for contiguous row-major matrices (as `matmul`,
    /// with the scale applied inside the GEMM).
    ///
    /// ```swift
    /// host.matmul(n, e, dr, u, eHat, scores, alpha: 1 / tau, tb: true)  // s (N,E) = u e^T / tau
    /// ```
    public func matmul(
        _ m: Int, _ n: Int, _ k: Int, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>,
        _ c: UnsafeMutablePointer<Float>, alpha: Float, ta: Bool = false, tb: Bool = false, beta: Float = 0
    ) {
        gemm(
            transA: ta, transB: tb, m: m, n: n, k: k, alpha: alpha, a: a, lda: ta ? m : k, b: b, ldb: tb ? k : n,
            beta: beta, c: c, ldc: n)
    }
}
