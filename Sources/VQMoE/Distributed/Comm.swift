import Foundation
import VQMoEABI

/// The ranks of a run and the collectives between them. In one process (`Comm.world` before
/// `Comm.start`, or a run not launched by mpirun/srun) every collective is a no-op on one rank.
/// Launched by `mpirun -np N` (or `srun`), `Comm.start` loads the communication backend
/// (`libvqmoe_comm_mpi.so`, vqmoe_comm.h) and every call goes through one communication thread
/// (`CommWorker`): the backend needs no thread support beyond MPI_THREAD_FUNNELED, gradient
/// buckets are reduced while the backward goes on, and a collective that gets no answer within
/// `timeout` seconds ends the job with a message naming the rank, the step and the operation.
///
/// ```swift
/// let comm = try Comm.start()                  // rank 0 of 1 without mpirun
/// var losses: [Double] = [lossSum, count]
/// try comm.allreduce(&losses)                  // sums over the ranks
/// ```
public final class Comm: @unchecked Sendable {
    /// The communicator of this process (one rank until `start`).
    nonisolated(unsafe) public private(set) static var world = Comm()

    public let rank: Int
    public let size: Int
    /// This process's host name (messages).
    public let hostName: String
    /// "local" or the backend's name ("openmpi").
    public let backendName: String
    let api: UnsafePointer<vqmoe_comm_api>?
    let worker: CommWorker?
    /// The training step in progress, for messages (-1 outside training).
    nonisolated(unsafe) public var step = -1

    public var isDistributed: Bool { size > 1 }
    public var isRoot: Bool { rank == 0 }
    /// "rank 1 of 2 (node7)".
    public var describe: String { "rank \(rank) of \(size) (\(hostName))" }

    /// One process.
    init() {
        (rank, size, hostName, backendName, api, worker) = (0, 1, ProcessInfo.processInfo.hostName, "local", nil, nil)
    }

    init(api: UnsafePointer<vqmoe_comm_api>, worker: CommWorker, rank: Int, size: Int) {
        (self.api, self.worker, self.rank, self.size) = (api, worker, rank, size)
        backendName = String(cString: api.pointee.name)
        hostName = api.pointee.rank_name?().map { String(cString: $0) } ?? ProcessInfo.processInfo.hostName
    }

    // MARK: starting

    /// Ranks announced by the launcher: mpirun (OMPI_COMM_WORLD_SIZE), PMI/PMIx (srun), or an
    /// srun step's SLURM_NTASKS; 1 when the process was started on its own.
    public static func launcherSize(_ env: [String: String] = ProcessInfo.processInfo.environment) -> Int {
        if let s = env["OMPI_COMM_WORLD_SIZE"] ?? env["PMI_SIZE"] ?? env["PMIX_SIZE"], let n = Int(s) { return n }
        if env["SLURM_STEP_ID"] != nil, let s = env["SLURM_NTASKS"], let n = Int(s) { return n }
        return 1
    }

    /// Join the job when a launcher started several ranks: load the backend (VQMOE_COMM_LIBRARY, or
    /// libvqmoe_comm_mpi.so beside the executable) and make it `world`. `timeout` bounds every
    /// collective (VQMOE_COMM_TIMEOUT seconds, default 300). One process: `world` stays local.
    @discardableResult
    public static func start(timeout: Double? = nil) throws -> Comm {
        let env = ProcessInfo.processInfo.environment
        guard world.api == nil, launcherSize(env) > 1 else { return world }
        let path = env["VQMOE_COMM_LIBRARY"] ?? "\(Registry.executableDirectory())/libvqmoe_comm_mpi.so"
        guard let lib = dlopen(path, RTLD_NOW | RTLD_GLOBAL | RTLD_NODELETE) else {
            throw VQMoEError(
                .config,
                "launched with \(launcherSize(env)) ranks, but the communication backend \(path) cannot be loaded "
                    + "(\(String(cString: dlerror()))): build it with scripts/build-comm-mpi.sh (needs Open MPI: "
                    + "apt-get install openmpi-bin libopenmpi-dev), or set VQMOE_COMM_LIBRARY")
        }
        guard let sym = dlsym(lib, VQMOE_COMM_ENTRY_SYMBOL),
            let api = unsafeBitCast(sym, to: vqmoe_comm_entry_fn.self)(),
            api.pointee.abi_version == VQMOE_COMM_ABI_VERSION
        else {
            throw VQMoEError(
                .config, "\(path) is not a vqmoe communication backend of version \(VQMOE_COMM_ABI_VERSION)")
        }
        let t = timeout ?? env["VQMOE_COMM_TIMEOUT"].flatMap(Double.init) ?? 300
        let worker = CommWorker(timeout: t)
        var rank: Int32 = 0, size: Int32 = 1
        let status = worker.sync("start") { api.pointee.start!(&rank, &size) }
        guard status == 0 else {
            throw VQMoEError(.config, "\(String(cString: api.pointee.name)) start: \(Comm.errorText(api))")
        }
        let comm = Comm(api: api, worker: worker, rank: Int(rank), size: Int(size))
        worker.describe = { "\(comm.describe) at step \(comm.step)" }
        worker.abort = { code in api.pointee.abort?(code) }
        world = comm
        HostRuntime.setRanks(comm)
        return comm
    }

