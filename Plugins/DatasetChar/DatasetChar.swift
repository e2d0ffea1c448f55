// DatasetChar: the `char` dataset plugin -- a byte-level language-modelling corpus.
//
// The whole file is read into memory at create() and split contiguously into train /
// valid / test (enwik8: 90/5/5; nanoGPT's tiny Shakespeare: 90/10/0). The vocabulary is the
// 256 raw byte values. With clean = "text8" the file is first turned into text8-style text by
// a port of Matt Mahoney's wikifil.pl (Text8.swift): only [a-z ] remains, and the splits apply
// to that cleaned text. compact_vocab = true renumbers such text to 27 tokens (space -> 0,
// a..z -> 1..26). Batches are a pure function of (instance seed, split, index, batch_size),
// cut by PluginKit's TokenBatches: random train windows and ordered eval windows, or with
// order = "streams" (Transformer-XL) batch_size parallel streams read in order.
import PluginKit
import VQMoEABI

/// Where to get the data, appended to "file missing" errors.
private let dataHint =
    "enwik8-mini ships in the gensim 4.4.0 wheel as gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2 (pip download --no-deps gensim==4.4.0, then bunzip2), or use ../shared/data; enwik8 / enwik9: http://mattmahoney.net/dc/enwik8.zip, enwik9.zip (clean=text8 derives text8 / fil9 from them); text8 itself: http://mattmahoney.net/dc/text8.zip (clean=none, compact_vocab=true); tiny Shakespeare: https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

final class CharDataset: LanguageModelDataset {
    static let name = "char", version = "1.1.0"
    static let summary =
        "byte-level LM corpus (enwik8 format or any raw text): vocabulary of 256 bytes, contiguous train/valid/test split; clean=text8 derives text8 from a Wikipedia XML dump (wikifil.pl), compact_vocab=true gives text8's 27 symbols; order=streams serves parallel streams in order (Transformer-XL)"
    static let hyperparameters: [Hyper] = [
        .string(
            "path", "$DATA/enwik8-mini/enwik8-mini", path: true,
            "byte corpus to read (the host expands $DATA and $ROOT)"),
        .float(
            "train_fraction", 0.9, min: 0, max: 1, "leading fraction of the bytes used for training, in (0, 1]"),
        .float(
            "valid_fraction", 0.05, min: 0, max: 1,
            "next fraction used for validation, in [0, 1); the test split is the rest"),
        .int("seq_len", 0, min: 0, "tokens per window; 0 = the model's seq_len"),
        .string(
            "clean", "none", choices: ["none", "text8"],
            "none: the file's bytes as they are; text8: Matt Mahoney's wikifil.pl on a MediaWiki XML dump (enwik8/enwik9 -> text8-style [a-z ] text, splits taken on the cleaned text)"
        ),
        .bool(
            "compact_vocab", false,
            "vocabulary of 27 (space -> 0, a..z -> 1..26) instead of 256 bytes; needs text of only a-z and space (text8, or clean=text8)"
        ),
        .string("order", "windows", choices: ["windows", "streams"], TokenBatches.orderHelp),
    ]

    /// The file's bytes (or its cleaned text) and the split boundaries.
    let corpus: TokenCorpus<UInt8>
    /// Tokens are text8's 27 symbols (compact_vocab), not bytes.
    let compact: Bool

    /// Read the hyperparameters, load the file, compute the splits.
    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        let who = Self.who(model), path = hp.string("path")
        let trainFraction = hp.double("train_fraction"), validFraction = hp.double("valid_fraction")
        try TokenBatches.checkFractions(train: trainFraction, valid: validFraction, who: who)
        let clean = hp.string("clean") == "text8", T = try Self.sequenceLength(hp.int("seq_len"), model)
        var bytes = try readWholeFile(path, who: who, hint: dataHint)
        guard !bytes.isEmpty else { throw .io("\(who): data file \(path) is empty") }
        if clean {
            // wikifil.pl: the visible text of the dump's articles, in [a-z ].
            let rawCount = bytes.count
            bytes = bytes.withUnsafeBufferPointer { wikifilText8($0) }
            guard !bytes.isEmpty else {
                throw .io(
                    "\(who): \(path): clean=text8 left no text (\(rawCount) bytes in; wikifil.pl keeps only the <text ...> ... </text> of non-#REDIRECT pages: is this a MediaWiki XML dump like enwik8?)"
                )
            }
        }
        compact = hp.bool("compact_vocab")
        if compact {
            // text8's 27 symbols: space -> 0, a..z -> 1..26; anything else is an error.
            for i in bytes.indices {
                let c = bytes[i]
                guard c == 0x20 || (c >= 0x61 && c <= 0x7A) else {
                    throw .io(
                        "\(who): \(clean ? "the cleaned text of \(path)" : path): byte \(i) is 0x\(String(c, radix: 16)), not a-z or space; compact_vocab needs text8-style text (set clean=text8 for a Wikipedia XML dump)"
                    )
                }
                bytes[i] = c == 0x20 ? 0 : c - 0x60
            }
        }
        let n = bytes.count
        let (starts, lens) = TokenBatches.contiguousSplits(n, train: trainFraction, valid: validFraction)
        let sizes =
            "train \(lens[0]), valid \(lens[1]), test \(lens[2]) of \(n) bytes\(clean ? " after clean=text8" : "")"
        guard lens[0] >= T + 1 else {
            throw .io(
                "\(who): \(path): the train split has \(lens[0]) bytes (\(sizes)), too short for one window of seq_len \(T) plus its target byte (\(T + 1) bytes)"
            )
        }
        for s in [Split.valid, .test] where lens[s.rawValue] == 1 {
            throw .io(
                "\(who): \(path): the \(s.name) split has 1 byte (\(sizes)), too short for one window (an input byte and its target); change train_fraction / valid_fraction"
            )
        }
        corpus = try TokenCorpus(
            model, tokens: bytes, splitStart: starts, splitLength: lens,
            vocabSize: hp.bool("compact_vocab") ? 27 : 256,
            cut: TokenBatches(seqLen: T, streams: hp.string("order") == "streams", name: "char"))
    }
}

/// "vqmoe.tokenizer/1": a token is a byte, or with compact_vocab one of text8's 27 symbols.
extension CharDataset: TextTokenizer {
    var textUnit: Int32 { VQMOE_TEXT_UNIT_CHAR }

    func encode(_ text: UnsafeBufferPointer<UInt8>) throws(PluginFailure) -> [Int32] {
        guard compact else { return text.map(Int32.init) }
        var out = [Int32](repeating: 0, count: text.count)
        for (i, c) in text.enumerated() {
            guard c == 0x20 || (c >= 0x61 && c <= 0x7A) else {
                throw .invalid(
                    "the text has byte 0x\(String(c, radix: 16)) at offset \(i): this model's vocabulary (compact_vocab, text8) is a-z and space"
                )
            }
            out[i] = c == 0x20 ? 0 : Int32(c) - 0x60
        }
        return out
    }

    func decode(_ token: Int32, after previous: Int32) throws(PluginFailure) -> [UInt8] {
        guard token >= 0 && Int(token) < corpus.vocabSize else {
            throw .invalid("token \(token) is outside the vocabulary [0, \(corpus.vocabSize))")
        }
        return [compact ? (token == 0 ? 0x20 : UInt8(token + 0x60)) : UInt8(token)]
    }
}

/// The plugin entry point: the descriptor of the `char` dataset. Refuses hosts of another
/// ABI major.
@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(CharDataset.self, host)
}
