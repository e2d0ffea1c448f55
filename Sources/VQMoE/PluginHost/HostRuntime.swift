import CBLAS
import Dispatch
import Foundation
import VQMoEABI

/// The services table (`vqmoe_host_api`) every plugin receives, and the host-wide runtime
/// behind it: thread count, logging, the per-thread error slot, scratch memory.
///
/// ```swift
/// HostRuntime.configure(threads: 2)          // sizes the pool and OpenBLAS together
/// let api = HostRuntime.api                   // UnsafePointer<vqmoe_host_api>
/// HostRuntime.takeError()                     // the message a plugin set, if any
/// ```
public enum HostRuntime {
    /// Threads used by `parallel_for` and OpenBLAS. Set with `configure(threads:)`.
    nonisolated(unsafe) public private(set) static var threads: Int = 1
    /// Lines below this level are not printed (VQMOE_LOG_INFO by default; env VQMOE_LOG).
    nonisolated(unsafe) public static var logLevel: Int32 = {
        switch ProcessInfo.processInfo.environment["VQMOE_LOG"]?.lowercased() {
        case "debug": return VQMOE_LOG_DEBUG
        case "warn": return VQMOE_LOG_WARN
        case "error": return VQMOE_LOG_ERROR
        default: return VQMOE_LOG_INFO
        }
    }()

    /// One thread pool for the whole process: OpenBLAS and `parallel_for` use the same count,
    /// and plugin code never nests its loops around a threaded GEMM.
    public static func configure(threads n: Int) {
        threads = max(1, n)
        // OpenBLAS itself stays single-threaded: `sgemm` below splits large products over this
        // pool, so OpenBLAS's own workers never spin beside ours (2 cores oversubscribe at once).
        openblas_set_num_threads(1)
        api.pointee.num_threads = Int32(threads)
    }

