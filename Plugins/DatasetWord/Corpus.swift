// Reading and tokenising a word-level corpus, and building its vocabulary.
//
// Tokenisation is that of the AWD-LSTM and Transformer-XL word LMs (Merity et al. 2017,
// data.py: `line.split() + ['<eos>']`; Dai et al. 2019, vocabulary.py with wt103's
// special = ['<eos>'], lower_case = False): every LINE of the file -- empty lines included --
// becomes its whitespace-separated words followed by "<eos>". So WikiText's blank lines
// between paragraphs are lone "<eos>" tokens, as in Transformer-XL's encoded wt103. Python
// semantics, since both read the files with `open(path, 'r', encoding='utf-8')`:
//   lines      end at "\n", "\r\n" or "\r" (universal newlines); a last line without a
//              newline counts, nothing follows a final newline, an empty file has no lines.
//   words      str.split(): runs of Unicode whitespace separate words -- ASCII \t \n \v \f \r,
//              \x1c-\x1f, space, and U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029,
//              U+202F, U+205F, U+3000.
//   encoding   UTF-8; a malformed byte sequence is an error naming the file and line (Python
//              would fail to decode it).
import Glibc
import PluginKit
import VQMoEABI

/// Where to get the data, appended to "file missing" errors.
let dataHint =
    "WikiText-103 (Merity et al. 2016): unzip wikitext-103-v1.zip (https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip, also the Hugging Face dataset Salesforce/wikitext) and set dir to its wikitext-103 folder; or set path to any UTF-8 text file (e.g. ../shared/data/tinyshakespeare/input.txt)"

/// Whether a regular file exists at `path`.
func isRegularFile(_ path: String) -> Bool {
    var st = stat()
    return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
}

/// Whether a directory exists at `path`.
func isDirectory(_ path: String) -> Bool {
    var st = stat()
    return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
}

// MARK: - interning words

/// Distinct words of the corpus, numbered in order of first appearance ("provisional ids";
/// 0 = "<unk>", 1 = "<eos>" are entered first). Open addressing on FNV-1a hashes of the
/// word's bytes, which live in one arena.
final class WordTable {
    private(set) var arena: [UInt8] = []
    private(set) var starts: [Int] = []
    private(set) var lengths: [Int32] = []
    private var hashes: [UInt64] = []
    /// Slot -> id, -1 = empty. Capacity is a power of two, at most half full.
    private var slots: [Int32]

    init() {
        slots = [Int32](repeating: -1, count: 1 << 16)
        _ = intern(Array("<unk>".utf8))
        _ = intern(Array("<eos>".utf8))
    }

    var count: Int { starts.count }

    @inline(__always) static func hash(_ p: UnsafePointer<UInt8>, _ n: Int) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for i in 0..<n { h = (h ^ UInt64(p[i])) &* 0x0000_0100_0000_01B3 }
        return h
    }

    func intern(_ word: [UInt8]) -> Int32 {
        word.withUnsafeBufferPointer { intern($0.baseAddress!, $0.count) }
    }

    /// The id of the word p[0 ..< n], entering it when new.
    func intern(_ p: UnsafePointer<UInt8>, _ n: Int) -> Int32 {
        let h = WordTable.hash(p, n)
        let mask = slots.count - 1
        var s = Int(truncatingIfNeeded: h) & mask
        while true {
            let id = slots[s]
            if id < 0 { break }
            let i = Int(id)
            if hashes[i] == h && Int(lengths[i]) == n
                && arena.withUnsafeBufferPointer({ memcmp($0.baseAddress! + starts[i], p, n) == 0 })
            {
                return id
            }
            s = (s + 1) & mask
        }
        let id = Int32(starts.count)
        starts.append(arena.count)
        lengths.append(Int32(n))
        hashes.append(h)
        arena.append(contentsOf: UnsafeBufferPointer(start: p, count: n))
        slots[s] = id
        if starts.count * 2 > slots.count { rehash() }
        return id
    }

    private func rehash() {
        var bigger = [Int32](repeating: -1, count: slots.count * 2)
        let mask = bigger.count - 1
        for id in 0..<starts.count {
            var s = Int(truncatingIfNeeded: hashes[id]) & mask
            while bigger[s] >= 0 { s = (s + 1) & mask }
            bigger[s] = Int32(id)
        }
        slots = bigger
    }

    /// The id of the word p[0 ..< n], or nil when the table does not hold it.
    func find(_ p: UnsafePointer<UInt8>, _ n: Int) -> Int32? {
        let h = WordTable.hash(p, n)
        let mask = slots.count - 1
        var s = Int(truncatingIfNeeded: h) & mask
        while slots[s] >= 0 {
            let i = Int(slots[s])
            if hashes[i] == h && Int(lengths[i]) == n
                && arena.withUnsafeBufferPointer({ memcmp($0.baseAddress! + starts[i], p, n) == 0 })
            {
                return slots[s]
            }
            s = (s + 1) & mask
        }
        return nil
    }

    /// The bytes of word `id`.
    func word(_ id: Int) -> ArraySlice<UInt8> { arena[starts[id]..<(starts[id] + Int(lengths[id]))] }

    /// Byte order of words a and b (memcmp, then the shorter first): the vocabulary's tie-break.
    func bytesLess(_ a: Int, _ b: Int) -> Bool {
        let la = Int(lengths[a]), lb = Int(lengths[b])
        let c = arena.withUnsafeBufferPointer {
            memcmp($0.baseAddress! + starts[a], $0.baseAddress! + starts[b], min(la, lb))
        }
        return c != 0 ? c < 0 : la < lb
    }
}

// MARK: - tokenising

