import CFFI
import Foundation

/// A registry entry that names a plain C function and its signature; the host calls it
/// through libffi as a non-trainable router or quantizer (docs/design.md, "The plugin ABI",
/// rule 10). No ABI glue on the C side.
///
/// The signature is a C prototype whose parameter NAMES say what the host passes:
///
/// | name | type | value |
/// |---|---|---|
/// | `x` | `const float *` | token representations (n,d) |
/// | `token_ids` | `const int32_t *` | token ids (n) |
/// | `n`, `d`, `n_experts`, `n_codes` | `int64_t` or `int32_t` | sizes (`n_codes`: the codebook size K) |
/// | `seed` | `uint64_t` | per-step seed |
/// | `expert` | `int32_t *` | output of a router: one expert per token |
/// | `code` | `int32_t *` | output of a quantizer: one code in [0, K) per token |
///
/// The return type is `void`, or `int32_t` (non-zero = error). The output names the kind.
/// ```swift
/// let sig = try FFISignature("void(const int32_t *token_ids, int64_t n, int64_t n_experts, int32_t *expert)")
/// ```
public struct FFISignature: Sendable, Equatable {
    public enum Role: String, Sendable, CaseIterable { case x, token_ids, n, d, n_experts, n_codes, seed, expert, code }
    public enum CType: String, Sendable {
        case int32 = "int32_t", int64 = "int64_t", uint64 = "uint64_t",
            floatPtr = "const float *", int32Ptr = "int32_t *",
            constInt32Ptr = "const int32_t *"
    }
    public let returnsStatus: Bool
    public let params: [(role: Role, type: CType)]

    public static func == (a: FFISignature, b: FFISignature) -> Bool {
        a.returnsStatus == b.returnsStatus && a.params.map(\.role) == b.params.map(\.role)
            && a.params.map(\.type) == b.params.map(\.type)
    }

    private static let allowed: [Role: [CType]] = [
        .x: [.floatPtr], .token_ids: [.constInt32Ptr], .n: [.int64, .int32], .d: [.int64, .int32],
        .n_experts: [.int64, .int32], .n_codes: [.int64, .int32], .seed: [.uint64], .expert: [.int32Ptr],
        .code: [.int32Ptr],
    ]

    public init(_ text: String) throws {
        func fail(_ why: String) -> VQMoEError {
            VQMoEError(.registry, "ffi signature \"\(text)\": \(why)")
        }
        guard let open = text.firstIndex(of: "("),
            text.hasSuffix(")") || text.trimmingCharacters(in: .whitespaces).hasSuffix(")")
        else {
            throw fail("expected RETURN_TYPE [name](TYPE NAME, ...)")
        }
        let head = text[..<open].split(separator: " ").map(String.init)
        guard let ret = head.first else { throw fail("missing return type") }
        switch ret {
        case "void": returnsStatus = false
        case "int32_t", "int": returnsStatus = true
        default: throw fail("return type '\(ret)' is not supported (void or int32_t)")
        }
        if head.count > 2 { throw fail("unexpected '\(head[2...].joined(separator: " "))' before '('") }
        guard let close = text.lastIndex(of: ")"), close > open else { throw fail("missing ')'") }
        let inner = text[text.index(after: open)..<close].trimmingCharacters(in: .whitespaces)
        var params: [(Role, CType)] = []
        if !inner.isEmpty && inner != "void" {
            for raw in inner.split(separator: ",", omittingEmptySubsequences: false) {
                let p = raw.trimmingCharacters(in: .whitespaces)
                guard let nameRange = p.range(of: "[A-Za-z_][A-Za-z0-9_]*$", options: .regularExpression) else {
                    throw fail("parameter '\(p)' has no name")
                }
                let name = String(p[nameRange])
                let typeText = p[..<nameRange.lowerBound].replacingOccurrences(of: " ", with: "")
                guard !typeText.isEmpty else { throw fail("parameter '\(name)' has no type") }
                let normalized: String
                switch typeText {
                case "int32_t", "int": normalized = "int32_t"
                case "int64_t", "long", "longlong": normalized = "int64_t"
                case "uint64_t": normalized = "uint64_t"
                case "constfloat*", "floatconst*": normalized = "const float *"
                case "int32_t*", "int*": normalized = "int32_t *"
                case "constint32_t*", "int32_tconst*", "constint*": normalized = "const int32_t *"
                default:
                    let type = p[..<nameRange.lowerBound].trimmingCharacters(in: .whitespaces)
                    throw fail("type of '\(name)' ('\(type)') is not supported")
                }
                guard let role = Role(rawValue: name == "ids" ? "token_ids" : name) else {
                    throw fail(
                        "parameter '\(name)' has no meaning to the host; names: "
                            + "\(Role.allCases.map(\.rawValue).joined(separator: ", "))"
                    )
                }
                let type = CType(rawValue: normalized)!
                guard FFISignature.allowed[role]!.contains(type) else {
                    let allowed = FFISignature.allowed[role]!.map(\.rawValue).joined(separator: " or ")
                    throw fail("'\(name)' must be \(allowed), not \(normalized)")
                }
                if params.contains(where: { $0.0 == role }) { throw fail("'\(name)' appears twice") }
                params.append((role, type))
            }
        }
        let outputs = params.filter { $0.0 == .expert || $0.0 == .code }.count
        guard outputs == 1 else {
            throw fail(
                outputs == 0
                    ? "needs an output parameter 'int32_t *expert' (a router) or 'int32_t *code' (a quantizer)"
                    : "has both 'expert' and 'code': a function is a router or a quantizer")
        }
        if params.contains(where: { $0.0 == .code }) && !params.contains(where: { $0.0 == .x }) {
            throw fail("a quantizer reads the token representations: add 'const float *x'")
        }
        self.params = params.map { (role: $0.0, type: $0.1) }
    }

