import Foundation

/// Checkpoints in the safetensors format (loadable with the `safetensors` / NumPy / PyTorch
/// tools) plus a JSON sidecar with the resolved config and run state.
///
/// File layout: 8-byte little-endian header length, a JSON header
/// `{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets"}}`, then the raw data. The
/// metadata carries the format tag and a sha256 that covers the header's meaning and the data
/// (`digest`): a truncated file, altered data or an edited header (a swapped offset, a changed
/// shape) is refused. Before a byte is used, the header length, every dtype, shape and offset is
/// checked against the file (sizes with overflow checks; the tensors tile the data exactly).
/// Writes are atomic: temp file, fsync, rename.
///
/// ```swift
/// let sha = try Checkpoint.write(path: "run/best.safetensors", tensors: model.checkpointTensors(), metadata: ["step": "120"])
/// let ck = try Checkpoint.read(path: "run/best.safetensors")   // ck.metadata["sha256"] == sha
/// ```
public enum Checkpoint {
    /// Format 2: the checksum covers header and data. Format 1 (data only) still loads.
    public static let format = "vqmoe-checkpoint-2"
    static let legacyFormat = "vqmoe-checkpoint-1"

    /// Bytes per element of the dtypes a checkpoint may hold.
    static let dtypeSizes: [String: Int] = ["F32": 4, "I32": 4, "I64": 8, "U8": 1, "U64": 8]
    /// The largest JSON header read (a 2^63 length field is refused, not allocated).
    static let maxHeaderBytes = 64 << 20

    /// A tensor to save: name, dtype ("F32", "I32", "I64", "U8"), shape and raw bytes.
    public struct Tensor {
        public var name: String
        public var dtype: String
        public var shape: [Int]
        public var bytes: UnsafeRawBufferPointer
        /// Expert parallelism: these are rows `shard.offset ...` (axis 0) of a tensor the ranks
        /// hold between them; the checkpoint gathers the whole tensor (`Trainer.saveCheckpoint`).
        public var shard: AxisShard?
        public init(
            name: String, dtype: String, shape: [Int], bytes: UnsafeRawBufferPointer, shard: AxisShard? = nil
        ) {
            self.name = name; self.dtype = dtype; self.shape = shape; self.bytes = bytes; self.shard = shard
        }
    }

    /// A checkpoint read back: tensors by name (bytes), metadata.
    public struct Loaded {
        public var tensors: [String: (dtype: String, shape: [Int], data: Data)]
        public var metadata: [String: String]
    }

    /// One index entry: dtype, shape, [begin, end) in the data section.
    struct Entry {
        var dtype: String
        var shape: [Int]
        var begin: Int, end: Int
    }

    /// The format-2 checksum: sha256 of a canonical text of the header followed by the data,
    ///     "vqmoe-checkpoint-2\n"
    ///     "meta <len>:<key> <len>:<value>\n"           every metadata key but sha256, sorted
    ///     "tensor <len>:<name> <dtype> <d0,d1,...> <begin> <end>\n"   every tensor, sorted by name
    ///     "\n" <data bytes>
    /// (<len> = UTF-8 byte count), so it does not depend on how the JSON was spelled.
    static func digest(meta: [String: String], entries: [String: Entry], body: UnsafeRawBufferPointer) -> String {
        func field(_ s: String) -> String { "\(s.utf8.count):\(s)" }
        var text = format + "\n"
        for (k, v) in meta.sorted(by: { $0.key < $1.key }) where k != "sha256" {
            text += "meta \(field(k)) \(field(v))\n"
        }
        for (name, e) in entries.sorted(by: { $0.key < $1.key }) {
            text +=
                "tensor \(field(name)) \(e.dtype) \(e.shape.map(String.init).joined(separator: ",")) \(e.begin) \(e.end)\n"
        }
        text += "\n"
        return SHA256.hex(of: Array(text.utf8) + Array(body.bindMemory(to: UInt8.self)))
    }

    /// Write the checkpoint atomically; returns its checksum (the metadata's sha256), which a
    /// sidecar records to pair itself with this file.
    @discardableResult
    public static func write(path: String, tensors: [Tensor], metadata: [String: String]) throws -> String {
        var entries: [String: Entry] = [:]
        var offset = 0
        for t in tensors {
            entries[t.name] = Entry(dtype: t.dtype, shape: t.shape, begin: offset, end: offset + t.bytes.count)
            offset += t.bytes.count
        }
        var body = Data(capacity: offset)
        for t in tensors { body.append(contentsOf: t.bytes) }
        var meta = metadata
        meta["format"] = format
        let sha = body.withUnsafeBytes { digest(meta: meta, entries: entries, body: $0) }
        meta["sha256"] = sha
        var header: [String: Any] = entries.mapValues {
            ["dtype": $0.dtype, "shape": $0.shape, "data_offsets": [$0.begin, $0.end]]
        }
        header["__metadata__"] = meta
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while json.count % 8 != 0 { json.append(0x20) }
        var file = Data()
        var len = UInt64(json.count).littleEndian
        withUnsafeBytes(of: &len) { file.append(contentsOf: $0) }
        file.append(json)
        file.append(body)
        try atomicWrite(file, to: path)
        return sha
    }

