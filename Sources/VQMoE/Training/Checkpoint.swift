import Foundation

/// Checkpoints in the safetensors format (loadable with the `safetensors` / NumPy / PyTorch
/// tools) plus a JSON sidecar with the resolved config and run state.
///
/// File layout: 8-byte little-endian header length, a JSON header
/// `{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets"}}`, then the raw data. The
/// metadata carries the format tag and the sha256 of the data section, so a truncated or
/// altered file is refused. Writes are atomic: temp file, fsync, rename.
///
/// ```swift
/// try Checkpoint.write(path: "run/best.safetensors", tensors: model.checkpointTensors(), metadata: ["step": "120"])
/// let ck = try Checkpoint.read(path: "run/best.safetensors")
/// ```
public enum Checkpoint {
    public static let format = "vqmoe-checkpoint-1"

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

    public static func write(path: String, tensors: [Tensor], metadata: [String: String]) throws {
        var header: [String: Any] = [:]
        var offset = 0
        for t in tensors {
            header[t.name] = ["dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.bytes.count]]
            offset += t.bytes.count
        }
        var body = Data(capacity: offset)
        for t in tensors { body.append(contentsOf: t.bytes) }
        var meta = metadata
        meta["format"] = format
        meta["sha256"] = SHA256.hex(of: [UInt8](body))
        header["__metadata__"] = meta
        var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
        while json.count % 8 != 0 { json.append(0x20) }
        var file = Data()
        var len = UInt64(json.count).littleEndian
        withUnsafeBytes(of: &len) { file.append(contentsOf: $0) }
        file.append(json)
        file.append(body)
        try atomicWrite(file, to: path)
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
        ok = ok && fsync(fd) == 0
        close(fd)
        guard ok, rename(tmp, path) == 0 else {
            unlink(tmp)
            throw VQMoEError(.checkpoint, "\(path): write failed (\(String(cString: strerror(errno))))")
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
        let len = Int(file.prefix(8).withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }.littleEndian)
        guard len > 0, 8 + len <= file.count else {
            throw bad("header length \(len) exceeds the file (\(file.count) bytes): truncated?")
        }
        guard let header = try? JSONSerialization.jsonObject(with: file.subdata(in: 8..<(8 + len))) as? [String: Any],
            let meta = header["__metadata__"] as? [String: String]
        else { throw bad("the header is not safetensors JSON") }
        guard meta["format"] == format else {
            throw bad("format is \(meta["format"] ?? "missing"), expected \(format)")
        }
        let body = file.subdata(in: (8 + len)..<file.count)
        guard let want = meta["sha256"], SHA256.hex(of: [UInt8](body)) == want else {
            throw bad("checksum mismatch: the data was truncated or altered")
        }
        var tensors: [String: (String, [Int], Data)] = [:]
        for (name, v) in header where name != "__metadata__" {
            guard let o = v as? [String: Any], let dtype = o["dtype"] as? String, let shape = o["shape"] as? [Int],
                let off = o["data_offsets"] as? [Int], off.count == 2, off[0] <= off[1], off[1] <= body.count
            else {
                throw bad("entry '\(name)' is malformed")
            }
            tensors[name] = (dtype, shape, body.subdata(in: off[0]..<off[1]))
        }
        return Loaded(tensors: tensors.mapValues { (dtype: $0.0, shape: $0.1, data: $0.2) }, metadata: meta)
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
            _ name: String, into dst: UnsafeMutableRawPointer, bytes: Int, shape: [Int], shard: AxisShard? = nil
        ) throws {
            guard let t = ck.tensors[name] else { throw VQMoEError(.checkpoint, "\(path): missing tensor '\(name)'") }
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
            try copy("state.\(s.name)", into: s.buffer.data, bytes: s.buffer.byteCount, shape: s.buffer.shape)
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
