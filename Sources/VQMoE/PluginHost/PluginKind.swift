import VQMoEABI

/// The four kinds of component (`VQMOE_KIND_*`).
///
/// ```swift
/// PluginKind(name: "router")?.code   // VQMOE_KIND_ROUTER
/// ```
public enum PluginKind: String, CaseIterable, Sendable {
    case router, quantizer, dataset, head

    public init?(code: Int32) {
        switch code {
        case VQMOE_KIND_ROUTER: self = .router
        case VQMOE_KIND_QUANTIZER: self = .quantizer
        case VQMOE_KIND_DATASET: self = .dataset
        case VQMOE_KIND_HEAD: self = .head
        default: return nil
        }
    }

    public init?(name: String) { self.init(rawValue: name) }

    public var code: Int32 {
        switch self {
        case .router: return VQMOE_KIND_ROUTER
        case .quantizer: return VQMOE_KIND_QUANTIZER
        case .dataset: return VQMOE_KIND_DATASET
        case .head: return VQMOE_KIND_HEAD
        }
    }

    /// Size of the kind's API struct in this host's header (the minimum a plugin must fill).
    var apiStructSize: Int {
        switch self {
        case .router: return MemoryLayout<vqmoe_router_api>.size
        case .quantizer: return MemoryLayout<vqmoe_quantizer_api>.size
        case .dataset: return MemoryLayout<vqmoe_dataset_api>.size
        case .head: return MemoryLayout<vqmoe_head_api>.size
        }
    }
}

/// Text for a `VQMOE_*` status code.
public func statusName(_ status: Int32) -> String {
    switch status {
    case VQMOE_OK: return "OK"
    case VQMOE_ERR_INVALID_ARGUMENT: return "INVALID_ARGUMENT"
    case VQMOE_ERR_SHAPE: return "SHAPE"
    case VQMOE_ERR_UNSUPPORTED: return "UNSUPPORTED"
    case VQMOE_ERR_OUT_OF_MEMORY: return "OUT_OF_MEMORY"
    case VQMOE_ERR_NUMERIC: return "NUMERIC"
    case VQMOE_ERR_IO: return "IO"
    case VQMOE_ERR_STATE: return "STATE"
    case VQMOE_ERR_INTERNAL: return "INTERNAL"
    case VQMOE_ERR_END_OF_DATA: return "END_OF_DATA"
    default: return "status \(status)"
    }
}

/// "major.minor" of a packed ABI version.
public func abiString(_ v: UInt32) -> String { "\(v >> 16).\(v & 0xffff)" }
