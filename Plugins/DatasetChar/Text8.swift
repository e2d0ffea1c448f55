// Text8.swift: `clean = "text8"` of the `char` dataset -- a byte-exact port of Matt Mahoney's
// wikifil.pl, the Perl script that made text8 (and fil9) from the enwik9 Wikipedia dump
// (http://mattmahoney.net/dc/textdata.html, Appendix A; "Written by Matt Mahoney, June 10,
// 2006", public domain).
//
// The script reads the XML in records that END with ">" (`$/ = ">"`), keeps only what lies
// between <text ...> and </text> of pages that are not #REDIRECTs, runs a fixed sequence of
// substitutions on each kept record, lowercases, spells digits, turns every other byte into a
// space and squeezes spaces. The port keeps the script's order and its regex semantics:
// leftmost matches, greedy quantifiers (with the backtracking worked out per pattern below),
// `.` not matching "\n", s///g resuming after each match without rescanning the replacement,
// and byte (not Unicode) semantics: Perl without `use utf8` sees UTF-8 as single bytes, so
// /i and tr/A-Z/a-z/ fold ASCII only and \d is [0-9].
//
// The output is " w1 w2 ... wn": a leading space, words of [a-z] separated by single spaces,
// no trailing space (the script's `chop`), like text8 itself.
#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

// MARK: - bytes the script names

private let chLT = UInt8(ascii: "<"), chGT = UInt8(ascii: ">"), chAmp = UInt8(ascii: "&")
private let chSemi = UInt8(ascii: ";"), chLB = UInt8(ascii: "["), chRB = UInt8(ascii: "]")
private let chBar = UInt8(ascii: "|"), chLC = UInt8(ascii: "{"), chRC = UInt8(ascii: "}")
private let chSpace = UInt8(ascii: " "), chNL = UInt8(ascii: "\n"), chColon = UInt8(ascii: ":")
private let chMinus = UInt8(ascii: "-")

/// " zero " ... " nine " without their spaces (the script's s/0/ zero /g ... s/9/ nine /g).
private let digitWords: [[UInt8]] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    .map { Array($0.utf8) }

@inline(__always) private func isLower(_ c: UInt8) -> Bool { c >= 0x61 && c <= 0x7A }
@inline(__always) private func isDigit(_ c: UInt8) -> Bool { c >= 0x30 && c <= 0x39 }
@inline(__always) private func foldASCII(_ c: UInt8) -> UInt8 { c >= 0x41 && c <= 0x5A ? c + 32 : c }

/// `s[i...]` starts with `lit` (case-sensitive).
@inline(__always)
private func hasPrefix(_ s: UnsafeBufferPointer<UInt8>, _ i: Int, _ lit: [UInt8]) -> Bool {
    guard i + lit.count <= s.count else { return false }
    for k in 0..<lit.count where s[i + k] != lit[k] { return false }
    return true
}

/// `s[i...]` starts with `lit` under Perl's /i on bytes (`lit` is lowercase ASCII).
@inline(__always)
private func hasPrefixCI(_ s: UnsafeBufferPointer<UInt8>, _ i: Int, _ lit: [UInt8]) -> Bool {
    guard i + lit.count <= s.count else { return false }
    for k in 0..<lit.count where foldASCII(s[i + k]) != lit[k] { return false }
    return true
}

/// Whether `lit` occurs in `s` (case-insensitively with `ci`): the script's m// tests.
private func contains(_ s: UnsafeBufferPointer<UInt8>, _ lit: [UInt8], ci: Bool = false) -> Bool {
    guard lit.count <= s.count else { return false }
    for i in 0...(s.count - lit.count) where ci ? hasPrefixCI(s, i, lit) : hasPrefix(s, i, lit) { return true }
    return false
}

/// First index >= `from` holding `a` or `b` (s.count when none). Remembers its last answer,
/// so that several failed match attempts that scan to the same terminator stay linear.
private struct NextIndex {
    let a: UInt8, b: UInt8
    private var lo = 1, hi = 0  // s[lo ..< hi] holds neither byte; s[hi] does (or hi == count)
    init(_ a: UInt8, _ b: UInt8? = nil) { self.a = a; self.b = b ?? a }
    mutating func find(_ s: UnsafeBufferPointer<UInt8>, from p: Int) -> Int {
        if p >= lo && p <= hi { return hi }
        var j = p
        while j < s.count && s[j] != a && s[j] != b { j += 1 }
        lo = p; hi = j
        return j
    }
}

