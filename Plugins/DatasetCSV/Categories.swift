// The classes of a csv dataset: a categories.json file, or the train file's labels.
import Foundation
import PluginKit
import VQMoEABI

/// The class names in `path`, a JSON array of strings (class i = element i), e.g.
/// BANKING77's ["card_arrival", "card_linking", ...]. Names are compared with surrounding
/// whitespace removed and must be distinct.
func readCategories(_ path: String, who: String) throws(PluginFailure) -> [String] {
    let bytes = try readWholeFile(path, who: who, hint: csvDataHint)
    guard !bytes.isEmpty else { throw .io("\(who): categories file \(path) is empty") }
    let object: Any
    do {
        object = try JSONSerialization.jsonObject(with: Data(bytes))
    } catch {
        throw .io(
            "\(who): \(path) is not valid JSON (\(error.localizedDescription)); expected an array of label strings such as [\"card_arrival\", \"card_linking\"]"
        )
    }
    guard let array = object as? [Any] else {
        throw .io("\(who): \(path): expected a JSON array of label strings, got \(type(of: object))")
    }
    var names: [String] = []
    for (i, element) in array.enumerated() {
        guard let name = element as? String else {
            throw .io("\(who): \(path): element \(i) of the array is not a string (\(element))")
        }
        names.append(trimmed(Array(name.utf8)))
    }
    guard !names.isEmpty else { throw .io("\(who): \(path): the array of categories is empty") }
    var seen: [String: Int] = [:]
    for (i, name) in names.enumerated() {
        if let j = seen[name] {
            throw .io("\(who): \(path): category '\(name)' appears twice (elements \(j) and \(i))")
        }
        seen[name] = i
    }
    return names
}

/// The sorted (by UTF-8 bytes) distinct labels of `rows`: the classes when no categories
/// file is given.
func distinctLabels(_ rows: CSVRows) -> [String] {
    Set(rows.labels).sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }
}

/// `rows` as examples, each label replaced by its class index. A label that is no class is
/// an error at its path:LINE; `source` says where the classes came from.
func examples(
    _ rows: CSVRows, classes: [String: Int32], source: String, who: String
) throws(PluginFailure) -> TextExamples {
    var out = TextExamples()
    for i in 0..<rows.count {
        guard let label = classes[rows.labels[i]] else {
            throw .io(
                "\(who): \(rows.path):\(rows.lines[i]): label '\(rows.labels[i])' is not one of the \(classes.count) classes (\(source))"
            )
        }
        out.append(rows.texts[i], label: label)
    }
    return out
}