    /// Leave the job (after the last collective of a distributed run).
    public func finish() {
        guard let api, let worker else { return }
        _ = worker.sync("finish") { api.pointee.finish!() }
    }

    /// The backend's description of its last failure.
    static func errorText(_ api: UnsafePointer<vqmoe_comm_api>) -> String {
        api.pointee.error_text?().map { String(cString: $0) } ?? "(no message)"
    }

    // MARK: collectives

    /// Run `body` on the communication thread and turn a failure into an error naming the rank.
    func call(_ what: String, _ body: @escaping (UnsafePointer<vqmoe_comm_api>) -> Int32) throws {
        guard let api, let worker else { return }
        let status = worker.sync(what) { body(api) }
        guard status == 0 else {
            throw VQMoEError(.internalError, "\(describe) at step \(step): \(what): \(Comm.errorText(api))")
        }
    }

    /// buf[i] = Σ over ranks buf[i].
    public func allreduce(_ buf: UnsafeMutablePointer<Float>, count: Int) throws {
        guard isDistributed, count > 0 else { return }
        nonisolated(unsafe) let p = buf
        try call("allreduce of \(count) floats") { $0.pointee.allreduce_sum!(p, Int64(count), VQMOE_COMM_F32) }
    }

    public func allreduce(_ buf: UnsafeMutablePointer<Double>, count: Int) throws {
        guard isDistributed, count > 0 else { return }
        nonisolated(unsafe) let p = buf
        try call("allreduce of \(count) doubles") { $0.pointee.allreduce_sum!(p, Int64(count), VQMOE_COMM_F64) }
    }

    public func allreduce(_ values: inout [Double]) throws {
        try values.withUnsafeMutableBufferPointer { try allreduce($0.baseAddress!, count: $0.count) }
    }

    public func allreduce(_ values: inout [Float]) throws {
        try values.withUnsafeMutableBufferPointer { try allreduce($0.baseAddress!, count: $0.count) }
    }

    /// Every rank's bytes, concatenated in rank order, and each rank's count.
    public func allgather(_ bytes: UnsafeRawBufferPointer) throws -> (data: [UInt8], counts: [Int]) {
        guard isDistributed else { return ([UInt8](bytes), [bytes.count]) }
        var counts = [Int64](repeating: 0, count: size)
        let mine = [Int64(bytes.count)]
        try allgatherEqual(mine, into: &counts)
        var offsets = [Int64](repeating: 0, count: size)
        for r in 1..<size { offsets[r] = offsets[r - 1] + counts[r - 1] }
        let total = Int(counts.reduce(0, +))
        var out = [UInt8](repeating: 0, count: max(total, 1))
        nonisolated(unsafe) let (send, n) = (bytes.baseAddress, Int64(bytes.count))
        try out.withUnsafeMutableBytes { recv in
            nonisolated(unsafe) let r = recv.baseAddress
            try counts.withUnsafeBufferPointer { c in
                try offsets.withUnsafeBufferPointer { o in
                    nonisolated(unsafe) let (cp, op) = (c.baseAddress, o.baseAddress)
                    try call("allgather of \(bytes.count) bytes") { $0.pointee.allgatherv!(send, n, r, cp, op) }
                }
            }
        }
        return (Array(out.prefix(total)), counts.map(Int.init))
    }

