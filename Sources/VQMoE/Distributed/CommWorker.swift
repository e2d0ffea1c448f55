import Foundation

/// A pending call on the communication thread.
public final class CommTicket: @unchecked Sendable {
    let what: String
    let done = DispatchSemaphore(value: 0)
    var status: Int32 = 0
    /// Seconds the communication thread spent in this call (set when it is done).
    public internal(set) var seconds = 0.0
    init(_ what: String) { self.what = what }
}

/// The one thread that talks to the communication backend. Callers queue work and either wait
/// for it (`sync`) or go on and wait later (`async` + `wait`: gradient buckets reduced while the
/// backward computes). Every wait is bounded: a call that does not finish within `timeout`
/// seconds means another rank died or hangs, and the process prints which call at which step
/// and ends the job (the launcher then stops the other ranks).
///
/// ```swift
/// let w = CommWorker(timeout: 300)
/// let t = w.async("bucket 3") { api.pointee.allreduce_sum(p, n, VQMOE_COMM_F32) }
/// …                                   // more backward
/// _ = w.wait(t)
/// ```
final class CommWorker: @unchecked Sendable {
    let timeout: Double
    /// "rank 0 of 2 (host) at step 12", for the message of a timeout.
    var describe: () -> String = { "this rank" }
    /// Ends the job (the backend's abort).
    var abort: (Int32) -> Void = { exit($0) }
    private let lock = NSCondition()
    private var queue: [(CommTicket, () -> Int32)] = []
    private var thread: Thread?
    /// Seconds spent inside backend calls; seconds callers spent waiting for asynchronous ones.
    private(set) var busySeconds = 0.0, waitedSeconds = 0.0

    init(timeout: Double) {
        self.timeout = timeout
        let t = Thread { [unowned self] in self.loop() }
        t.name = "vqmoe-comm"
        t.stackSize = 1 << 20
        thread = t
        t.start()
    }

    private func loop() {
        while true {
            lock.lock()
            while queue.isEmpty { lock.wait() }
            let (ticket, body) = queue.removeFirst()
            lock.unlock()
            let t0 = DispatchTime.now().uptimeNanoseconds
            ticket.status = body()
            let dt = Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
            ticket.seconds = dt
            lock.lock()
            busySeconds += dt
            lock.unlock()
            ticket.done.signal()
        }
    }

    func async(_ what: String, _ body: @escaping () -> Int32) -> CommTicket {
        let ticket = CommTicket(what)
        lock.lock()
        queue.append((ticket, body))
        lock.signal()
        lock.unlock()
        return ticket
    }

    /// Wait for `ticket`; past the timeout, end the job with a message.
    func wait(_ ticket: CommTicket) -> Int32 {
        let t0 = DispatchTime.now().uptimeNanoseconds
        if ticket.done.wait(timeout: .now() + timeout) == .timedOut {
            let message =
                "error: \(describe()): \(ticket.what) got no answer from the other ranks within \(Int(timeout)) s "
                + "(a rank died or hangs); ending the job\n"
            FileHandle.standardError.write(Data(message.utf8))
            abort(3)
            exit(3)
        }
        lock.lock()
        waitedSeconds += Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9
        lock.unlock()
        return ticket.status
    }

    func sync(_ what: String, _ body: @escaping () -> Int32) -> Int32 { wait(async(what, body)) }

    func resetTiming() {
        lock.lock()
        (busySeconds, waitedSeconds) = (0, 0)
        lock.unlock()
    }
}