    /// A router (output `expert`) or a quantizer (output `code`).
    public var kind: PluginKind { params.contains { $0.role == .expert } ? .router : .quantizer }

    /// Whether the function reads token ids.
    public var needsTokenIDs: Bool { params.contains { $0.role == .token_ids } }
}

/// The `ffi` object of a registry entry: library, symbol and signature.
public struct FFISignatureEntry: Sendable {
    public let library: String
    public let symbol: String
    public let signatureText: String
    public let signature: FFISignature

    init(json: [String: Any], origin: String, expand: (String) -> String) throws {
        for key in json.keys.sorted() where !["library", "symbol", "signature"].contains(key) {
            throw VQMoEError(.registry, "\(origin).\(key): unknown key; known: library, symbol, signature")
        }
        guard let lib = json["library"] as? String else { throw VQMoEError(.registry, "\(origin).library: missing") }
        guard let sym = json["symbol"] as? String else { throw VQMoEError(.registry, "\(origin).symbol: missing") }
        guard let sig = json["signature"] as? String else {
            throw VQMoEError(.registry, "\(origin).signature: missing")
        }
        library = expand(lib)
        symbol = sym
        signatureText = sig
        do { signature = try FFISignature(sig) } catch let e as VQMoEError {
            throw VQMoEError(.registry, "\(origin): \(e.message)")
        }
    }
}

/// A C function bound through libffi: a router (one expert per token) or a quantizer (one code
/// per token). `FFIComponent` wraps it as a plugin library, so training, `plugins check` and
/// every command use it through the same instance wrappers as a native plugin.
///
/// ```swift
/// let f = try FFIFunction(name: "hash", entry: entry)
/// try f.call(x: nil, tokenIDs: ids, n: 8, d: 16, nExperts: 4, nCodes: 0, seed: 0, output: experts)
/// ```
public final class FFIFunction: @unchecked Sendable {
    public let name: String
    public let entry: FFISignatureEntry
    private let fn: UnsafeMutableRawPointer
    private var cif = ffi_cif()
    private let argTypes: UnsafeMutablePointer<UnsafeMutablePointer<ffi_type>?>

