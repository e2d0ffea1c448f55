// DatasetWord: the `word` dataset plugin -- a word-level language-modelling corpus in the
// WikiText-103 format (Merity et al. 2016): <dir>/wiki.{train,valid,test}.tokens, or one text
// file (`path`) split contiguously by tokens like `char` splits bytes.
//
// Tokens are each line's whitespace-separated words plus "<eos>" (Corpus.swift); the
// vocabulary comes from the train split only ("<unk>", "<eos>", then words by descending
// count, ties in byte order; min_count, max_vocab), and valid/test words outside it become
// "<unk>". Batches are a pure function of (instance seed, split, index, batch_size), cut as in
// `char` by PluginKit's TokenBatches: random train windows and ordered eval windows, or with
// order = "streams" (Transformer-XL) batch_size parallel streams read in order.
import PluginKit
import VQMoEABI

final class WordDataset: LanguageModelDataset {
    static let name = "word", version = "1.1.0", reportsMetrics = true
    static let summary =
        "word-level LM corpus in the WikiText-103 format (dir/wiki.{train,valid,test}.tokens) or one text file split "
        + "by tokens (path): each line's whitespace-separated words + <eos>; vocabulary from the train split "
        + "(<unk>, <eos>, then by descending count, ties in byte order; min_count, max_vocab), other words -> <unk>; "
        + "order=streams serves parallel streams in order (Transformer-XL)"
    static let hyperparameters: [Hyper] = [
        .string(
            "dir", "$DATA/wikitext-103", path: true, optional: true,
            "WikiText-103-format folder with wiki.train.tokens, wiki.valid.tokens, wiki.test.tokens (the host expands $DATA); empty = use path"
        ),
        .string(
            "path", "", path: true, optional: true,
            "single text file split contiguously (by tokens) into train/valid/test; used when dir is empty or lacks its files"
        ),
        .float(
            "train_fraction", 0.9, min: 0, max: 1,
            "with path: leading fraction of the token stream used for training, in (0, 1]"),
        .float(
            "valid_fraction", 0.05, min: 0, max: 1,
            "with path: next fraction used for validation, in [0, 1); the test split is the rest"),
        .int("seq_len", 0, min: 0, "tokens per window; 0 = the model's seq_len"),
        .int(
            "min_count", 1, min: 1,
            "a word enters the vocabulary when it occurs at least this often in the train split (else <unk>)"),
        .int(
            "max_vocab", 0, min: 0,
            "largest vocabulary, <unk> and <eos> included (the most frequent words are kept); 0 = unlimited"),
        .string("order", "windows", choices: ["windows", "streams"], TokenBatches.orderHelp),
    ]