    /// One single-threaded row-major SGEMM, C = α·op(A)·op(B) + β·C. A product with one row
    /// or one column of C is a matrix-vector product (SGEMV): OpenBLAS's SGEMM would pack the
    /// whole other operand first, which for one row (a token decoded at a time, an expert given
    /// one token) costs more than the product itself.
    static func gemm(
        _ transA: Bool, _ transB: Bool, _ m: Int, _ n: Int, _ k: Int, _ alpha: Float,
        _ a: UnsafePointer<Float>, _ lda: Int, _ b: UnsafePointer<Float>, _ ldb: Int,
        _ beta: Float, _ c: UnsafeMutablePointer<Float>, _ ldc: Int
    ) {
        if (m == 1 || n == 1) && beta == 0 {
            // SGEMV scales y by β: clear C so that no NaN left in reused memory survives 0·NaN.
            if m == 1 { c.update(repeating: 0, count: n) } else { for i in 0..<m { c[i * ldc] = 0 } }
        }
        if m == 1 {
            // c (n) = α·op(B)ᵀ-side product with the row x = op(A) (k): B (n,k) if transB, else (k,n).
            let incx = Int32(transA ? lda : 1)
            cblas_sgemv(
                CblasRowMajor, transB ? CblasNoTrans : CblasTrans, Int32(transB ? n : k), Int32(transB ? k : n), alpha,
                b, Int32(ldb), a, incx, beta, c, 1)
        } else if n == 1 {
            // c (m, stride ldc) = op(A) (m,k) · the column x = op(B) (k).
            let incx = Int32(transB ? 1 : ldb)
            cblas_sgemv(
                CblasRowMajor, transA ? CblasTrans : CblasNoTrans, Int32(transA ? k : m), Int32(transA ? m : k), alpha,
                a, Int32(lda), b, incx, beta, c, Int32(ldc))
        } else {
            cblas_sgemm(
                CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans, Int32(m),
                Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
        }
    }

    /// Row-major SGEMM C = α·op(A)·op(B) + β·C over the host pool: large products are split
    /// into one block of C's rows (or columns, when C is wide and short) per thread, each a
    /// single-threaded OpenBLAS call. Inside a `parallelFor` body it runs serially.
    public static func sgemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float,
        a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
        beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        func call(
            _ m: Int, _ n: Int, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ c: UnsafeMutablePointer<Float>
        ) {
            gemm(transA, transB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
        }
        let parts = threads
        if parts <= 1 || m * n * k < (1 << 21) || Thread.current.threadDictionary[nestedKey] != nil {
            call(m, n, a, b, c)
            return
        }
        nonisolated(unsafe) let c = c
        if m >= n || m >= 64 * parts {
            // Blocks of rows of C (and of op(A)), multiples of 16.
            let per = ((m + parts - 1) / parts + 15) / 16 * 16
            parallelFor(Int64(parts)) { lo, hi in
                for p in Int(lo)..<Int(hi) {
                    let r0 = p * per, rows = min(per, m - r0)
                    guard rows > 0 else { continue }
                    call(rows, n, transA ? a + r0 : a + r0 * lda, b, c + r0 * ldc)
                }
            }
        } else {
            // Blocks of columns of C (and of op(B)).
            let per = ((n + parts - 1) / parts + 15) / 16 * 16
            parallelFor(Int64(parts)) { lo, hi in
                for p in Int(lo)..<Int(hi) {
                    let c0 = p * per, cols = min(per, n - c0)
                    guard cols > 0 else { continue }
                    call(m, cols, a, transB ? b + c0 * ldb : b + c0, c + c0)
                }
            }
        }
    }

    /// The table handed to plugins; allocated once, never freed.
    nonisolated(unsafe) public static let api: UnsafeMutablePointer<vqmoe_host_api> = {
        let p = UnsafeMutablePointer<vqmoe_host_api>.allocate(capacity: 1)
        p.initialize(
            to: vqmoe_host_api(
                abi_version: UInt32(VQMOE_ABI_VERSION),
                struct_size: UInt32(MemoryLayout<vqmoe_host_api>.size),
                log: { level, name, msg in
                    HostRuntime.log(
                        level, name.map { String(cString: $0) } ?? "?", msg.map { String(cString: $0) } ?? "")
                },
                set_error: { msg in HostRuntime.setError(msg.map { String(cString: $0) } ?? "(no message)") },
                alloc: { bytes in HostRuntime.alignedAlloc(bytes) },
                free: { ptr in Foundation.free(ptr) },
                rng_init: { rng, seed, stream in rng?.pointee = HostRNG.make(seed: seed, stream: stream) },
                rng_next_u64: { rng in HostRNG.next(&rng!.pointee) },
                rng_uniform: { rng in HostRNG.uniform(&rng!.pointee) },
                rng_normal: { rng in HostRNG.normal(&rng!.pointee) },
                sgemm: { ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc in
                    guard let a, let b, let c else { return }
                    HostRuntime.sgemm(
                        transA: ta == VQMOE_TRANS, transB: tb == VQMOE_TRANS, m: Int(m), n: Int(n), k: Int(k),
                        alpha: alpha,
                        a: a, lda: Int(lda), b: b, ldb: Int(ldb), beta: beta, c: c, ldc: Int(ldc))
                },
                scratch: { bytes in HostRuntime.scratch(bytes) },
                parallel_for: { n, grain, user, fn in
                    guard let fn else { return }
                    HostRuntime.parallelFor(n, grain: grain) { b, e in fn(user, b, e) }
                },
                num_threads: 1, num_ranks: 1, rank: 0,
                allreduce_sum_f64: { buf, n in HostRuntime.collective { try Comm.world.allreduce(buf!, count: Int(n)) }
                },
                allreduce_sum_f32: { buf, n in HostRuntime.collective { try Comm.world.allreduce(buf!, count: Int(n)) }
                },
                allgather: { send, bytes, recv, capacity, rankBytes in
                    HostRuntime.allgather(send, bytes, recv, capacity, rankBytes)
                }))
        return p
    }()

    /// A plugin's collective: VQMOE_OK, or an error status with the message set.
    static func collective(_ body: () throws -> Void) -> Int32 {
        do {
            try body()
            return VQMOE_OK
        } catch {
            setError("\(error)")
            return VQMOE_ERR_INTERNAL
        }
    }

    /// host->allgather: every rank's bytes in rank order; INVALID_ARGUMENT on every rank when the
    /// total exceeds any rank's capacity.
    static func allgather(
        _ send: UnsafeRawPointer?, _ bytes: Int64, _ recv: UnsafeMutableRawPointer?, _ capacity: Int64,
        _ rankBytes: UnsafeMutablePointer<Int64>?
    ) -> Int32 {
        let comm = Comm.world
        var status = VQMOE_OK
        let code = collective {
            let (data, counts) = try comm.allgather(UnsafeRawBufferPointer(start: send, count: Int(max(bytes, 0))))
            var fits: [Double] = [data.count <= Int(capacity) && (recv != nil || data.isEmpty) ? 0 : 1]
            try comm.allreduce(&fits)
            guard fits[0] == 0 else {
                setError("allgather: the ranks send \(data.count) bytes in all, more than a receive capacity")
                status = VQMOE_ERR_INVALID_ARGUMENT
                return
            }
            if let recv, !data.isEmpty {
                data.withUnsafeBytes { recv.copyMemory(from: $0.baseAddress!, byteCount: data.count) }
            }
            if let rankBytes { for (r, c) in counts.enumerated() { rankBytes[r] = Int64(c) } }
        }
        return code != VQMOE_OK ? code : status
    }

    /// The ranks of a distributed run, for plugins (ABI 1.3).
    static func setRanks(_ comm: Comm) {
        api.pointee.num_ranks = Int32(comm.size)
        api.pointee.rank = Int32(comm.rank)
    }

    // MARK: logging and errors

    /// Print a log line to stderr when `level` passes the filter.
    public static func log(_ level: Int32, _ source: String, _ message: String) {
        guard level >= logLevel else { return }
        let tag = ["debug", "info", "warn", "error"][Int(min(max(level, 0), 3))]
        FileHandle.standardError.write(Data("[\(tag)] \(source): \(message)\n".utf8))
    }

    private static let errorKey = "vqmoe.plugin.error"
    private static let scratchKey = "vqmoe.plugin.scratch"

    static func setError(_ message: String) {
        Thread.current.threadDictionary[errorKey] = message
    }

    /// The message a plugin set with `host->set_error` on this thread, cleared on read.
    public static func takeError() -> String? {
        let m = Thread.current.threadDictionary[errorKey] as? String
        Thread.current.threadDictionary.removeObject(forKey: errorKey)
        return m
    }

    // MARK: memory

    /// 64-byte aligned allocation (free with `free`).
    public static func alignedAlloc(_ bytes: Int) -> UnsafeMutableRawPointer? {
        var p: UnsafeMutableRawPointer?
        guard posix_memalign(&p, 64, max(bytes, 64)) == 0 else { return nil }
        return p
    }

    /// `count` elements of `T`, 64-byte aligned (free with `free`), for memory the host cannot run
    /// without (parameters, optimizer moments, activations). The run's estimate is checked against
    /// the memory limit before any of these (`MemoryBudget`), so failing here means the system
    /// had less than it reported: the process ends with a message naming `what` and the size, and
    /// exit code 65 (a run that does not fit in memory), instead of crashing on a NULL pointer.
    public static func mustAllocate<T>(
        _ count: Int, of _: T.Type, for what: @autoclosure () -> String
    )
        -> UnsafeMutablePointer<T>
    {
        let (bytes, overflow) = max(count, 1).multipliedReportingOverflow(by: MemoryLayout<T>.stride)
        guard !overflow, count >= 0, let p = alignedAlloc(bytes) else {
            let size = overflow || count < 0 ? "\(count) elements" : "\(bytes) bytes"
            let message =
                "vqmoe: out of memory: cannot allocate \(size) for \(what()); the run does not fit "
                + "(see its estimate with `vqmoe train --dry-run`, lower it, or free memory)\n"
            FileHandle.standardError.write(Data(message.utf8))
            exit(VQMoEError(.config, "").exitCode)
        }
        return p.bindMemory(to: T.self, capacity: max(count, 1))
    }

    final class ScratchList { var pointers: [UnsafeMutableRawPointer] = [] }

    static func scratch(_ bytes: Int) -> UnsafeMutableRawPointer? {
        guard let p = alignedAlloc(bytes) else { return nil }
        let list =
            (Thread.current.threadDictionary[scratchKey] as? ScratchList)
            ?? {
                let l = ScratchList(); Thread.current.threadDictionary[scratchKey] = l; return l
            }()
        list.pointers.append(p)
        return p
    }

    /// Free the scratch memory this thread's plugin calls requested (after each call).
    public static func releaseScratch() {
        guard let list = Thread.current.threadDictionary[scratchKey] as? ScratchList else { return }
        for p in list.pointers { Foundation.free(p) }
        list.pointers.removeAll(keepingCapacity: true)
    }

    // MARK: threads

    static let nestedKey = "vqmoe.parallel.nested"

    /// Run `body(begin, end)` over [0, n) split into at most `threads` chunks of at least
    /// `grain` items. Calls from inside a body run serially (no nested parallelism).
    public static func parallelFor(_ n: Int64, grain: Int64 = 1, _ body: (Int64, Int64) -> Void) {
        guard n > 0 else { return }
        let chunks = Int(min(Int64(threads), max(1, n / max(grain, 1))))
        if chunks <= 1 || Thread.current.threadDictionary[nestedKey] != nil {
            body(0, n)
            return
        }
        let per = (n + Int64(chunks) - 1) / Int64(chunks)
        nonisolated(unsafe) let body = body
        DispatchQueue.concurrentPerform(iterations: chunks) { c in
            let begin = Int64(c) * per, end = min(n, begin + per)
            guard begin < end else { return }
            let dict = Thread.current.threadDictionary
            dict[nestedKey] = true
            body(begin, end)
            dict.removeObject(forKey: nestedKey)
        }
    }
}

/// The counter-based random stream behind `host->rng_*`: SplitMix64 of (key + counter), so a
/// stream is reproducible from (seed, stream id) and its position.
///
/// ```swift
/// var r = HostRNG.make(seed: 42, stream: 0)
/// let u = HostRNG.uniform(&r)     // [0, 1)
/// ```
public enum HostRNG {
    @inline(__always) public static func mix64(_ x: UInt64) -> UInt64 {
        var z = x &+ 0x9e37_79b9_7f4a_7c15
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }

    public static func make(seed: UInt64, stream: UInt64) -> vqmoe_rng {
        vqmoe_rng(key: mix64(seed ^ mix64(stream &+ 0x632b_e59b_d9b4_e019)), counter: 0)
    }

    public static func next(_ r: inout vqmoe_rng) -> UInt64 {
        r.counter &+= 1
        return mix64(r.key &+ r.counter &* 0x9e37_79b9_7f4a_7c15)
    }

    public static func uniform(_ r: inout vqmoe_rng) -> Float {
        Float(next(&r) >> 40) * (1.0 / 16_777_216.0)
    }

    /// Box-Muller; consumes two draws per call.
    public static func normal(_ r: inout vqmoe_rng) -> Float {
        let u1 = (Double(next(&r) >> 11) + 0.5) * (1.0 / 9_007_199_254_740_992.0)
        let u2 = Double(next(&r) >> 11) * (1.0 / 9_007_199_254_740_992.0)
        return Float((-2.0 * Foundation.log(u1)).squareRoot() * cos(2.0 * Double.pi * u2))
    }

    /// A seed derived from several parts (run seed, instance id, step, call), well mixed.
    public static func derive(_ parts: UInt64...) -> UInt64 {
        parts.reduce(0x1234_5678_9abc_def0) { mix64($0 ^ $1) }
    }
}