    /// Every rank's `mine` (the same count on each rank) into `all` (size × count), rank order.
    public func allgatherEqual<T>(_ mine: [T], into all: inout [T]) throws {
        let each = Int64(mine.count * MemoryLayout<T>.stride)
        let counts = [Int64](repeating: each, count: size), offsets = (0..<size).map { Int64($0) * each }
        try mine.withUnsafeBytes { s in
            try all.withUnsafeMutableBytes { r in
                nonisolated(unsafe) let (sp, rp) = (s.baseAddress, r.baseAddress)
                try counts.withUnsafeBufferPointer { c in
                    try offsets.withUnsafeBufferPointer { o in
                        nonisolated(unsafe) let (cp, op) = (c.baseAddress, o.baseAddress)
                        try call("allgather") { $0.pointee.allgatherv!(sp, each, rp, cp, op) }
                    }
                }
            }
        }
    }

    /// Send `sendCounts[q]` bytes at `sendOffsets[q]` to each rank q; receive into `recv`.
    public func alltoallv(
        send: UnsafeRawPointer, sendCounts: [Int64], sendOffsets: [Int64], recv: UnsafeMutableRawPointer,
        recvCounts: [Int64], recvOffsets: [Int64]
    ) throws {
        guard isDistributed else {
            recv.advanced(by: Int(recvOffsets[0])).copyMemory(
                from: send.advanced(by: Int(sendOffsets[0])), byteCount: Int(sendCounts[0]))
            return
        }
        nonisolated(unsafe) let (s, r) = (send, recv)
        let counts = [sendCounts, sendOffsets, recvCounts, recvOffsets].flatMap { $0 }
        try counts.withUnsafeBufferPointer { c in
            nonisolated(unsafe) let b = c.baseAddress!
            let n = size
            try call("all-to-all exchange") { $0.pointee.alltoallv!(s, b, b + n, r, b + 2 * n, b + 3 * n) }
        }
    }

    /// root's bytes to every rank.
    public func broadcast(_ buf: UnsafeMutableRawPointer, bytes: Int, root: Int = 0) throws {
        guard isDistributed, bytes > 0 else { return }
        nonisolated(unsafe) let p = buf
        try call("broadcast of \(bytes) bytes") { $0.pointee.broadcast!(p, Int64(bytes), Int32(root)) }
    }

    public func barrier() throws {
        guard isDistributed else { return }
        try call("barrier") { $0.pointee.barrier!() }
    }

    /// End every rank of the job after printing `message` (with this rank's name) to stderr.
    public func abort(_ message: String, code: Int32 = 1) -> Never {
        FileHandle.standardError.write(Data("error: \(describe): \(message)\n".utf8))
        if let api { api.pointee.abort?(code) }
        exit(code)
    }

    // MARK: asynchronous all-reduce (gradient buckets)

    /// Start Σ over ranks of `count` floats at `buf` on the communication thread; the buffer
    /// must stay untouched until `wait` returns.
    public func allreduceAsync(_ buf: UnsafeMutablePointer<Float>, count: Int) -> CommTicket? {
        guard let api, let worker, isDistributed, count > 0 else { return nil }
        nonisolated(unsafe) let p = buf
        return worker.async("gradient all-reduce of \(count) floats") {
            api.pointee.allreduce_sum!(p, Int64(count), VQMOE_COMM_F32)
        }
    }

    /// Wait for an asynchronous call; the time spent waiting is exposed communication.
    public func wait(_ ticket: CommTicket?) throws {
        guard let ticket, let worker, let api else { return }
        let status = worker.wait(ticket)
        guard status == 0 else {
            throw VQMoEError(
                .internalError, "\(describe) at step \(step): \(ticket.what): \(Comm.errorText(api))")
        }
    }

    /// Seconds the communication thread has spent in collectives, and seconds callers waited for them.
    public var timing: (busy: Double, waited: Double) { worker.map { ($0.busySeconds, $0.waitedSeconds) } ?? (0, 0) }
    public func resetTiming() { worker?.resetTiming() }
}