    /// Write `data` to `path` atomically: a temp file beside it, fsync, rename.
    public static func atomicWrite(_ data: Data, to path: String) throws {
        let tmp = path + ".tmp-\(getpid())"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else {
            throw VQMoEError(.checkpoint, "\(tmp): cannot create (\(String(cString: strerror(errno))))")
        }
        var ok = true
        data.withUnsafeBytes { raw in
            var done = 0
            while done < raw.count {
                let n = Glibc.write(fd, raw.baseAddress! + done, raw.count - done)
                if n <= 0 { ok = false; break }
                done += n
            }
        }
        let writeErrno = errno
        ok = ok && fsync(fd) == 0
        close(fd)
        guard ok, rename(tmp, path) == 0 else {
            let why = String(cString: strerror(errno != 0 ? errno : writeErrno))
            unlink(tmp)
            throw VQMoEError(.io, "\(path): write failed (\(why)); the previous file, if any, is unchanged")
        }
    }

    public static func read(path: String) throws -> Loaded {
        guard let file = FileManager.default.contents(atPath: path) else {
            throw VQMoEError(.checkpoint, "\(path): cannot read the checkpoint")
        }
        func bad(_ why: String) -> VQMoEError {
            VQMoEError(.checkpoint, "\(path): not a valid vqmoe checkpoint: \(why)")
        }
        guard file.count >= 8 else { throw bad("file too short (\(file.count) bytes)") }
        let len64 = file.prefix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }.littleEndian
        guard len64 > 0, len64 <= UInt64(min(file.count - 8, maxHeaderBytes)) else {
            throw bad("header length \(len64) does not fit the file (\(file.count) bytes): truncated or altered?")
        }
        let len = Int(len64)
        guard let header = try? JSONSerialization.jsonObject(with: file.subdata(in: 8..<(8 + len))) as? [String: Any],
            let meta = header["__metadata__"] as? [String: String]
        else { throw bad("the header is not safetensors JSON with string metadata") }
        guard meta["format"] == format || meta["format"] == legacyFormat else {
            throw bad("format is \(meta["format"] ?? "missing"), expected \(format)")
        }
        let body = file.subdata(in: (8 + len)..<file.count)
        var entries: [String: Entry] = [:]
        for (name, v) in header where name != "__metadata__" {
            entries[name] = try entry(name, v, bodyBytes: body.count, bad: bad)
        }
        try checkTiling(entries, bodyBytes: body.count, bad: bad)
        let want = meta["sha256"] ?? ""
        let got =
            meta["format"] == format
            ? body.withUnsafeBytes { digest(meta: meta, entries: entries, body: $0) } : SHA256.hex(of: [UInt8](body))
        guard got == want else { throw bad("checksum mismatch: the header or the data was truncated or altered") }
        return Loaded(
            tensors: entries.mapValues {
                (dtype: $0.dtype, shape: $0.shape, data: body.subdata(in: $0.begin..<$0.end))
            },
            metadata: meta)
    }

    /// One header entry, checked: a known dtype, non-negative dims whose product (times the
    /// dtype size, overflow-checked) is the byte range, offsets inside the data.
    static func entry(_ name: String, _ v: Any, bodyBytes: Int, bad: (String) -> VQMoEError) throws -> Entry {
        guard let o = v as? [String: Any], let dtype = o["dtype"] as? String, let shape = o["shape"] as? [Int],
            let off = o["data_offsets"] as? [Int], off.count == 2
        else { throw bad("entry '\(name)' is malformed (needs dtype, shape and two data_offsets)") }
        guard let size = dtypeSizes[dtype] else {
            throw bad("entry '\(name)' has dtype \(dtype); known: \(dtypeSizes.keys.sorted().joined(separator: ", "))")
        }
        var bytes = size
        for d in shape {
            guard d >= 0 else { throw bad("entry '\(name)' has a negative dimension in \(shape)") }
            let (p, overflow) = bytes.multipliedReportingOverflow(by: d)
            guard !overflow, p <= bodyBytes else {
                throw bad("entry '\(name)' of shape \(shape) is larger than the file's data (\(bodyBytes) bytes)")
            }
            bytes = p
        }
        guard off[0] >= 0, off[0] <= off[1], off[1] <= bodyBytes else {
            throw bad("entry '\(name)' has data_offsets \(off) outside the data (\(bodyBytes) bytes): truncated?")
        }
        guard off[1] - off[0] == bytes else {
            throw bad(
                "entry '\(name)': \(dtype) \(shape) needs \(bytes) bytes, data_offsets \(off) hold \(off[1] - off[0])")
        }
        return Entry(dtype: dtype, shape: shape, begin: off[0], end: off[1])
    }

    /// The byte ranges tile the data section: no overlap, no gap, nothing after the last.
    static func checkTiling(_ entries: [String: Entry], bodyBytes: Int, bad: (String) -> VQMoEError) throws {
        var at = 0
        for (name, e) in entries.sorted(by: { ($0.value.begin, $0.value.end) < ($1.value.begin, $1.value.end) }) {
            guard e.begin == at else {
                throw bad("entry '\(name)' starts at byte \(e.begin), expected \(at) (tensors overlap or leave a gap)")
            }
            at = e.end
        }
        guard at == bodyBytes else { throw bad("\(bodyBytes - at) bytes after the last tensor: truncated or altered?") }
    }

    /// safetensors dtype of a host buffer.
    static func dtypeName(_ b: HostBuffer) -> String {
        switch (b.dtype.code, b.dtype.bits) {
        case (2, 32): return "F32"
        case (0, 32): return "I32"
        case (0, 64): return "I64"
        case (1, 8): return "U8"
        case (1, 64): return "U64"
        default: return "U8"
        }
    }
}

