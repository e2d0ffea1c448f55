// Buffers declared as data: a plugin lists what it needs; the kit states them to the host
// (buffer_spec), and hands the bound memory back by name.
import Glibc
import VQMoEABI

/// One buffer the host allocates for a plugin instance: a trainable parameter (float32, with a
/// gradient) or state saved in checkpoints (any dtype).
///
/// ```swift
/// var buffers: [BufferDecl] {
///     [.param("weight", [nExperts, dModel])] + (bias ? [.param("bias", [nExperts], noDecay: true)] : [])
/// }
/// ```
public struct BufferDecl: Sendable {
    public enum DType: Sendable { case float32, int32, int64, uint8 }
    public let name: String
    public let isParameter: Bool
    public let shape: [Int]
    public let dtype: DType
    public let flags: UInt32

    /// A trainable float32 tensor. `noDecay`: excluded from weight decay; `freezeWhenFineTuning`:
    /// VQMOE_BUF_FREEZE_FT.
    public static func param(
        _ name: String, _ shape: [Int], noDecay: Bool = false, freezeWhenFineTuning: Bool = false
    )
        -> BufferDecl
    {
        BufferDecl(
            name: name, isParameter: true, shape: shape, dtype: .float32,
            flags: (noDecay ? VQMOE_BUF_NO_DECAY : 0) | (freezeWhenFineTuning ? VQMOE_BUF_FREEZE_FT : 0))
    }

    /// State saved in checkpoints (EMA statistics, flags, tables).
    public static func state(_ name: String, _ shape: [Int], _ dtype: DType = .float32) -> BufferDecl {
        BufferDecl(name: name, isParameter: false, shape: shape, dtype: dtype, flags: 0)
    }

    var cDType: vqmoe_dtype {
        switch dtype {
        case .float32: return vqmoe_f32()
        case .int32: return vqmoe_i32()
        case .int64: return vqmoe_i64()
        case .uint8: return vqmoe_dtype(code: UInt8(VQMOE_DTYPE_UINT), bits: 8, lanes: 1)
        }
    }

    /// The C spec (the name is interned: it must outlive the call).
    var cSpec: vqmoe_buffer_spec {
        var s = vqmoe_buffer_spec()
        s.struct_size = UInt32(MemoryLayout<vqmoe_buffer_spec>.size)
        s.name = BufferDecl.intern(name)
        s.role = isParameter ? VQMOE_BUF_PARAM : VQMOE_BUF_STATE
        s.flags = flags
        s.dtype = cDType
        s.ndim = Int32(shape.count)
        withUnsafeMutableBytes(of: &s.shape) { raw in
            for (i, v) in shape.enumerated() { raw.storeBytes(of: Int64(v), toByteOffset: i * 8, as: Int64.self) }
        }
        return s
    }

    nonisolated(unsafe) private static var names: [String: UnsafePointer<CChar>] = [:]
    /// One C string per buffer name for the library's lifetime.
    static func intern(_ name: String) -> UnsafePointer<CChar> {
        if let p = names[name] { return p }
        let p = staticCString(name)
        names[name] = p
        return p
    }
}

/// The memory the host bound to a plugin's declared buffers, by name.
///
/// ```swift
/// func bind(_ b: BoundBuffers) throws(PluginFailure) {
///     weight = try b.floats("weight")
///     weightGrad = b.grad("weight")
/// }
/// ```
public struct BoundBuffers {
    let decls: [BufferDecl]
    let data: [UnsafeMutableRawPointer?]
    let grads: [UnsafeMutablePointer<Float>?]

    init(
        _ decls: [BufferDecl], _ bindings: UnsafePointer<vqmoe_buffer_binding>?, count: Int, bindingSize: UInt32
    )
        throws(PluginFailure)
    {
        guard count == decls.count else {
            throw .invalid("bind_buffers got \(count) bindings, the plugin declared \(decls.count)")
        }
        guard count == 0 || bindings != nil else { throw .invalid("bind_buffers: bindings is NULL") }
        var data: [UnsafeMutableRawPointer?] = [], grads: [UnsafeMutablePointer<Float>?] = []
        for i in 0..<count {
            let b = vqmoe_binding_at(bindings, Int32(i), bindingSize)!.pointee
            guard b.data != nil else { throw .invalid("bind_buffers: '\(decls[i].name)' has no data") }
            data.append(b.data)
            grads.append(b.grad)
        }
        self.decls = decls
        self.data = data
        self.grads = grads
    }

    private func index(_ name: String) throws(PluginFailure) -> Int {
        guard let i = decls.firstIndex(where: { $0.name == name }) else {
            throw .state("no buffer '\(name)' is declared")
        }
        return i
    }

    public func has(_ name: String) -> Bool { decls.contains { $0.name == name } }

    /// A float32 buffer's data.
    public func floats(_ name: String) throws(PluginFailure) -> UnsafeMutablePointer<Float> {
        try data[index(name)]!.assumingMemoryBound(to: Float.self)
    }

    /// An int32 buffer's data.
    public func ints(_ name: String) throws(PluginFailure) -> UnsafeMutablePointer<Int32> {
        try data[index(name)]!.assumingMemoryBound(to: Int32.self)
    }

    /// Any buffer's bytes.
    public func raw(_ name: String) throws(PluginFailure) -> UnsafeMutableRawPointer { try data[index(name)]! }

    /// A parameter's gradient (nil for state, an undeclared name, or when the host gives none).
    public func grad(_ name: String) -> UnsafeMutablePointer<Float>? {
        guard let i = decls.firstIndex(where: { $0.name == name }) else { return nil }
        return grads[i]
    }
}