/// Perl's s/PATTERN/REPLACEMENT/ (g when `global`): `match(i)` tries the pattern at i (whose
/// first byte is `first`) and returns the match end or -1; `replace(i, end, &out)` appends the
/// replacement. The scan is leftmost-first and resumes at the match end: matches never
/// overlap and replacements are not rescanned.
@inline(__always)
private func substitute(
    _ s: UnsafeBufferPointer<UInt8>, _ out: inout [UInt8], first: UInt8, global: Bool = true,
    _ match: (Int) -> Int, _ replace: (Int, Int, inout [UInt8]) -> Void = { _, _, _ in }
) {
    let n = s.count
    var keep = 0, i = 0
    while i < n {
        if s[i] != first { i += 1; continue }
        let end = match(i)
        if end < 0 { i += 1; continue }
        out.append(contentsOf: UnsafeBufferPointer(rebasing: s[keep..<i]))
        replace(i, end, &out)
        keep = end; i = end
        if !global { break }
    }
    out.append(contentsOf: UnsafeBufferPointer(rebasing: s[keep..<n]))
}

/// s/LITERAL/REPLACEMENT/g (with /i when `ci`; `lit` lowercase then).
private func replaceLiteral(
    _ s: UnsafeBufferPointer<UInt8>, _ out: inout [UInt8], _ lit: [UInt8], _ rep: [UInt8],
    ci: Bool = false
) {
    substitute(
        s, &out, first: lit[0], { i in (ci ? hasPrefixCI(s, i, lit) : hasPrefix(s, i, lit)) ? i + lit.count : -1 },
        { _, _, o in o.append(contentsOf: rep) })
}

// MARK: - the substitutions, in the script's order

private let litAmp = Array("&amp;".utf8), litLt = Array("&lt;".utf8), litGt = Array("&gt;".utf8)
private let litRef = Array("<ref".utf8), litRefEnd = Array("</ref>".utf8), litHttp = Array("[http:".utf8)
private let litThumb = Array("|thumb".utf8), litLeft = Array("|left".utf8), litRight = Array("|right".utf8)
private let litImage = Array("[[image:".utf8), litCategory = Array("[[category:".utf8)
private let litTextOpen = Array("<text ".utf8), litTextClose = Array("</text>".utf8)
private let litRedirect = Array("#redirect".utf8)

