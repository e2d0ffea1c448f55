// PluginKit: the plumbing every Swift plugin shares -- failures turned into status codes at the
// C boundary, tensor-view checks, thin wrappers over the host API table and code-usage
// statistics. The kind protocols (Component.swift, RouterKit.swift, ...) build on it. It is
// linked statically into each plugin library (never into the host), so a plugin still depends
// only on the C ABI at run time; third-party packages depend on the `PluginKit` product.
import Glibc
import VQMoEABI

/// A failure inside the plugin. It never crosses the C boundary: `guarded` turns it into a
/// status code after describing it with `host->set_error`.
public struct PluginFailure: Error {
    public init(status: Int32, message: String) { self.status = status; self.message = message }
    public let status: Int32
    public let message: String

    public static func invalid(_ m: String) -> PluginFailure {
        PluginFailure(status: VQMOE_ERR_INVALID_ARGUMENT, message: m)
    }
    public static func shape(_ m: String) -> PluginFailure { PluginFailure(status: VQMOE_ERR_SHAPE, message: m) }
    public static func state(_ m: String) -> PluginFailure { PluginFailure(status: VQMOE_ERR_STATE, message: m) }
    public static func numeric(_ m: String) -> PluginFailure { PluginFailure(status: VQMOE_ERR_NUMERIC, message: m) }
    public static func outOfMemory(_ m: String) -> PluginFailure {
        PluginFailure(status: VQMOE_ERR_OUT_OF_MEMORY, message: m)
    }
}

/// Describe an error with `host->set_error` (the host copies the message).
public func reportError(_ host: UnsafePointer<vqmoe_host_api>?, _ message: String) {
    guard let setError = host?.pointee.set_error else { return }
    message.withCString { setError($0) }
}

/// Run `body` and return its status: VQMOE_OK, or the failure's code after `set_error`.
public func guarded(_ host: UnsafePointer<vqmoe_host_api>?, _ body: () throws(PluginFailure) -> Void) -> Int32 {
    do {
        try body()
        return VQMOE_OK
    } catch {
        reportError(host, error.message)
        return error.status
    }
}

/// "(2, 3)" for messages.
public func shapeText(_ t: vqmoe_tensor) -> String {
    guard t.ndim >= 0, let s = t.shape else { return "(?)" }
    return "(" + (0..<Int(t.ndim)).map { String(s[$0]) }.joined(separator: ", ") + ")"
}

/// The tensor's data when it is a contiguous view of `code`/`bits` with exactly `shape`.
public func requireTensor(
    _ t: vqmoe_tensor, code: Int32, bits: UInt8, _ shape: [Int], _ what: String,
    _ dtypeName: String
) throws(PluginFailure) -> UnsafeMutableRawPointer {
    guard let data = t.data else { throw .shape("\(what) is absent (data NULL)") }
    guard t.dtype.code == UInt8(code), t.dtype.bits == bits, t.dtype.lanes == 1 else {
        throw .shape(
            "\(what) must be \(dtypeName), got dtype {code \(t.dtype.code), bits \(t.dtype.bits), lanes \(t.dtype.lanes)}"
        )
    }
    guard t.strides == nil, t.byte_offset == 0 else {
        throw .shape("\(what) must be contiguous (strides NULL, byte_offset 0)")
    }
    let want = "(" + shape.map(String.init).joined(separator: ", ") + ")"
    guard Int(t.ndim) == shape.count, let s = t.shape else {
        throw .shape("\(what) must have shape \(want), got \(shapeText(t))")
    }
    for i in 0..<shape.count where Int(s[i]) != shape[i] {
        throw .shape("\(what) must have shape \(want), got \(shapeText(t))")
    }
    return data
}

/// A contiguous float32 view of exactly `shape`.
public func requireF32(
    _ t: vqmoe_tensor, _ shape: [Int], _ what: String
) throws(PluginFailure) -> UnsafeMutablePointer<Float> {
    try requireTensor(t, code: VQMOE_DTYPE_FLOAT, bits: 32, shape, what, "float32").assumingMemoryBound(to: Float.self)
}

/// A contiguous int32 view of exactly `shape`.
public func requireI32(
    _ t: vqmoe_tensor, _ shape: [Int], _ what: String
) throws(PluginFailure) -> UnsafeMutablePointer<Int32> {
    try requireTensor(t, code: VQMOE_DTYPE_INT, bits: 32, shape, what, "int32").assumingMemoryBound(to: Int32.self)
}

/// The rows (first dimension) of a 2-D tensor whose second dimension is `cols`.
public func rowsOf(_ t: vqmoe_tensor, cols: Int, _ what: String) throws(PluginFailure) -> Int {
    guard t.ndim == 2, let s = t.shape, s[0] >= 0 else {
        throw .shape("\(what) must be 2-D (N, \(cols)), got \(shapeText(t))")
    }
    return Int(s[0])
}