extension Transformer {
    /// Every parameter and plugin state buffer (and a Transformer-XL's training memory), plus
    /// the optimizer's state slots (`optimizer.<slot>.<parameter>`) when given.
    public func checkpointTensors(optimizer: Optimizer? = nil) -> [Checkpoint.Tensor] {
        var out = parameters.map {
            Checkpoint.Tensor(
                name: $0.name, dtype: "F32", shape: $0.shape,
                bytes: UnsafeRawBufferPointer(start: $0.data, count: $0.count * 4), shard: $0.shard)
        }
        out += stateBuffers.map {
            Checkpoint.Tensor(
                name: "state.\($0.name)", dtype: Checkpoint.dtypeName($0.buffer), shape: $0.buffer.shape,
                bytes: UnsafeRawBufferPointer(start: $0.buffer.data, count: $0.buffer.byteCount))
        }
        out += trainMemory?.checkpointTensors() ?? []
        for slot in optimizer?.slots ?? [] {
            for (p, buffer) in zip(optimizer!.parameters, slot.buffers) {
                out.append(
                    Checkpoint.Tensor(
                        name: "optimizer.\(slot.name).\(p.name)", dtype: "F32", shape: p.shape,
                        bytes: UnsafeRawBufferPointer(start: buffer, count: p.count * 4), shard: p.shard))
            }
        }
        return out
    }

    /// Load parameters and state buffers (and, resuming — optimizer given —, the optimizer's
    /// slots and a Transformer-XL's training memory) from a checkpoint; every tensor of the
    /// model must be present with its shape. A sharded parameter (expert parallelism) takes its
    /// rows of the whole tensor the file holds, so any layout loads any checkpoint.
    public func load(_ ck: Checkpoint.Loaded, optimizer: Optimizer? = nil, path: String) throws {
        func copy(
            _ name: String, into dst: UnsafeMutableRawPointer, bytes: Int, shape: [Int], shard: AxisShard? = nil,
            dtype: String = "F32"
        ) throws {
            guard let t = ck.tensors[name] else { throw VQMoEError(.checkpoint, "\(path): missing tensor '\(name)'") }
            guard t.dtype == dtype else {
                throw VQMoEError(.checkpoint, "\(path): tensor '\(name)' is \(t.dtype), the model needs \(dtype)")
            }
            let whole = shard.map { [$0.global] + shape.dropFirst() } ?? shape
            guard t.shape == whole, t.data.count == bytes / max(shape.first ?? 1, 1) * (whole.first ?? 1) else {
                throw VQMoEError(
                    .checkpoint, "\(path): tensor '\(name)' has shape \(t.shape), the model needs \(whole)")
            }
            let first = (shard?.offset ?? 0) * bytes / max(shape.first ?? 1, 1)
            t.data.withUnsafeBytes { _ = memcpy(dst, $0.baseAddress! + first, bytes) }
        }
        for p in parameters { try copy(p.name, into: p.data, bytes: p.count * 4, shape: p.shape, shard: p.shard) }
        for s in stateBuffers {
            try copy(
                "state.\(s.name)", into: s.buffer.data, bytes: s.buffer.byteCount, shape: s.buffer.shape,
                dtype: Checkpoint.dtypeName(s.buffer))
        }
        guard let optimizer else { return }
        try trainMemory?.load(ck, path: path)
        for slot in optimizer.slots {
            for (p, buffer) in zip(optimizer.parameters, slot.buffers) {
                try copy(
                    "optimizer.\(slot.name).\(p.name)", into: buffer, bytes: p.count * 4, shape: p.shape, shard: p.shard
                )
            }
        }
    }
}