/// Length of the well-formed UTF-8 sequence at p[i] (p[i] >= 0x80), or 0 when malformed
/// (Unicode 15, table 3-7: no overlongs, no surrogates, nothing above U+10FFFF).
@inline(__always)
private func utf8Length(_ p: UnsafePointer<UInt8>, _ i: Int, _ n: Int) -> Int {
    let c = p[i]
    @inline(__always) func cont(_ k: Int, _ lo: UInt8 = 0x80, _ hi: UInt8 = 0xBF) -> Bool {
        i + k < n && p[i + k] >= lo && p[i + k] <= hi
    }
    switch c {
    case 0xC2...0xDF: return cont(1) ? 2 : 0
    case 0xE0: return cont(1, 0xA0) && cont(2) ? 3 : 0
    case 0xE1...0xEC, 0xEE...0xEF: return cont(1) && cont(2) ? 3 : 0
    case 0xED: return cont(1, 0x80, 0x9F) && cont(2) ? 3 : 0
    case 0xF0: return cont(1, 0x90) && cont(2) && cont(3) ? 4 : 0
    case 0xF1...0xF3: return cont(1) && cont(2) && cont(3) ? 4 : 0
    case 0xF4: return cont(1, 0x80, 0x8F) && cont(2) && cont(3) ? 4 : 0
    default: return 0
    }
}

/// Whether the well-formed sequence p[i ..< i+len] (len >= 2) is a character Python's
/// str.split() treats as whitespace: U+0085, U+00A0, U+1680, U+2000-U+200A, U+2028, U+2029,
/// U+202F, U+205F, U+3000.
@inline(__always)
private func isUnicodeSpace(_ p: UnsafePointer<UInt8>, _ i: Int, _ len: Int) -> Bool {
    let a = p[i], b = p[i + 1]
    if len == 2 { return a == 0xC2 && (b == 0x85 || b == 0xA0) }
    guard len == 3 else { return false }
    let c = p[i + 2]
    switch (a, b) {
    case (0xE1, 0x9A): return c == 0x80
    case (0xE2, 0x80): return c <= 0x8A || c == 0xA8 || c == 0xA9 || c == 0xAF
    case (0xE2, 0x81): return c == 0x9F
    case (0xE3, 0x80): return c == 0x80
    default: return false
    }
}

/// ASCII whitespace of str.split(): \t \n \v \f \r, \x1c-\x1f, space.
@inline(__always) private func isASCIISpace(_ c: UInt8) -> Bool { (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) }

/// Append the provisional ids of the tokens of `file` (the bytes of `path`: each line's words,
/// then "<eos>") to `stream`, interning new words in `table`. Returns the number of lines.
func tokenize(
    _ file: [UInt8], path: String, into stream: inout [Int32], table: WordTable
) throws(PluginFailure) -> Int {
    try file.withUnsafeBufferPointer { b throws(PluginFailure) in
        guard let base = b.baseAddress else { return 0 }
        return try tokenize(base, b.count, path: path, into: &stream, table: table)
    }
}

private func tokenize(
    _ p: UnsafePointer<UInt8>, _ n: Int, path: String, into stream: inout [Int32], table: WordTable
) throws(PluginFailure) -> Int {
    let eos: Int32 = 1
    var lines = 0
    var i = 0
    while i < n {
        lines += 1
        var wordStart = -1
        // One line: up to "\n", "\r\n", "\r" or the end of the file.
        while i < n {
            let c = p[i]
            if c == 0x0A || c == 0x0D {
                if wordStart >= 0 { stream.append(table.intern(p + wordStart, i - wordStart)); wordStart = -1 }
                i += (c == 0x0D && i + 1 < n && p[i + 1] == 0x0A) ? 2 : 1
                break
            }
            var len = 1
            var space = false
            if c < 0x80 {
                space = isASCIISpace(c)
            } else {
                len = utf8Length(p, i, n)
                guard len > 0 else {
                    var lineStart = i
                    while lineStart > 0 && p[lineStart - 1] != 0x0A && p[lineStart - 1] != 0x0D { lineStart -= 1 }
                    throw .io(
                        "\(path):\(lines): malformed UTF-8 (byte 0x\(String(c, radix: 16)) at column \(i - lineStart + 1), file offset \(i)); the word-level corpus must be UTF-8 text"
                    )
                }
                space = isUnicodeSpace(p, i, len)
            }
            if space {
                if wordStart >= 0 { stream.append(table.intern(p + wordStart, i - wordStart)); wordStart = -1 }
            } else if wordStart < 0 {
                wordStart = i
            }
            i += len
        }
        if wordStart >= 0 { stream.append(table.intern(p + wordStart, i - wordStart)) }
        stream.append(eos)
    }
    return lines
}

// MARK: - the vocabulary

/// The vocabulary built from train-split counts: "<unk>" = 0, "<eos>" = 1, then every other
/// word with count >= min_count by descending count, ties in byte order, cut to max_vocab
/// entries in all. `finalID[provisional]` is the word's id, 0 (<unk>) when it is not in it.
struct Vocabulary {
    var finalID: [Int32]
    var size: Int

    init(table: WordTable, trainTokens: UnsafeBufferPointer<Int32>, minCount: Int, maxVocab: Int) {
        var counts = [Int](repeating: 0, count: table.count)
        for id in trainTokens { counts[Int(id)] += 1 }
        var words = (2..<table.count).filter { counts[$0] >= minCount }
        words.sort { a, b in counts[a] != counts[b] ? counts[a] > counts[b] : table.bytesLess(a, b) }
        if maxVocab > 0 && words.count > maxVocab - 2 { words.removeLast(words.count - (maxVocab - 2)) }
        finalID = [Int32](repeating: 0, count: table.count)
        finalID[1] = 1
        for (rank, w) in words.enumerated() { finalID[w] = Int32(rank + 2) }
        size = words.count + 2
    }
}
