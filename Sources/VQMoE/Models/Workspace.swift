import Foundation

/// Named scratch buffers that grow on demand and are reused across steps, so hot paths do not
/// allocate per call.
///
/// ```swift
/// let ws = Workspace()
/// let h = ws.floats("h", n * d)        // reused (and grown when needed) on later calls
/// ```
public final class Workspace: @unchecked Sendable {
    private var buffers: [String: (ptr: UnsafeMutableRawPointer, bytes: Int)] = [:]

    public init() {}
    deinit { for (_, b) in buffers { free(b.ptr) } }

    private func raw(_ key: String, _ bytes: Int) -> UnsafeMutableRawPointer {
        if let b = buffers[key], b.bytes >= bytes { return b.ptr }
        if let old = buffers[key] { free(old.ptr) }
        let cap = max(bytes, 64)
        let p = HostRuntime.alignedAlloc(cap)!
        buffers[key] = (p, cap)
        return p
    }

    public func floats(_ key: String, _ count: Int) -> UnsafeMutablePointer<Float> {
        raw(key, count * 4).bindMemory(to: Float.self, capacity: count)
    }

    public func ints(_ key: String, _ count: Int) -> UnsafeMutablePointer<Int32> {
        raw(key, count * 4).bindMemory(to: Int32.self, capacity: count)
    }

    /// Zero-filled floats.
    public func zeros(_ key: String, _ count: Int) -> UnsafeMutablePointer<Float> {
        let p = floats(key, count)
        p.initialize(repeating: 0, count: count)
        return p
    }

    /// Bytes currently held.
    public var bytes: Int { buffers.values.reduce(0) { $0 + $1.bytes } }
}
