import Foundation
import VQMoEABI

/// One entry of a plugin's hyperparameter schema, read from its descriptor.
///
/// ```swift
/// let spec = lib.schema.first { $0.name == "k" }!
/// print(spec.type, spec.defaultText, spec.rangeText)   // int 2 [1, 64]
/// ```
public struct HyperparameterSpec: Sendable, Equatable {
    public enum ValueType: String, Sendable { case int, float, bool, string }
    public let name: String
    public let type: ValueType
    public let description: String
    public let defaultNumber: Double
    public let defaultString: String
    public let min: Double?
    public let max: Double?
    public let powerOfTwo: Bool
    public let isPath: Bool
    public let optional: Bool
    public let choices: [String]?

    /// Read one schema entry from a descriptor; `plugin` names it in errors.
    public init(_ s: vqmoe_hparam_spec, plugin: String) throws {
        name = s.name.map { String(cString: $0) } ?? ""
        guard !name.isEmpty else { throw VQMoEError(.plugin, "\(plugin): a hyperparameter has no name") }
        switch s.type {
        case VQMOE_HP_INT: type = .int
        case VQMOE_HP_FLOAT: type = .float
        case VQMOE_HP_BOOL: type = .bool
        case VQMOE_HP_STRING: type = .string
        default: throw VQMoEError(.plugin, "\(plugin): hyperparameter '\(name)' has unknown type \(s.type)")
        }
        description = s.description.map { String(cString: $0) } ?? ""
        defaultNumber = s.default_number
        defaultString = s.default_string.map { String(cString: $0) } ?? ""
        min = s.flags & VQMOE_HP_HAS_MIN != 0 ? s.min_value : nil
        max = s.flags & VQMOE_HP_HAS_MAX != 0 ? s.max_value : nil
        powerOfTwo = s.flags & VQMOE_HP_POWER_OF_TWO != 0
        isPath = s.flags & VQMOE_HP_PATH != 0
        optional = s.flags & VQMOE_HP_OPTIONAL != 0
        choices = s.choices.map {
            String(cString: $0).split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        }
        // The default must satisfy the schema itself.
        do { _ = try validate(defaultValue, keyPath: name) } catch let e as VQMoEError {
            throw VQMoEError(
                .plugin, "\(plugin): the default of hyperparameter '\(name)' breaks its own schema: \(e.message)")
        }
    }

    /// The default as a JSON-like value (Int, Double, Bool or String).
    public var defaultValue: Any {
        switch type {
        case .int: return Int(defaultNumber)
        case .float: return defaultNumber
        case .bool: return defaultNumber != 0
        case .string: return defaultString
        }
    }

    public var defaultText: String { HyperparameterSpec.text(defaultValue) }

    /// "[min, max]", "one of a|b", "power of 2", or "".
    public var rangeText: String {
        var parts: [String] = []
        if min != nil || max != nil {
            let lo = min.map { type == .int ? String(Int($0)) : String($0) } ?? "-inf"
            let hi = max.map { type == .int ? String(Int($0)) : String($0) } ?? "inf"
            parts.append("[\(lo), \(hi)]")
        }
        if powerOfTwo { parts.append("power of 2") }
        if let choices { parts.append("one of " + choices.joined(separator: "|")) }
        return parts.joined(separator: ", ")
    }

    static func text(_ v: Any) -> String {
        if let b = v as? Bool { return b ? "true" : "false" }
        if let s = v as? String { return "\"\(s)\"" }
        return "\(v)"
    }

    /// Check `value` (from JSON: NSNumber, Bool, String) against this entry; returns the value
    /// normalised to Int / Double / Bool / String. Errors name `keyPath`.
    public func validate(_ value: Any, keyPath: String) throws -> Any {
        func bad(_ why: String) -> VQMoEError { VQMoEError(.config, "\(keyPath): \(why)") }
        switch type {
        case .bool:
            guard let b = jsonBool(value) else { throw bad("expected true or false, got \(describeJSON(value))") }
            return b
        case .string:
            guard let s = value as? String else { throw bad("expected a string, got \(describeJSON(value))") }
            if let choices, !choices.contains(s) {
                throw bad("'\(s)' is not one of \(choices.joined(separator: ", "))")
            }
            if s.isEmpty && !optional && choices == nil { throw bad("must not be empty") }
            return s
        case .int, .float:
            guard jsonBool(value) == nil, let n = jsonNumber(value) else {
                throw bad("expected \(type == .int ? "an integer" : "a number"), got \(describeJSON(value))")
            }
            if !n.isFinite { throw bad("must be finite") }
            if type == .int && n != n.rounded() { throw bad("expected an integer, got \(n)") }
            if let min, n < min {
                throw bad(
                    "\(HyperparameterSpec.text(type == .int ? Int(n) as Any : n)) is below the minimum "
                        + "\(type == .int ? String(Int(min)) : String(min))"
                )
            }
            if let max, n > max {
                throw bad(
                    "\(HyperparameterSpec.text(type == .int ? Int(n) as Any : n)) is above the maximum "
                        + "\(type == .int ? String(Int(max)) : String(max))"
                )
            }
            if type == .int {
                let i = Int(n)
                if powerOfTwo && (i <= 0 || i & (i - 1) != 0) { throw bad("\(i) is not a power of 2") }
                return i
            }
            return n
        }
    }
}

