/// The one error type of the framework: a category and a message meant for a person.
///
/// Every bad input (docs/design.md, "Bad inputs") ends as one of these, with enough context
/// (path, key path, plugin and call) that the user can act without reading the source.
///
/// ```swift
/// throw VQMoEError(.config, "model.n_experts: expected an integer, got \"eight\"")
/// ```
public struct VQMoEError: Error, CustomStringConvertible, Equatable {
    /// What went wrong, coarsely; the CLI maps it to an exit code.
    public enum Category: String, Sendable {
        case usage, config, plugin, registry, data, checkpoint, numeric, io, internalError
    }
    public let category: Category
    public let message: String

    public init(_ category: Category, _ message: String) {
        self.category = category
        self.message = message
    }

    public var description: String { message }

    /// The CLI's exit codes, for `--help`: success and a failed check, each category, an interrupted run.
    public static let exitCodes: [(code: Int32, meaning: String)] = [
        (0, "ok"), (1, "a check failed"), (64, "usage"), (65, "config"), (66, "data"), (67, "plugin/registry"),
        (68, "checkpoint"), (69, "numeric (non-finite loss or gradient)"), (70, "internal"), (74, "I/O"),
        (130, "interrupted (SIGINT/SIGTERM; the run is resumable)"),
    ]

    /// Process exit code for this category (0 is success, 1 a failed check).
    public var exitCode: Int32 {
        switch category {
        case .usage: return 64
        case .config: return 65
        case .data: return 66
        case .plugin, .registry: return 67
        case .checkpoint: return 68
        case .numeric: return 69
        case .io: return 74
        case .internalError: return 70
        }
    }
}
