import Foundation

/// How text maps to a character-level language model's tokens and back (`vqmoe sample`).
///
/// ```swift
/// let codec = try TextCodec(config: cfg, vocab: 256)     // the `char` dataset: bytes
/// let prompt = try codec.encode("The ")                   // [84, 104, 101, 32]
/// let text = try codec.encode(bytes: Array(fileData))
/// FileHandle.standardOutput.write(Data(codec.decode(tokens)))
/// ```
public enum TextCodec: Sendable, Equatable {
    /// Vocabulary of 256: a token is a byte (the `char` dataset; UTF-8 text).
    case bytes
    /// Vocabulary of 27 (`char` with `compact_vocab`): space → 0, a…z → 1…26 (text8).
    case text8

    /// The codec of a run's dataset and its model's vocabulary.
    public init(config: RunConfig, vocab: Int) throws {
        let compact = config.data.values["compact_vocab"] as? Bool ?? false
        switch (config.data.name, compact, vocab) {
        case ("char", false, 256): self = .bytes
        case ("char", true, 27): self = .text8
        default:
            throw VQMoEError(
                .config,
                "sampling decodes character-level models (the `char` dataset, 256 bytes or text8's 27 symbols); "
                    + "this run's dataset is '\(config.data.name)' with a vocabulary of \(vocab)")
        }
    }

    /// The tokens of `text`; text8 takes lower-case a–z and space only.
    public func encode(_ text: String) throws -> [Int32] { try encode(bytes: Array(text.utf8)) }

    /// The tokens of UTF-8 `bytes` (a file's contents).
    public func encode(bytes: [UInt8]) throws -> [Int32] {
        switch self {
        case .bytes: return bytes.map(Int32.init)
        case .text8:
            return try bytes.enumerated().map { i, c in
                guard c == 0x20 || (0x61...0x7A).contains(c) else {
                    throw VQMoEError(
                        .usage,
                        "the text has byte 0x\(String(c, radix: 16)) at \(i): a text8 model reads only a-z and space")
                }
                return c == 0x20 ? 0 : Int32(c) - 0x60
            }
        }
    }

    /// The bytes of `tokens`.
    public func decode(_ tokens: [Int32]) -> [UInt8] {
        switch self {
        case .bytes: return tokens.map { UInt8(truncatingIfNeeded: $0) }
        case .text8: return tokens.map { $0 == 0 ? 0x20 : UInt8(truncatingIfNeeded: $0 + 0x60) }
        }
    }
}