/// Check a caller-provided struct is at least as large as ABI 1.0's version of it.
public func requireSize<T>(_ size: UInt32, _: T.Type, _ what: String) throws(PluginFailure) {
    guard Int(size) >= MemoryLayout<T>.size else {
        throw .invalid("\(what): struct_size \(size) is smaller than ABI 1.0's \(MemoryLayout<T>.size)")
    }
}

/// The services of `vqmoe_host_api` this plugin uses, with Swift-friendly signatures.
/// Made only by `Host.checked`, which verifies the table has every function used here.
public struct Host {
    public let api: UnsafePointer<vqmoe_host_api>

    /// The host table from `create_info`, refused when its ABI major differs or it lacks a
    /// function this plugin calls.
    public static func checked(_ api: UnsafePointer<vqmoe_host_api>?) throws(PluginFailure) -> Host {
        guard let api else { throw .invalid("create_info.host is NULL") }
        let t = api.pointee
        guard t.abi_version >> 16 == UInt32(VQMOE_ABI_VERSION_MAJOR) else {
            throw .invalid(
                "host speaks plugin ABI major \(t.abi_version >> 16), this plugin was built for major \(VQMOE_ABI_VERSION_MAJOR)"
            )
        }
        let v10 = MemoryLayout<vqmoe_host_api>.offset(of: \.num_ranks)!  // ABI 1.3 appended the ranks
        guard Int(t.struct_size) >= v10 else {
            throw .invalid("host API struct_size \(t.struct_size) is smaller than ABI 1.0's \(v10)")
        }
        guard t.set_error != nil, t.sgemm != nil, t.scratch != nil, t.rng_init != nil, t.rng_normal != nil,
            t.parallel_for != nil
        else {
            throw .invalid(
                "host API table lacks one of set_error / sgemm / scratch / rng_init / rng_normal / parallel_for")
        }
        return Host(api: api)
    }

    /// Row-major C (m,n) = alpha * op(A) @ op(B) + beta * C through host->sgemm; handles the
    /// empty cases BLAS rejects (m, n or k = 0).
    public func gemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float,
        a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
        beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        guard m > 0, n > 0 else { return }
        if k == 0 {
            for i in 0..<m { for j in 0..<n { c[i * ldc + j] = beta == 0 ? 0 : beta * c[i * ldc + j] } }
            return
        }
        api.pointee.sgemm!(
            transA ? VQMOE_TRANS : VQMOE_NO_TRANS, transB ? VQMOE_TRANS : VQMOE_NO_TRANS,
            Int64(m), Int64(n), Int64(k), alpha, a, Int64(lda), b, Int64(ldb), beta, c, Int64(ldc))
    }

    /// C (m,n) = op(A) @ op(B) + beta C for contiguous row-major matrices: A is (m,k), or (k,m)
    /// with `ta`; B is (k,n), or (n,k) with `tb`.
    ///
    /// ```swift
    /// host.matmul(n, e, d, x, w, logits, tb: true)  // logits (N,E) = x (N,d) @ W^T (d,E)
    /// ```
    public func matmul(
        _ m: Int, _ n: Int, _ k: Int, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>,
        _ c: UnsafeMutablePointer<Float>, ta: Bool = false, tb: Bool = false, beta: Float = 0
    ) {
        gemm(
            transA: ta, transB: tb, m: m, n: n, k: k, alpha: 1, a: a, lda: ta ? m : k, b: b, ldb: tb ? k : n,
            beta: beta, c: c, ldc: n)
    }

    /// `count` floats of host scratch memory, valid until the current plugin call returns.
    public func scratchFloats(_ count: Int, _ what: String) throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        guard let p = api.pointee.scratch!(max(count, 1) * MemoryLayout<Float>.stride) else {
            throw .outOfMemory("could not get \(count * 4) bytes of scratch memory for \(what)")
        }
        return p.bindMemory(to: Float.self, capacity: max(count, 1))
    }

    /// `count` doubles of host scratch memory, valid until the current plugin call returns.
    public func scratchDoubles(_ count: Int, _ what: String) throws(PluginFailure) -> UnsafeMutablePointer<Double> {
        guard let p = api.pointee.scratch!(max(count, 1) * MemoryLayout<Double>.stride) else {
            throw .outOfMemory("could not get \(count * 8) bytes of scratch memory for \(what)")
        }
        return p.bindMemory(to: Double.self, capacity: max(count, 1))
    }

    /// A random stream seeded by (seed, stream).
    public func rng(seed: UInt64, stream: UInt64) -> vqmoe_rng {
        var r = vqmoe_rng(key: 0, counter: 0)
        api.pointee.rng_init!(&r, seed, stream)
        return r
    }

    public func normal(_ r: inout vqmoe_rng) -> Float { api.pointee.rng_normal!(&r) }

    /// Run `body(job, begin, end)` over [0, n) on the host's pool. `job` is a plain struct of
    /// pointers; `body` must be a non-capturing function (it becomes a C function pointer).
    public func parallelFor<Job>(
        _ n: Int, grain: Int, _ job: Job,
        _ body: @convention(c) (UnsafeMutableRawPointer?, Int64, Int64) -> Void
    ) {
        guard n > 0 else { return }
        var job = job
        withUnsafeMutablePointer(to: &job) { p in
            api.pointee.parallel_for!(Int64(n), Int64(max(grain, 1)), UnsafeMutableRawPointer(p), body)
        }
    }
}