/// The body of `if ($text) { ... }` for one record `a`: every substitution, then the final
/// lowercase / digits / tr/a-z/ /cs / chop, appended to `out`. `b` is scratch.
private func cleanRecord(_ a: inout [UInt8], _ b: inout [UInt8], into out: inout [UInt8]) {
    /// Run one pass a -> b, then swap so `a` holds the result.
    func pass(_ body: (UnsafeBufferPointer<UInt8>, inout [UInt8]) -> Void) {
        b.removeAll(keepingCapacity: true)
        a.withUnsafeBufferPointer { body($0, &b) }
        swap(&a, &b)
    }

    // s/<.*>//;   remove xml tags -- once, from the leftmost "<" that has a ">" later on its
    // line ("." does not match "\n") to the LAST ">" of that line (".*" is greedy).
    pass { s, o in
        substitute(s, &o, first: chLT, global: false) { i in
            var j = i + 1, last = -1
            while j < s.count && s[j] != chNL { if s[j] == chGT { last = j }; j += 1 }
            return last < 0 ? -1 : last + 1
        }
    }
    // s/&amp;/&/g; s/&lt;/</g; s/&gt;/>/g;   decode URL encoded chars (in this order, so
    // "&amp;lt;" becomes "<").
    pass { s, o in replaceLiteral(s, &o, litAmp, [chAmp]) }
    pass { s, o in replaceLiteral(s, &o, litLt, [chLT]) }
    pass { s, o in replaceLiteral(s, &o, litGt, [chGT]) }
    // s/<ref[^<]*<\/ref>//g;   remove references: "<ref", then everything up to the next "<",
    // which must open "</ref>" ([^<]* cannot backtrack onto a "<").
    pass { s, o in
        substitute(s, &o, first: chLT) { i in
            guard hasPrefix(s, i, litRef) else { return -1 }
            var j = i + 4
            while j < s.count && s[j] != chLT { j += 1 }
            return hasPrefix(s, j, litRefEnd) ? j + 6 : -1
        }
    }
    // s/<[^>]*>//g;   remove xhtml tags: "<" through the next ">" (across lines).
    pass { s, o in
        var nextGT = NextIndex(chGT)
        substitute(s, &o, first: chLT) { i in
            let j = nextGT.find(s, from: i + 1)
            return j < s.count ? j + 1 : -1
        }
    }
    // s/\[http:[^] ]*/[/g;   remove normal url, preserve visible text: "[http:" and what
    // follows up to a "]" or " " become "[".
    pass { s, o in
        substitute(
            s, &o, first: chLB,
            { i in
                guard hasPrefix(s, i, litHttp) else { return -1 }
                var j = i + 6
                while j < s.count && s[j] != chRB && s[j] != chSpace { j += 1 }
                return j
            }, { _, _, o in o.append(chLB) })
    }
    // s/\|thumb//ig; s/\|left//ig; s/\|right//ig;   remove images links, preserve caption.
    pass { s, o in replaceLiteral(s, &o, litThumb, [], ci: true) }
    pass { s, o in replaceLiteral(s, &o, litLeft, [], ci: true) }
    pass { s, o in replaceLiteral(s, &o, litRight, [], ci: true) }
    // s/\|\d+px//ig;   "|", one or more digits, "px" in any case.
    pass { s, o in
        substitute(s, &o, first: chBar) { i in
            var j = i + 1
            while j < s.count && isDigit(s[j]) { j += 1 }
            guard j > i + 1, j + 2 <= s.count, foldASCII(s[j]) == UInt8(ascii: "p"),
                foldASCII(s[j + 1]) == UInt8(ascii: "x")
            else { return -1 }
            return j + 2
        }
    }
    // s/\[\[image:[^\[\]]*\|//ig;   "[[image:" (any case) through the LAST "|" before the next
    // "[" or "]" (greedy [^\[\]]* backtracks to the last "|").
    pass { s, o in
        substitute(s, &o, first: chLB) { i in
            guard hasPrefixCI(s, i, litImage) else { return -1 }
            var j = i + 8, last = -1
            while j < s.count && s[j] != chLB && s[j] != chRB { if s[j] == chBar { last = j }; j += 1 }
            return last < 0 ? -1 : last + 1
        }
    }
    // s/\[\[category:([^|\]]*)[^]]*\]\]/[[$1]]/ig;   show categories without markup: $1 is the
    // longest run of neither "|" nor "]" after "category:"; the match needs the first "]"
    // after it to be followed by another "]".
    pass { s, o in
        var nextRB = NextIndex(chRB)
        var capture = 0..<0
        substitute(
            s, &o, first: chLB,
            { i in
                guard hasPrefixCI(s, i, litCategory) else { return -1 }
                let c0 = i + 11
                var k = c0
                while k < s.count && s[k] != chBar && s[k] != chRB { k += 1 }
                let j = nextRB.find(s, from: k)
                guard j + 1 < s.count, s[j + 1] == chRB else { return -1 }
                capture = c0..<k
                return j + 2
            },
            { _, _, o in
                o.append(chLB); o.append(chLB)
                o.append(contentsOf: UnsafeBufferPointer(rebasing: s[capture]))
                o.append(chRB); o.append(chRB)
            })
    }
    // s/\[\[[a-z\-]*:[^\]]*\]\]//g;   remove links to other languages (case-SENSITIVE: "[[de:..]]",
    // "[[:..]]"; "[[Image:..]]" stays): "[[", [a-z-]*, ":", up to the first "]", then "]]".
    pass { s, o in
        var nextRB = NextIndex(chRB)
        substitute(s, &o, first: chLB) { i in
            guard i + 1 < s.count, s[i + 1] == chLB else { return -1 }
            var k = i + 2
            while k < s.count && (isLower(s[k]) || s[k] == chMinus) { k += 1 }
            guard k < s.count, s[k] == chColon else { return -1 }
            let j = nextRB.find(s, from: k + 1)
            return j + 1 < s.count && s[j + 1] == chRB ? j + 2 : -1
        }
    }
    // s/\[\[[^\|\]]*\|/[[/g;   remove wiki url, preserve visible text: "[[target|" -> "[[".
    pass { s, o in
        var nextBarOrRB = NextIndex(chBar, chRB)
        substitute(
            s, &o, first: chLB,
            { i in
                guard i + 1 < s.count, s[i + 1] == chLB else { return -1 }
                let j = nextBarOrRB.find(s, from: i + 2)
                return j < s.count && s[j] == chBar ? j + 1 : -1
            },
            { _, _, o in
                o.append(chLB); o.append(chLB)
            })
    }
    // s/{{[^}]*}}//g;   remove {{icons}}: "{{" up to the first "}", which must be "}}".
    pass { s, o in
        var nextRC = NextIndex(chRC)
        substitute(s, &o, first: chLC) { i in
            guard i + 1 < s.count, s[i + 1] == chLC else { return -1 }
            let j = nextRC.find(s, from: i + 2)
            return j + 1 < s.count && s[j + 1] == chRC ? j + 2 : -1
        }
    }
    // s/{[^}]*}//g;   remove {tables}: "{" through the next "}" ("{| ... |}").
    pass { s, o in
        var nextRC = NextIndex(chRC)
        substitute(s, &o, first: chLC) { i in
            let j = nextRC.find(s, from: i + 1)
            return j < s.count ? j + 1 : -1
        }
    }
    // s/\[//g; s/\]//g;   remove [ and ] (two deletions of single bytes commute: one pass).
    pass { s, o in
        for c in s where c != chLB && c != chRB { o.append(c) }
    }
    // s/&[^;]*;/ /g;   remove URL encoded chars: "&" through the next ";" (across lines)
    // becomes a space.
    pass { s, o in
        var nextSemi = NextIndex(chSemi)
        substitute(
            s, &o, first: chAmp,
            { i in
                let j = nextSemi.find(s, from: i + 1)
                return j < s.count ? j + 1 : -1
            }, { _, _, o in o.append(chSpace) })
    }
    // $_=" $_ "; tr/A-Z/a-z/; s/0/ zero /g; ... s/9/ nine /g; tr/a-z/ /cs; chop; print $_;
    // Every byte outside a-z becomes a space and runs of them one space, and the spelled
    // digits are words of their own; the added leading space survives and `chop` drops the
    // trailing one. So a record prints " w1 w2 ... wk", or nothing when it has no letters.
    var inWord = false
    for c0 in a {
        let c = foldASCII(c0)
        if isLower(c) {
            if !inWord { out.append(chSpace); inWord = true }
            out.append(c)
        } else if isDigit(c) {
            out.append(chSpace)
            out.append(contentsOf: digitWords[Int(c - 0x30)])
            inWord = false
        } else {
            inWord = false
        }
    }
}

