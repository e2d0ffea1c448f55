import Foundation

/// A TensorBoard event file in the run directory, `events.out.tfevents.<time>.<host>.<pid>`:
/// TFRecord framing (length, masked CRC-32C of the length, an `Event` protobuf, its masked
/// CRC-32C) of
///
///     Event { wall_time = 1 (double), step = 2 (int64),
///             file_version = 3 ("brain.Event:2", the first event) | summary = 5 | session_log = 7 }
///     Summary { repeated Value value = 1 }    Value { tag = 1 (string), simple_value = 2 (float) }
///     SessionLog { status = 1 (START = 1) }
///
/// Every metrics line becomes one event of scalars (`MetricsLog` mirrors into it): the record's
/// numbers as `<split>/<key>` (`train/loss`, `train/lr`, `valid/bpc`, `valid/accuracy`, ...),
/// per-layer lists as `<split>/<key>/layer_<i>` (and `/level_<j>` for residual levels). A resumed
/// run opens a new file that starts with a SessionLog START at the resume step, so TensorBoard
/// drops the first file's events from that step on (those of steps past the last checkpoint):
/// each step is shown once, as in `metrics.jsonl`. Writes are POSIX appends; a failed one is an
/// I/O error naming the file.
///
/// ```swift
/// let events = try TensorBoardEvents(directory: "runs/x", resumingAt: nil)
/// try events.write([("train/loss", 2.31)], step: 10)
/// // tensorboard --logdir runs
/// ```
public final class TensorBoardEvents {
    public let path: String
    private let fd: Int32

    /// Record keys that are not curves: the step and split, per-expert and per-code
    /// distributions, probe tokens' expert ids.
    static let notScalars: Set<String> = [
        "step", "split", "expert_load", "code_counts", "router_top1", "discrete_top1",
    ]

    /// Open a new event file in `directory`; `resumingAt`: the step a resumed run continues from.
    public init(directory: String, resumingAt step: Int?) throws {
        var host = [UInt8](repeating: 0, count: 256)
        gethostname(&host, host.count - 1)
        let hostname = String(decoding: host.prefix { $0 != 0 }, as: UTF8.self)
        let base = "\(directory)/events.out.tfevents.\(Int(Date().timeIntervalSince1970)).\(hostname).\(getpid())"
        var name = base, fd: Int32 = -1
        for n in 0..<100 {
            name = n == 0 ? base : "\(base).\(n)"
            fd = open(name, O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0o644)
            if fd >= 0 || errno != EEXIST { break }
        }
        guard fd >= 0 else {
            throw VQMoEError(
                .io, "\(name): cannot create the TensorBoard event file (\(String(cString: strerror(errno))))")
        }
        (path, self.fd) = (name, fd)
        var first = ProtoWriter()
        first.double(1, Date().timeIntervalSince1970)
        first.string(3, "brain.Event:2")
        try append(first.bytes)
        if let step {
            var start = ProtoWriter(), log = ProtoWriter()
            log.varint(1, 1)  // SessionLog.status = START
            start.double(1, Date().timeIntervalSince1970)
            start.varint(2, UInt64(step))
            start.message(7, log.bytes)
            try append(start.bytes)
        }
    }

    deinit { close(fd) }

    /// One event holding every (tag, value) as a scalar at `step`.
    public func write(_ values: [(tag: String, value: Double)], step: Int) throws {
        guard !values.isEmpty else { return }
        var summary = ProtoWriter()
        for (tag, value) in values {
            var v = ProtoWriter()
            v.string(1, tag)
            v.float(2, Float(value))
            summary.message(1, v.bytes)
        }
        var event = ProtoWriter()
        event.double(1, Date().timeIntervalSince1970)
        event.varint(2, UInt64(bitPattern: Int64(step)))
        event.message(5, summary.bytes)
        try append(event.bytes)
    }

    /// The scalars of one metrics line (a JSON object with `step` and `split`); null is NaN.
    public static func scalars(of record: [String: Any]) -> (step: Int, values: [(tag: String, value: Double)])? {
        guard let step = record["step"] as? Int, let split = record["split"] as? String else { return nil }
        func number(_ v: Any) -> Double? { v is NSNull ? .nan : (v as? NSNumber)?.doubleValue }
        var out: [(tag: String, value: Double)] = []
        for key in record.keys.sorted() where !notScalars.contains(key) {
            let value = record[key]!, tag = "\(split)/\(key)"
            if let x = number(value) {
                out.append((tag, x))
            } else if let layers = value as? [Any] {
                for (i, layer) in layers.enumerated() {
                    if let x = number(layer) {
                        out.append(("\(tag)/layer_\(i)", x))
                    } else if let levels = layer as? [Any] {
                        for (j, level) in levels.enumerated() {
                            guard let x = number(level) else { continue }
                            out.append((levels.count == 1 ? "\(tag)/layer_\(i)" : "\(tag)/layer_\(i)/level_\(j)", x))
                        }
                    }
                }
            }
        }
        return (step, out)
    }

    /// One TFRecord: length, masked CRC of the length, data, masked CRC of the data.
    private func append(_ data: [UInt8]) throws {
        var record = [UInt8]()
        record.reserveCapacity(data.count + 16)
        let length = withUnsafeBytes(of: UInt64(data.count).littleEndian, Array.init)
        record += length
        record += withUnsafeBytes(of: CRC32C.masked(length).littleEndian, Array.init)
        record += data
        record += withUnsafeBytes(of: CRC32C.masked(data).littleEndian, Array.init)
        try appendAll(fd, record, path: path, what: "a TensorBoard event")
    }
}

/// Write all of `bytes` to `fd` (POSIX, retrying short writes), or throw an I/O error naming
/// `path`, `what` was written and the system's reason ("No space left on device").
func appendAll(_ fd: Int32, _ bytes: [UInt8], path: String, what: String) throws {
    var rest = bytes[...]
    while !rest.isEmpty {
        let n = rest.withUnsafeBytes { Glibc.write(fd, $0.baseAddress!, $0.count) }
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else {
            throw VQMoEError(
                .io, "\(path): cannot append \(what) (\(String(cString: strerror(n < 0 ? errno : ENOSPC))))")
        }
        rest = rest.dropFirst(n)
    }
}

/// The protobuf wire format, for the few field types an event uses (little-endian fixed widths,
/// base-128 varints, length-delimited strings and messages).
struct ProtoWriter {
    var bytes: [UInt8] = []

    private mutating func raw(_ v: UInt64) {
        var v = v
        while v >= 0x80 {
            bytes.append(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        bytes.append(UInt8(v))
    }

    private mutating func key(_ field: Int, _ wireType: UInt64) { raw(UInt64(field) << 3 | wireType) }

    mutating func varint(_ field: Int, _ v: UInt64) {
        key(field, 0)
        raw(v)
    }

    mutating func double(_ field: Int, _ v: Double) {
        key(field, 1)
        bytes += withUnsafeBytes(of: v.bitPattern.littleEndian, Array.init)
    }

    mutating func float(_ field: Int, _ v: Float) {
        key(field, 5)
        bytes += withUnsafeBytes(of: v.bitPattern.littleEndian, Array.init)
    }

    mutating func message(_ field: Int, _ m: [UInt8]) {
        key(field, 2)
        raw(UInt64(m.count))
        bytes += m
    }

    mutating func string(_ field: Int, _ s: String) { message(field, Array(s.utf8)) }
}