extension Host {
    /// Run `body(begin, end)` over chunks of [0, n) on the host's pool (at least `grain` items
    /// per chunk). Chunks run concurrently: `body` may only write what its range owns.
    ///
    /// ```swift
    /// host.parallelFor(n, grain: 64) { begin, end in for t in begin..<end { out[t] = f(x[t]) } }
    /// ```
    public func parallelFor(_ n: Int, grain: Int, _ body: (Int, Int) -> Void) {
        guard n > 0 else { return }
        withoutActuallyEscaping(body) { escaping in
            var box = escaping
            withUnsafeMutablePointer(to: &box) { p in
                api.pointee.parallel_for!(Int64(n), Int64(max(grain, 1)), UnsafeMutableRawPointer(p)) { user, b, e in
                    user!.assumingMemoryBound(to: ((Int, Int) -> Void).self).pointee(Int(b), Int(e))
                }
            }
        }
    }
}

/// A C string that lives as long as the library (descriptor and buffer names).
public func staticCString(_ s: String) -> UnsafePointer<CChar> { UnsafePointer(strdup(s)!) }

/// Code usage of one batch, for quantizers' "vqmoe.metrics/1": per-code counts, usage
/// perplexity exp(−Σ p log p) (1..K) and dead codes (count 0).
public struct CodeUsage {
    public var counts: [Float]
    public var tokens: Int
    public init(counts: [Float], tokens: Int) { self.counts = counts; self.tokens = tokens }

    public var perplexity: Double {
        let total = counts.reduce(0, +)
        guard total > 0 else { return 0 }
        var h = 0.0
        for c in counts where c > 0 { let p = Double(c) / Double(total); h -= p * log(p) }
        return exp(h)
    }

    public var deadCodes: Int { counts.filter { $0 == 0 }.count }
}

extension Host {
    /// The host has the collectives of ABI 1.3.
    var hasCollectives: Bool {
        Int(api.pointee.struct_size) >= MemoryLayout<vqmoe_host_api>.size && api.pointee.allgather != nil
    }

    /// Ranks of the run (1 in one process, or from a host older than ABI 1.3).
    public var ranks: Int { hasCollectives ? Int(max(api.pointee.num_ranks, 1)) : 1 }

    /// buf[i] = Σ over the ranks of buf[i] (collective: every rank calls it; one process: nothing).
    ///
    /// ```swift
    /// var stats = [Double](counts) + [Double(n)]
    /// try host.allreduce(&stats)
    /// ```
    public func allreduce(_ buf: UnsafeMutablePointer<Double>, count: Int) throws(PluginFailure) {
        guard ranks > 1, count > 0 else { return }
        guard api.pointee.allreduce_sum_f64!(buf, Int64(count)) == VQMOE_OK else {
            throw .state("allreduce of \(count) values across \(ranks) ranks failed")
        }
    }

    public func allreduce(_ values: inout [Double]) throws(PluginFailure) {
        guard ranks > 1 else { return }
        try values.withUnsafeMutableBufferPointer { (b) throws(PluginFailure) in
            try allreduce(b.baseAddress!, count: b.count)
        }
    }

    /// Every rank's `mine` rows (of `width` floats), concatenated in rank order: the rows of the
    /// global batch (collective).
    public func allgatherRows(_ mine: UnsafePointer<Float>, rows: Int, width: Int) throws(PluginFailure) -> [Float] {
        guard ranks > 1 else { return Array(UnsafeBufferPointer(start: mine, count: rows * width)) }
        var total = [Double(rows)]
        try allreduce(&total)
        var out = [Float](repeating: 0, count: max(Int(total[0]) * width, 1))
        let status = out.withUnsafeMutableBytes {
            api.pointee.allgather!(mine, Int64(rows * width * 4), $0.baseAddress, Int64($0.count), nil)
        }
        guard status == VQMOE_OK else { throw .state("allgather of \(rows) rows across \(ranks) ranks failed") }
        return Array(out.prefix(Int(total[0]) * width))
    }
}
