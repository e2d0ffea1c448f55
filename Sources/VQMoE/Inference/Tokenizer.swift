import VQMoEABI

/// How text maps to a language model's tokens and back, as its dataset defines it (the
/// dataset plugin's "vqmoe.tokenizer/1"): bytes or text8's 27 symbols for `char`, words and
/// `<eos>` for `word`. `vqmoe sample` encodes prompts and decodes what it draws with it;
/// `vqmoe eval --text` encodes the file it scores.
///
/// ```swift
/// let tok = try Tokenizer(dataset: trainer.dataset, vocab: model.head.nOut)
/// let prompt = try tok.encode(prompt: "The ")            // char: [84, 104, 101, 32]
/// let ids = try tok.encode(bytes: Array(fileData))        // a file, as the dataset reads files
/// print(String(decoding: try tok.decode(ids), as: UTF8.self))
/// ```
public final class Tokenizer {
    /// What one token is: reports give bits per character or perplexity per word.
    public enum Unit: Sendable { case character, word }

    public let unit: Unit
    let core: PluginInstance
    let feature: vqmoe_tokenizer_feature
    let vocab: Int

    /// The tokenizer of `dataset`, for a model with `vocab` outputs; an error when the dataset
    /// plugin has none.
    public init(dataset: DatasetInstance, vocab: Int) throws {
        core = dataset.core
        self.vocab = vocab
        let size = MemoryLayout<vqmoe_tokenizer_feature>.size
        guard dataset.isLM, let raw = core.library.feature(VQMOE_FEATURE_TOKENIZER),
            raw.load(as: UInt32.self) >= UInt32(size)
        else {
            throw VQMoEError(
                .config,
                "\(core.describe) has no tokenizer (feature \(VQMOE_FEATURE_TOKENIZER)), so text cannot be turned into "
                    + "this model's tokens; the built-in language-model datasets `char` and `word` have one")
        }
        feature = raw.load(as: vqmoe_tokenizer_feature.self)
        guard let unitFn = feature.unit, feature.encode != nil, feature.decode != nil else {
            throw VQMoEError(.plugin, "\(core.describe): \(VQMOE_FEATURE_TOKENIZER) has a NULL function")
        }
        switch unitFn(core.handle) {
        case VQMOE_TEXT_UNIT_CHAR: unit = .character
        case VQMOE_TEXT_UNIT_WORD: unit = .word
        case let u: throw VQMoEError(.plugin, "\(core.describe): \(VQMOE_FEATURE_TOKENIZER) gave unknown unit \(u)")
        }
    }

    /// The tokens of UTF-8 `bytes` (a file's contents), tokenised as the dataset reads its files.
    /// One call when the tokens fit one per byte (+16), as for bytes and words; a second with
    /// the exact size otherwise.
    public func encode(bytes: [UInt8]) throws -> [Int32] {
        var ids = [Int32](repeating: 0, count: bytes.count + 16)
        var n = try encodeCall(bytes, into: &ids)
        guard n >= 0 && n <= Int64(bytes.count) * 4 + 16 else {
            throw VQMoEError(.plugin, "\(core.describe): tokenizer encode gave \(n) tokens for \(bytes.count) bytes")
        }
        if n > Int64(ids.count) {
            ids = [Int32](repeating: 0, count: Int(n))
            let again = try encodeCall(bytes, into: &ids)
            guard again == n else {
                throw VQMoEError(.plugin, "\(core.describe): tokenizer encode gave \(n) tokens, then \(again)")
            }
            n = again
        }
        ids.removeLast(ids.count - Int(n))
        if let bad = ids.firstIndex(where: { $0 < 0 || Int($0) >= vocab }) {
            throw VQMoEError(
                .plugin,
                "\(core.describe): tokenizer encode gave token \(ids[bad]), outside the vocabulary [0, \(vocab))")
        }
        return ids
    }

    /// One encode call into `ids` (its count is the capacity); returns the token count.
    private func encodeCall(_ bytes: [UInt8], into ids: inout [Int32]) throws -> Int64 {
        var n: Int64 = 0
        try bytes.withUnsafeBufferPointer { b in
            try b.withMemoryRebound(to: CChar.self) { c in
                try ids.withUnsafeMutableBufferPointer { out in
                    try core.call("tokenizer encode") {
                        feature.encode!(
                            core.handle, c.baseAddress, Int64(c.count), out.baseAddress, Int64(out.count), &n)
                    }
                }
            }
        }
        return n
    }

    /// The tokens of a prompt: `text` as a file, without the end-of-line token a file's last
    /// line gets when the text does not end in a line break (a prompt continues its last line).
    public func encode(prompt text: String) throws -> [Int32] {
        var ids = try encode(bytes: Array(text.utf8))
        if let last = ids.last, !(text.hasSuffix("\n") || text.hasSuffix("\r")),
            try decode(last, after: ids.count > 1 ? ids[ids.count - 2] : -1) == [0x0A]
        {
            ids.removeLast()
        }
        return ids
    }

    /// The bytes of `token` after a text whose last token is `previous` (-1: the start).
    public func decode(_ token: Int32, after previous: Int32) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: 64)
        while true {
            var n: Int64 = 0
            let capacity = Int64(buffer.count)
            try buffer.withUnsafeMutableBufferPointer { b in
                try b.withMemoryRebound(to: CChar.self) { c in
                    try core.call("tokenizer decode") {
                        feature.decode!(core.handle, token, previous, c.baseAddress, capacity, &n)
                    }
                }
            }
            guard n >= 0 && n <= 1 << 20 else {
                throw VQMoEError(.plugin, "\(core.describe): tokenizer decode gave \(n) bytes for token \(token)")
            }
            if n <= capacity { return Array(buffer.prefix(Int(n))) }
            buffer = [UInt8](repeating: 0, count: Int(n))
        }
    }

    /// The text of `tokens`, continuing a text whose last token is `previous`.
    public func decode(_ tokens: [Int32], after previous: Int32 = -1) throws -> [UInt8] {
        var out: [UInt8] = [], prev = previous
        for t in tokens {
            out += try decode(t, after: prev)
            prev = t
        }
        return out
    }
}