/// wikifil.pl over a whole MediaWiki XML dump: " w1 w2 ... wn" in [a-z ] with single spaces.
///
///     $/=">";                              # input record separator
///     while (<>) {
///       if (/<text /) {$text=1;}           # remove all but between <text> ... </text>
///       if (/#redirect/i) {$text=0;}       # remove #REDIRECT
///       if ($text) {
///         if (/<\/text>/) {$text=0;}
///         ... the substitutions of cleanRecord ...
///
/// The tests look at the raw record, before any substitution; a record that closes </text>
/// is still cleaned.
func wikifilText8(_ data: UnsafeBufferPointer<UInt8>) -> [UInt8] {
    var out: [UInt8] = []
    out.reserveCapacity(data.count / 2)
    var a: [UInt8] = [], b: [UInt8] = []
    var text = false
    var start = 0
    let n = data.count
    while start < n {
        // One record: up to and including the next ">" (or the rest of the file).
        var end = start
        if let base = data.baseAddress, let p = memchr(base + start, Int32(chGT), n - start) {
            end = base.distance(to: p.assumingMemoryBound(to: UInt8.self)) + 1
        } else {
            end = n
        }
        let record = UnsafeBufferPointer(rebasing: data[start..<end])
        if contains(record, litTextOpen) { text = true }
        if contains(record, litRedirect, ci: true) { text = false }
        if text {
            if contains(record, litTextClose) { text = false }
            a.removeAll(keepingCapacity: true)
            a.append(contentsOf: record)
            cleanRecord(&a, &b, into: &out)
        }
        start = end
    }
    return out
}