    public init(name: String, entry: FFISignatureEntry) throws {
        self.name = name
        self.entry = entry
        let what = "ffi \(entry.signature.kind.rawValue) '\(name)'"
        guard let handle = dlopen(entry.library, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE) else {
            let why = dlerror().map { String(cString: $0) } ?? "unknown dlopen error"
            throw VQMoEError(.plugin, "\(what): cannot load \(entry.library): dlopen failed: \(why)")
        }
        guard let sym = dlsym(handle, entry.symbol) else {
            throw VQMoEError(.plugin, "\(what): \(entry.library) has no symbol '\(entry.symbol)'")
        }
        fn = sym
        let params = entry.signature.params
        argTypes = .allocate(capacity: max(params.count, 1))
        for (i, p) in params.enumerated() {
            switch p.type {
            case .int32: argTypes[i] = vqmoe_ffi_type_sint32()
            case .int64: argTypes[i] = vqmoe_ffi_type_sint64()
            case .uint64: argTypes[i] = vqmoe_ffi_type_uint64()
            case .floatPtr, .int32Ptr, .constInt32Ptr: argTypes[i] = vqmoe_ffi_type_pointer()
            }
        }
        let rtype = entry.signature.returnsStatus ? vqmoe_ffi_type_sint32() : vqmoe_ffi_type_void()
        let status = ffi_prep_cif(&cif, FFI_DEFAULT_ABI, UInt32(params.count), rtype, argTypes)
        guard status == FFI_OK else {
            throw VQMoEError(
                .plugin, "\(what): ffi_prep_cif failed for \"\(entry.signatureText)\" (status \(status.rawValue))")
        }
    }

    public var kind: PluginKind { entry.signature.kind }
    public var needsTokenIDs: Bool { entry.signature.needsTokenIDs }

    /// Call the function: x (n,d), token ids (n) → one expert (router) or code (quantizer) per
    /// token in `output`, each checked to be in [0, nExperts) or [0, nCodes).
    public func call(
        x: UnsafePointer<Float>?, tokenIDs: UnsafePointer<Int32>?, n: Int, d: Int, nExperts: Int, nCodes: Int,
        seed: UInt64, output: UnsafeMutablePointer<Int32>
    ) throws {
        let what = "ffi \(kind.rawValue) '\(name)' (\(entry.symbol))"
        if needsTokenIDs && tokenIDs == nil {
            throw VQMoEError(
                .plugin,
                "ffi \(kind.rawValue) '\(name)' routes by token id, but this layer has no token ids (use it in a token model)"
            )
        }
        let ret = invoke(
            x: x, tokenIDs: tokenIDs, n: n, d: d, nExperts: nExperts, nCodes: nCodes, seed: seed, output: output)
        if entry.signature.returnsStatus && ret != 0 {
            throw VQMoEError(.plugin, "\(what) returned error status \(ret)")
        }
        let limit = kind == .router ? nExperts : nCodes
        for i in 0..<n where output[i] < 0 || Int(output[i]) >= limit {
            throw VQMoEError(
                .plugin,
                "\(what) gave token \(i) \(kind == .router ? "expert" : "code") \(output[i]), outside [0, \(limit))")
        }
    }

    /// One libffi call with every argument in its own 8-byte slot; the int32 status (0 for void).
    private func invoke(
        x: UnsafePointer<Float>?, tokenIDs: UnsafePointer<Int32>?, n: Int, d: Int, nExperts: Int, nCodes: Int,
        seed: UInt64, output: UnsafeMutablePointer<Int32>
    ) -> Int32 {
        let params = entry.signature.params
        let slots = UnsafeMutablePointer<UInt64>.allocate(capacity: max(params.count, 1))
        let values = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: max(params.count, 1))
        defer {
            slots.deallocate()
            values.deallocate()
        }
        for (i, p) in params.enumerated() {
            let raw = UnsafeMutableRawPointer(slots + i)
            func int(_ v: Int) {
                if p.type == .int32 {
                    raw.storeBytes(of: Int32(v), as: Int32.self)
                } else {
                    raw.storeBytes(of: Int64(v), as: Int64.self)
                }
            }
            switch p.role {
            case .x: raw.storeBytes(of: UnsafeRawPointer(x), as: UnsafeRawPointer?.self)
            case .token_ids: raw.storeBytes(of: UnsafeRawPointer(tokenIDs), as: UnsafeRawPointer?.self)
            case .n: int(n)
            case .d: int(d)
            case .n_experts: int(nExperts)
            case .n_codes: int(nCodes)
            case .seed: raw.storeBytes(of: seed, as: UInt64.self)
            case .expert, .code: raw.storeBytes(of: UnsafeRawPointer(output), as: UnsafeRawPointer?.self)
            }
            values[i] = raw
        }
        var ret: Int64 = 0
        ffi_call(&cif, unsafeBitCast(fn, to: (@convention(c) () -> Void).self), &ret, values)
        return Int32(truncatingIfNeeded: ret)
    }
}