/// Hyperparameter values resolved against a schema (defaults filled, every value checked),
/// and their C form for `create()`.
///
/// ```swift
/// let hp = try ResolvedHyperparameters(schema: lib.schema, values: ["k": 2], keyPath: "model.router")
/// hp.withC { cParams in ... }        // const vqmoe_hparams *
/// ```
public struct ResolvedHyperparameters: @unchecked Sendable {
    /// Name → value (Int, Double, Bool, String), in schema order in `names`.
    public let values: [String: Any]
    public let names: [String]

    /// `values` may only hold keys of the schema (an unknown key is an error naming it and
    /// the known ones, closest first). Later dictionaries in `layers` override earlier ones.
    public init(schema: [HyperparameterSpec], layers: [[String: Any]], keyPath: String) throws {
        var merged: [String: Any] = [:]
        for layer in layers { merged.merge(layer) { _, new in new } }
        let known = schema.map(\.name)
        for key in merged.keys.sorted() where !known.contains(key) {
            let near = closestFirst(key, among: known)
            throw VQMoEError(
                .config,
                "\(keyPath).\(key): unknown hyperparameter"
                    + (near.isEmpty ? " (this component takes none)" : "; known: " + near.joined(separator: ", ")))
        }
        var out: [String: Any] = [:]
        for spec in schema {
            out[spec.name] = try spec.validate(
                merged[spec.name] ?? spec.defaultValue, keyPath: "\(keyPath).\(spec.name)")
        }
        values = out
        names = schema.map(\.name)
    }

    public init(schema: [HyperparameterSpec], values: [String: Any], keyPath: String) throws {
        try self.init(schema: schema, layers: [values], keyPath: keyPath)
    }

    private init(values: [String: Any], names: [String]) { self.values = values; self.names = names }

    /// Path-valued entries (VQMOE_HP_PATH) with `$DATA` and `$ROOT` expanded.
    public func expandingPaths(schema: [HyperparameterSpec], dataRoot: String, root: String) -> ResolvedHyperparameters
    {
        var v = values
        for spec in schema where spec.isPath {
            if let s = v[spec.name] as? String { v[spec.name] = DataLocator.expand(s, dataRoot: dataRoot, root: root) }
        }
        return ResolvedHyperparameters(values: v, names: names)
    }

    /// Call `body` with the C view (`vqmoe_hparams`), valid during the call.
    public func withC<R>(_ body: (UnsafePointer<vqmoe_hparams>) throws -> R) rethrows -> R {
        var cStrings: [UnsafeMutablePointer<CChar>] = []
        defer { cStrings.forEach { free($0) } }
        func dup(_ s: String) -> UnsafePointer<CChar> {
            let p = strdup(s)!; cStrings.append(p); return UnsafePointer(p)
        }
        var cValues: [vqmoe_hparam_value] = names.map { name in
            let v = values[name]!
            var c = vqmoe_hparam_value(name: dup(name), type: 0, int_value: 0, float_value: 0, string_value: nil)
            if let b = v as? Bool {
                c.type = VQMOE_HP_BOOL; c.int_value = b ? 1 : 0; c.float_value = b ? 1 : 0
            } else if let i = v as? Int {
                c.type = VQMOE_HP_INT; c.int_value = Int64(i); c.float_value = Double(i)
            } else if let d = v as? Double {
                c.type = VQMOE_HP_FLOAT; c.float_value = d; c.int_value = Int64(d)
            } else if let s = v as? String {
                c.type = VQMOE_HP_STRING; c.string_value = dup(s)
            }
            return c
        }
        return try cValues.withUnsafeMutableBufferPointer { buf in
            var hp = vqmoe_hparams(
                struct_size: UInt32(MemoryLayout<vqmoe_hparams>.size),
                count: Int32(buf.count), values: UnsafePointer(buf.baseAddress),
                value_size: UInt32(MemoryLayout<vqmoe_hparam_value>.stride))
            return try body(&hp)
        }
    }
}

/// A Bool from JSON (Foundation gives NSNumber for both numbers and booleans).
func jsonBool(_ v: Any) -> Bool? {
    if let n = v as? NSNumber { return String(cString: n.objCType) == "c" ? n.boolValue : nil }
    return v as? Bool
}

/// A number from JSON or Swift numeric types (not booleans).
func jsonNumber(_ v: Any) -> Double? {
    if jsonBool(v) != nil { return nil }
    if let n = v as? NSNumber { return n.doubleValue }
    if let i = v as? Int { return Double(i) }
    if let d = v as? Double { return d }
    return nil
}

/// A short rendering of a JSON value for messages.
func describeJSON(_ v: Any) -> String {
    if let b = jsonBool(v) { return b ? "true" : "false" }
    if let s = v as? String { return "\"\(s)\"" }
    if let n = jsonNumber(v) { return n == n.rounded() && abs(n) < 1e15 ? String(Int(n)) : String(n) }
    if v is [Any] { return "an array" }
    if v is [String: Any] { return "an object" }
    if v is NSNull { return "null" }
    return "\(v)"
}