    /// The final token ids of the three splits.
    let corpus: TokenCorpus<Int32>
    /// Tokens of each split mapped to <unk> although their text was not "<unk>".
    let oovCount: [Int]
    /// Every word read (provisional ids) and the vocabulary over them, for the tokenizer.
    let table: WordTable
    let vocabulary: Vocabulary
    /// The provisional id of each final id (its text in `table`).
    let wordOfID: [Int32]

    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) {
        let who = Self.who(model), trainFraction = hp.double("train_fraction")
        let validFraction = hp.double("valid_fraction"), maxVocab = hp.int("max_vocab")
        try TokenBatches.checkFractions(train: trainFraction, valid: validFraction, who: who)
        guard maxVocab == 0 || maxVocab >= 2 else {
            throw .invalid(
                "\(who): max_vocab \(maxVocab) must be 0 (unlimited) or >= 2 (<unk> and <eos> are always in the vocabulary)"
            )
        }
        let T = try Self.sequenceLength(hp.int("seq_len"), model)
        let table = WordTable()
        var data = try Self.load(hp, table: table, model: model)
        let lens = data.splitLength, sizes = "train \(lens[0]), valid \(lens[1]), test \(lens[2]) tokens"
        guard lens[0] >= T + 1 else {
            throw .io(
                "\(who): \(data.source): the train split has \(lens[0]) tokens (\(sizes)), too short for one window of seq_len \(T) plus its target token (\(T + 1) tokens)"
            )
        }
        for s in [Split.valid, .test] where lens[s.rawValue] == 1 {
            throw .io(
                "\(who): \(data.source): the \(s.name) split has 1 token (\(sizes)), too short for one window (an input token and its target)\(data.fromPath ? "; change train_fraction / valid_fraction" : "")"
            )
        }
        // Vocabulary from the train split only; provisional ids -> final ids, counting OOVs.
        let vocab = data.stream.withUnsafeBufferPointer {
            Vocabulary(
                table: table, trainTokens: UnsafeBufferPointer(rebasing: $0[0..<lens[0]]),
                minCount: hp.int("min_count"), maxVocab: maxVocab)
        }
        oovCount = data.mapToFinalIDs(vocab)
        (self.table, vocabulary) = (table, vocab)
        var wordOf = [Int32](repeating: 0, count: vocab.size)
        for (p, f) in vocab.finalID.enumerated() where f > 0 || p == 0 { wordOf[Int(f)] = Int32(p) }
        wordOfID = wordOf
        corpus = try TokenCorpus(
            model, tokens: data.stream, splitStart: data.splitStart, splitLength: lens, vocabSize: vocab.size,
            cut: TokenBatches(seqLen: T, streams: hp.string("order") == "streams", name: "word"))
    }

    /// The provisional ids of the three splits: dir's WikiText files when it holds all three,
    /// else `path` split contiguously by the fractions.
    static func load(_ hp: HyperValues, table: WordTable, model: ModelInfo) throws(PluginFailure) -> Streams {
        let who = Self.who(model), dir = hp.string("dir"), path = hp.string("path")
        let dirFiles = Split.allCases.map { "\(dir)/wiki.\($0.name).tokens" }
        let missing = dir.isEmpty ? dirFiles : dirFiles.filter { !isRegularFile($0) }
        var data = Streams()
        if !dir.isEmpty && missing.isEmpty {
            data.source = "dir \(dir)"
            for s in 0..<3 {
                let file = try readWholeFile(dirFiles[s], who: who, hint: dataHint)
                if s == 0 { data.stream.reserveCapacity(file.count / 5 + 16) }
                data.splitStart[s] = data.stream.count
                _ = try prefixed(who) { () throws(PluginFailure) in
                    try tokenize(file, path: dirFiles[s], into: &data.stream, table: table)
                }
                data.splitLength[s] = data.stream.count - data.splitStart[s]
                if s == 0 && data.splitLength[0] == 0 { throw .io("\(who): \(dirFiles[0]) is empty (\(data.source))") }
            }
            return data
        }
        let why =
            dir.isEmpty
            ? "dir is empty"
            : "dir \(dir) lacks \(missing.map { String($0.split(separator: "/").last ?? "") }.joined(separator: ", "))"
        guard !path.isEmpty else {
            throw .io(
                "\(who): no data: \(dir.isEmpty ? "dir is empty" : "WikiText files not found: " + missing.joined(separator: ", ")) and hyperparameter 'path' is empty. \(dataHint)"
            )
        }
        (data.source, data.fromPath) = ("path \(path) (\(why))", true)
        if !dir.isEmpty && isDirectory(dir), let log = model.host.api.pointee.log {
            "\(who): \(why); reading path \(path)".withCString { m in "word".withCString { log(VQMOE_LOG_WARN, $0, m) }
            }
        }
        let file = try readWholeFile(path, who: who, hint: "(\(why).) \(dataHint)")
        guard file.count > 0 else { throw .io("\(who): data file \(path) is empty (\(why))") }
        data.stream.reserveCapacity(file.count / 5 + 16)
        _ = try prefixed(who) { () throws(PluginFailure) in
            try tokenize(file, path: path, into: &data.stream, table: table)
        }
        // Contiguous splits of the token stream from cumulative fractions.
        (data.splitStart, data.splitLength) = TokenBatches.contiguousSplits(
            data.stream.count, train: hp.double("train_fraction"), valid: hp.double("valid_fraction"))
        return data
    }

    /// Fraction of a split's tokens (every word and <eos>) mapped to <unk> whose text was not
    /// "<unk>"; 0 for an empty split.
    func oovRate(_ split: Int) -> Double {
        let n = corpus.splitLength[split]
        return n == 0 ? 0 : Double(oovCount[split]) / Double(n)
    }

    /// "vqmoe.metrics/1": oov_rate_train / oov_rate_valid / oov_rate_test (see oovRate) and
    /// vocab_size.
    func metrics(_ sink: MetricSink) throws(PluginFailure) {
        for s in Split.allCases { sink.scalar("oov_rate_\(s.name)", oovRate(s.rawValue)) }
        sink.scalar("vocab_size", Double(corpus.vocabSize))
    }
}

