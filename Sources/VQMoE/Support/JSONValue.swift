import Foundation

/// A JSON value as Codable data, for the parts of typed records that are free-form JSON (the
/// run config stored in a checkpoint's sidecar). Integral numbers are stored as integers.
///
/// ```swift
/// let v = JSONValue(any: try JSONSerialization.jsonObject(with: data))
/// let back: Any = v.any                  // for ConfigReader / RunConfig(json:)
/// ```
public enum JSONValue: Codable, Equatable, Sendable {
    case null
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    /// From what `JSONSerialization` (or a Swift literal) gives; anything else becomes null.
    public init(any v: Any) {
        if let b = jsonBool(v) {
            self = .bool(b)
        } else if let n = jsonNumber(v) {
            self = n == n.rounded() && abs(n) < 1e15 ? .int(Int(n)) : .double(n)
        } else if let s = v as? String {
            self = .string(s)
        } else if let a = v as? [Any] {
            self = .array(a.map(JSONValue.init(any:)))
        } else if let o = v as? [String: Any] {
            self = .object(o.mapValues(JSONValue.init(any:)))
        } else {
            self = .null
        }
    }

    /// As `JSONSerialization` objects.
    public var any: Any {
        switch self {
        case .null: return NSNull()
        case .bool(let b): return b
        case .int(let i): return i
        case .double(let d): return d
        case .string(let s): return s
        case .array(let a): return a.map(\.any)
        case .object(let o): return o.mapValues(\.any)
        }
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            self = .null
        } else if let b = try? c.decode(Bool.self) {
            self = .bool(b)
        } else if let i = try? c.decode(Int.self) {
            self = .int(i)
        } else if let d = try? c.decode(Double.self) {
            self = .double(d)
        } else if let s = try? c.decode(String.self) {
            self = .string(s)
        } else if let a = try? c.decode([JSONValue].self) {
            self = .array(a)
        } else {
            self = .object(try c.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let b): try c.encode(b)
        case .int(let i): try c.encode(i)
        case .double(let d): try c.encode(d)
        case .string(let s): try c.encode(s)
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        }
    }
}
