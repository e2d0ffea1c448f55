// Hyperparameters declared once -- name, type, default, range, doc -- as data: the kit turns the
// list into the descriptor's schema, and reads the host's resolved values back by name.
import Glibc
import VQMoEABI

/// One hyperparameter of a plugin's schema.
///
/// ```swift
/// static let hyperparameters: [Hyper] = [
///     .int("k", 2, min: 1, max: 64, "experts kept per token"),
///     .float("balance_weight", 0.01, min: 0, "weight of the balance loss"),
///     .string("weights", "kept", choices: ["kept", "full"], "how the kept experts are weighted"),
/// ]
/// ```
public struct Hyper: Sendable {
    public let name: String
    public let type: Int32
    public let doc: String
    public let defaultNumber: Double
    public let defaultString: String
    public let min: Double?, max: Double?
    public let choices: [String]?
    public let flags: UInt32

    public static func int(
        _ name: String, _ value: Int, min: Int? = nil, max: Int? = nil, powerOfTwo: Bool = false, _ doc: String
    ) -> Hyper {
        Hyper(
            name: name, type: VQMOE_HP_INT, doc: doc, defaultNumber: Double(value), defaultString: "",
            min: min.map(Double.init), max: max.map(Double.init), choices: nil,
            flags: powerOfTwo ? VQMOE_HP_POWER_OF_TWO : 0)
    }

    public static func float(
        _ name: String, _ value: Double, min: Double? = nil, max: Double? = nil, _ doc: String
    ) -> Hyper {
        Hyper(
            name: name, type: VQMOE_HP_FLOAT, doc: doc, defaultNumber: value, defaultString: "", min: min, max: max,
            choices: nil, flags: 0)
    }

    public static func bool(_ name: String, _ value: Bool, _ doc: String) -> Hyper {
        Hyper(
            name: name, type: VQMOE_HP_BOOL, doc: doc, defaultNumber: value ? 1 : 0, defaultString: "", min: nil,
            max: nil,
            choices: nil, flags: 0)
    }

    /// A string, one of `choices` when given; `path`: the host expands $DATA / $ROOT; `optional`: may be empty.
    public static func string(
        _ name: String, _ value: String, choices: [String]? = nil, path: Bool = false, optional: Bool = false,
        _ doc: String
    ) -> Hyper {
        Hyper(
            name: name, type: VQMOE_HP_STRING, doc: doc, defaultNumber: 0, defaultString: value, min: nil, max: nil,
            choices: choices, flags: (path ? VQMOE_HP_PATH : 0) | (optional ? VQMOE_HP_OPTIONAL : 0))
    }

    /// The C schema entry (strings live as long as the library).
    var cSpec: vqmoe_hparam_spec {
        var f = flags
        if min != nil { f |= VQMOE_HP_HAS_MIN }
        if max != nil { f |= VQMOE_HP_HAS_MAX }
        return vqmoe_hparam_spec(
            name: staticCString(name), type: type, flags: f, description: staticCString(doc),
            default_number: defaultNumber, default_string: staticCString(defaultString), min_value: min ?? 0,
            max_value: max ?? 0, choices: choices.map { staticCString($0.joined(separator: ",")) })
    }

    /// A schema as the C array of the descriptor (never freed).
    static func cArray(_ schema: [Hyper]) -> UnsafePointer<vqmoe_hparam_spec> {
        let specs = UnsafeMutablePointer<vqmoe_hparam_spec>.allocate(capacity: Swift.max(schema.count, 1))
        for (i, h) in schema.enumerated() { (specs + i).initialize(to: h.cSpec) }
        return UnsafePointer(specs)
    }
}

/// The values the host resolved for a schema, read by name (a missing one is its default). The
/// kit checks each against its declared type, range and choices once, so a plugin reads plain
/// values into its typed configuration.
///
/// ```swift
/// let k = hp.int("k"), weights = hp.string("weights")
/// ```
public struct HyperValues {
    private var numbers: [String: Double] = [:]
    private var strings: [String: String] = [:]

    /// Read and check `hp` against `schema`.
    public init(_ hp: UnsafePointer<vqmoe_hparams>?, schema: [Hyper]) throws(PluginFailure) {
        for h in schema {
            if h.type == VQMOE_HP_STRING {
                let s = vqmoe_hp_string(hp, h.name, nil).map { String(cString: $0) } ?? h.defaultString
                if let c = h.choices, !c.contains(s) {
                    throw .invalid("\(h.name) '\(s)' must be one of \(c.joined(separator: ", "))")
                }
                if s.isEmpty && h.flags & VQMOE_HP_OPTIONAL == 0 && !h.defaultString.isEmpty {
                    throw .invalid("\(h.name) must not be empty")
                }
                strings[h.name] = s
                continue
            }
            let v =
                vqmoe_hp_find(hp, h.name).map {
                    h.type == VQMOE_HP_FLOAT ? $0.pointee.float_value : Double($0.pointee.int_value)
                }
                ?? h.defaultNumber
            guard v.isFinite else { throw .invalid("\(h.name) = \(v) must be finite") }
            if let m = h.min, v < m { throw .invalid("\(h.name) = \(v) is below the minimum \(m)") }
            if let m = h.max, v > m { throw .invalid("\(h.name) = \(v) is above the maximum \(m)") }
            if h.flags & VQMOE_HP_POWER_OF_TWO != 0, v > 0, Int(v) & (Int(v) - 1) != 0 {
                throw .invalid("\(h.name) = \(Int(v)) must be a power of two")
            }
            numbers[h.name] = v
        }
    }

    public func int(_ name: String) -> Int { Int(numbers[name] ?? 0) }
    public func float(_ name: String) -> Float { Float(numbers[name] ?? 0) }
    public func double(_ name: String) -> Double { numbers[name] ?? 0 }
    public func bool(_ name: String) -> Bool { (numbers[name] ?? 0) != 0 }
    public func string(_ name: String) -> String { strings[name] ?? "" }
}
