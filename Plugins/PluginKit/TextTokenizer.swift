// "vqmoe.tokenizer/1": text to a language-model dataset's tokens and back, so a trained model
// can be prompted, sampled and made to score any text with the vocabulary it learned.
import VQMoEABI

/// A language-model dataset that maps text to its tokens and back. PluginKit exports the
/// "vqmoe.tokenizer/1" feature for every component that conforms.
///
/// ```swift
/// extension CharDataset: TextTokenizer {
///     var textUnit: Int32 { VQMOE_TEXT_UNIT_CHAR }
///     func encode(_ text: UnsafeBufferPointer<UInt8>) throws(PluginFailure) -> [Int32] {
///         text.map(Int32.init)                                      // a token is a byte
///     }
///     func decode(_ token: Int32, after previous: Int32) throws(PluginFailure) -> [UInt8] {
///         [UInt8(token)]
///     }
/// }
/// ```
public protocol TextTokenizer: AnyObject {
    /// VQMOE_TEXT_UNIT_CHAR (reports in bits per character) or VQMOE_TEXT_UNIT_WORD (perplexity).
    var textUnit: Int32 { get }
    /// The tokens of UTF-8 `text`, tokenised as the dataset tokenises its files.
    func encode(_ text: UnsafeBufferPointer<UInt8>) throws(PluginFailure) -> [Int32]
    /// The bytes of `token` after a text whose last token is `previous` (-1 at the start).
    func decode(_ token: Int32, after previous: Int32) throws(PluginFailure) -> [UInt8]
}

/// The tokenizer behind an instance handle.
private func tokenizer(_ inst: Instance) throws(PluginFailure) -> TextTokenizer {
    guard let t = inst.component as? TextTokenizer else { throw .state("this component has no tokenizer") }
    return t
}

/// "vqmoe.tokenizer/1" of every component that conforms to `TextTokenizer`.
nonisolated(unsafe) let tokenizerTable: UnsafeRawPointer = {
    let p = UnsafeMutablePointer<vqmoe_tokenizer_feature>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_tokenizer_feature(
            struct_size: UInt32(MemoryLayout<vqmoe_tokenizer_feature>.size),
            unit: { inst in (instance(inst)?.component as? TextTokenizer)?.textUnit ?? 0 },
            encode: { inst, text, n, out, capacity, count in
                call(inst, bound: false) { i throws(PluginFailure) in
                    guard let count, n >= 0, text != nil || n == 0, capacity >= 0, out != nil || capacity == 0 else {
                        throw .invalid("encode: text, out or n_tokens is NULL, or a size is negative")
                    }
                    let bytes = UnsafeBufferPointer(
                        start: UnsafeRawPointer(text)?.assumingMemoryBound(to: UInt8.self), count: Int(n))
                    let ids = try tokenizer(i).encode(bytes)
                    count.pointee = Int64(ids.count)
                    if let out { for k in 0..<min(ids.count, Int(capacity)) { out[k] = ids[k] } }
                }
            },
            decode: { inst, token, previous, out, capacity, count in
                call(inst, bound: false) { i throws(PluginFailure) in
                    guard let count, capacity >= 0, out != nil || capacity == 0 else {
                        throw .invalid("decode: out or n_bytes is NULL, or capacity is negative")
                    }
                    let bytes = try tokenizer(i).decode(token, after: previous)
                    count.pointee = Int64(bytes.count)
                    if let out {
                        for k in 0..<min(bytes.count, Int(capacity)) { out[k] = CChar(bitPattern: bytes[k]) }
                    }
                }
            }))
    return UnsafeRawPointer(p)
}()