/// "vqmoe.tokenizer/1": each line's words and <eos>, as the corpus files are read (a last line
/// without a newline still ends in <eos>); words outside the vocabulary are <unk>. Decoding
/// puts a space before each word except at the start of a line, and <eos> as a newline.
extension WordDataset: TextTokenizer {
    var textUnit: Int32 { VQMOE_TEXT_UNIT_WORD }

    func encode(_ text: UnsafeBufferPointer<UInt8>) throws(PluginFailure) -> [Int32] {
        guard text.count > 0 else { return [] }
        let local = WordTable()
        var ids: [Int32] = []
        _ = try tokenize(Array(text), path: "the text", into: &ids, table: local)
        // Local ids -> final ids through the corpus's words (0 = <unk>, 1 = <eos> in both).
        var toFinal = [Int32](repeating: 0, count: local.count)
        toFinal[1] = 1
        for l in 2..<max(2, local.count) {
            let w = local.word(l)
            let p = w.withUnsafeBufferPointer { table.find($0.baseAddress!, $0.count) }
            toFinal[l] = p.map { vocabulary.finalID[Int($0)] } ?? 0
        }
        return ids.map { toFinal[Int($0)] }
    }

    func decode(_ token: Int32, after previous: Int32) throws(PluginFailure) -> [UInt8] {
        guard token >= 0 && Int(token) < wordOfID.count else {
            throw .invalid("token \(token) is outside the vocabulary [0, \(wordOfID.count))")
        }
        if token == 1 { return [0x0A] }
        let w = Array(table.word(Int(wordOfID[Int(token)])))
        return previous < 0 || previous == 1 ? w : [0x20] + w
    }
}

/// The token stream of the three splits as read, before the vocabulary.
struct Streams {
    /// Provisional ids of all splits, one after another.
    var stream: [Int32] = []
    var splitStart = [0, 0, 0], splitLength = [0, 0, 0]
    /// What was read, for messages: "dir D" or "path P (why)".
    var source = ""
    /// Whether the splits were cut from `path` by the fractions.
    var fromPath = false

    /// In place: the stream becomes the final token ids. Returns each split's OOV count.
    mutating func mapToFinalIDs(_ vocab: Vocabulary) -> [Int] {
        var oov = [0, 0, 0]
        let (starts, lens) = (splitStart, splitLength)
        stream.withUnsafeMutableBufferPointer { ids in
            vocab.finalID.withUnsafeBufferPointer { map in
                for s in 0..<3 {
                    var k = 0
                    for i in starts[s]..<(starts[s] + lens[s]) {
                        let p = ids[i], f = map[Int(p)]
                        ids[i] = f
                        if f == 0 && p != 0 { k += 1 }
                    }
                    oov[s] = k
                }
            }
        }
        return oov
    }
}

@_cdecl("vqmoe_plugin_entry")
public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
    pluginEntry(WordDataset.self, host)
}
