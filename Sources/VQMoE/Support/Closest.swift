/// Edit distance and "did you mean" ordering for names the user typed.
///
/// ```swift
/// closestFirst("smo", among: ["vqvae", "smoe", "lm"])  // ["smoe", "lm", "vqvae"]
/// ```
public func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a.lowercased().utf8), b = Array(b.lowercased().utf8)
    if a.isEmpty { return b.count }
    if b.isEmpty { return a.count }
    var prev = Array(0...b.count), cur = [Int](repeating: 0, count: b.count + 1)
    for i in 1...a.count {
        cur[0] = i
        for j in 1...b.count {
            let cost = a[i - 1] == b[j - 1] ? 0 : 1
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
        }
        swap(&prev, &cur)
    }
    return prev[b.count]
}

/// `names` sorted by edit distance to `query` (ties by name), closest first.
public func closestFirst(_ query: String, among names: [String]) -> [String] {
    names.map { (editDistance(query, $0), $0) }
        .sorted { $0.0 != $1.0 ? $0.0 < $1.0 : $0.1 < $1.1 }
        .map { $0.1 }
}
