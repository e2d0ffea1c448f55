// Reading CSV / TSV files with a header row (RFC 4180 quoting).
import PluginKit
import VQMoEABI

/// Where to get the default data, appended to "file missing" errors.
let csvDataHint =
    "BANKING77 (PolyAI, CC BY 4.0): train.csv, test.csv and categories.json from https://github.com/PolyAI-LDN/task-specific-datasets/tree/master/banking_data; a copy lives in ../shared/data/banking77. For another data set set train_path, test_path and categories_path"

private let quote: UInt8 = 34, lf: UInt8 = 10, cr: UInt8 = 13

/// One record: its fields (quotes removed, "" unescaped) and the line it starts on (1-based).
struct CSVRecord {
    var fields: [[UInt8]]
    var line: Int
}

/// RFC 4180 records of a CSV/TSV file. Fields are separated by `delimiter`, records by LF or
/// CRLF. A field that starts with '"' is quoted: it ends at the next lone '"', holds
/// delimiters and line breaks literally, and "" inside it stands for one '"'; after the
/// closing quote comes a delimiter, a line break or the end of the file. A '"' inside an
/// unquoted field is kept as it is (as Python's csv module does). Empty lines between records
/// are skipped; a UTF-8 byte-order mark at the start is ignored.
struct CSVReader {
    let bytes: [UInt8]
    let delimiter: UInt8
    /// "who: path", for messages.
    let at: String
    private var pos: Int
    /// Line of `pos` (1-based).
    private var line = 1

    init(bytes: [UInt8], delimiter: UInt8, at: String) {
        self.bytes = bytes; self.delimiter = delimiter; self.at = at
        pos = bytes.starts(with: [0xEF, 0xBB, 0xBF]) ? 3 : 0
    }

    /// The next record, or nil at the end of the file.
    mutating func next() throws(PluginFailure) -> CSVRecord? {
        let n = bytes.count
        // Skip empty lines.
        while pos < n {
            if bytes[pos] == lf {
                pos += 1; line += 1
            } else if bytes[pos] == cr && pos + 1 < n && bytes[pos + 1] == lf {
                pos += 2; line += 1
            } else {
                break
            }
        }
        guard pos < n else { return nil }
        let startLine = line
        var fields: [[UInt8]] = []
        while true {
            var field: [UInt8] = []
            if pos < n && bytes[pos] == quote {
                let openLine = line
                pos += 1
                while true {
                    guard pos < n else {
                        throw .io(
                            "\(at):\(openLine): a quoted field opened on this line is never closed (missing '\"')")
                    }
                    let c = bytes[pos]
                    if c == quote {
                        if pos + 1 < n && bytes[pos + 1] == quote { field.append(quote); pos += 2; continue }
                        pos += 1
                        break
                    }
                    if c == lf { line += 1 }
                    field.append(c)
                    pos += 1
                }
                if pos < n && bytes[pos] != delimiter && bytes[pos] != lf
                    && !(bytes[pos] == cr && (pos + 1 == n || bytes[pos + 1] == lf))
                {
                    let c = bytes[pos]
                    let shown =
                        c >= 32 && c < 127 ? "'\(Character(Unicode.Scalar(c)))'" : "byte 0x\(String(c, radix: 16))"
                    throw .io(
                        "\(at):\(line): unexpected \(shown) after the closing quote of a quoted field (a '\"' inside a quoted field must be written \"\")"
                    )
                }
            } else {
                let s = pos
                while pos < n && bytes[pos] != delimiter && bytes[pos] != lf { pos += 1 }
                var e = pos
                if e > s && bytes[e - 1] == cr && (pos == n || bytes[pos] == lf) { e -= 1 }  // CRLF
                field.append(contentsOf: bytes[s..<e])
            }
            fields.append(field)
            if pos < n && bytes[pos] == delimiter { pos += 1; continue }
            // End of the record: CRLF, LF or the end of the file.
            if pos < n && bytes[pos] == cr { pos += 1 }
            if pos < n && bytes[pos] == lf { pos += 1; line += 1 }
            return CSVRecord(fields: fields, line: startLine)
        }
    }
}

/// The data rows of one file: each row's text bytes, its label (surrounding whitespace
/// removed) and the line it starts on.
struct CSVRows {
    let path: String
    var texts: [[UInt8]] = []
    var labels: [String] = []
    var lines: [Int] = []
    var count: Int { labels.count }
}

/// Read `path`: the header row names the columns; every later record must have as many
/// fields. Errors name "path:LINE" (the line a record starts on).
func readCSVRows(
    _ path: String, delimiter: UInt8, textColumn: String, labelColumn: String,
    who: String
) throws(PluginFailure) -> CSVRows {
    let bytes = try readWholeFile(path, who: who, hint: csvDataHint)
    guard !bytes.isEmpty else { throw .io("\(who): data file \(path) is empty") }
    var reader = CSVReader(bytes: bytes, delimiter: delimiter, at: "\(who): \(path)")
    guard let header = try reader.next() else { throw .io("\(who): data file \(path) has no header row") }
    let columns = header.fields.map { String(decoding: $0, as: UTF8.self) }
    let listed = columns.map { "'\($0)'" }.joined(separator: ", ")
    let separator = delimiter == 9 ? "tab" : "comma"
    guard let textIndex = columns.firstIndex(of: textColumn) else {
        throw .io(
            "\(who): \(path):\(header.line): the header has no column '\(textColumn)' (text_column); its \(columns.count) columns (\(separator)-separated) are \(listed)"
        )
    }
    guard let labelIndex = columns.firstIndex(of: labelColumn) else {
        throw .io(
            "\(who): \(path):\(header.line): the header has no column '\(labelColumn)' (label_column); its \(columns.count) columns (\(separator)-separated) are \(listed)"
        )
    }
    var rows = CSVRows(path: path)
    while let record = try reader.next() {
        guard record.fields.count == columns.count else {
            throw .io(
                "\(who): \(path):\(record.line): \(record.fields.count) fields, but the header (line \(header.line)) has \(columns.count) columns (\(separator)-separated)"
            )
        }
        rows.texts.append(record.fields[textIndex])
        rows.labels.append(trimmed(record.fields[labelIndex]))
        rows.lines.append(record.line)
    }
    guard rows.count > 0 else { throw .io("\(who): data file \(path) has a header but no rows") }
    return rows
}

/// A label's text with surrounding ASCII whitespace removed.
func trimmed(_ bytes: [UInt8]) -> String {
    var s = 0, e = bytes.count
    while s < e && isSpace(bytes[s]) { s += 1 }
    while e > s && isSpace(bytes[e - 1]) { e -= 1 }
    return String(decoding: bytes[s..<e], as: UTF8.self)
}
