import Foundation
import VQMoE
import VQMoEABI
import XCTest

/// `char` with clean = "text8" (the port of Matt Mahoney's wikifil.pl) and compact_vocab.
/// The expected strings are what the original Perl script prints for the same XML (checked
/// when these tests were written; every rule of the script has a case here).
extension DatasetCharTests {
    /// A page of a MediaWiki dump whose <text> holds `body` (already XML-escaped, as dumps are).
    func page(_ body: String, title: String = "T") -> String {
        "  <page>\n    <title>\(title)</title>\n    <ns>0</ns>\n    <revision>\n      <comment>edit comment</comment>\n"
            + "      <text xml:space=\"preserve\">\(body)</text>\n    </revision>\n  </page>\n"
    }

    func dump(_ pages: String...) -> String {
        "<mediawiki xml:lang=\"en\">\n  <siteinfo>\n    <sitename>Wikipedia</sitename>\n  </siteinfo>\n"
            + pages.joined() + "</mediawiki>\n"
    }

    /// The whole token stream of the (cleaned) file: its length from a first instance with all
    /// of it in train, then one train window of seq_len n - 1, whose only legal start is 0.
    func cleanedTokens(_ path: String, hp: [String: Any] = ["clean": "text8"]) throws -> [Int32] {
        var values = hp
        values["train_fraction"] = 1.0
        values["valid_fraction"] = 0.0
        let n = try openDataset(path: path, seqLen: 1, hp: values).splitSizes[0]
        let ds = try openDataset(path: path, seqLen: n - 1, hp: values)
        XCTAssertEqual(ds.splitSizes, [n, 0, 0])
        let b = try XCTUnwrap(ds.read(.train, index: 0, batchSize: 1))
        return b.inputsInt + [b.targets[n - 2]]
    }

    /// clean=text8 applied to `xml`, as a string.
    func cleaned(_ xml: String, name: String = "dump.xml") throws -> String {
        let path = try writeFixture(Array(xml.utf8), name: name)
        return String(decoding: try cleanedTokens(path).map { UInt8($0) }, as: UTF8.self)
    }

    // MARK: the rules of wikifil.pl

    func testText8KeepsOnlyTheTextElement() throws {
        // Title, comment, siteinfo: not inside <text ...> ... </text>, so dropped.
        XCTAssertEqual(try cleaned(dump(page("Hello World", title: "Title Words"))), " hello world")
        // Pages concatenate with single spaces; the result starts with one space, never ends in one.
        XCTAssertEqual(try cleaned(dump(page("First page."), page("Second page!"))), " first page second page")
    }

    func testText8SkipsRedirectPages() throws {
        let xml = dump(
            page("#REDIRECT [[Anarchism]] {{R from CamelCase}}"), page("Kept text"),
            page("#redirect [[x]]"), page("Also kept"))
        XCTAssertEqual(try cleaned(xml), " kept text also kept")
    }

    func testText8RemovesReferencesAndTags() throws {
        // <ref>...</ref> with its content; a self-closing <ref .../> as a plain tag.
        XCTAssertEqual(
            try cleaned(
                dump(page("Fact&lt;ref&gt;Smith 2001, p. 5&lt;/ref&gt; more&lt;ref name=&quot;a&quot; /&gt; end"))),
            " fact more end")
        // XHTML tags vanish without a space ("a<br />b" -> "ab"); "< y >" is a tag too.
        XCTAssertEqual(
            try cleaned(dump(page("a&lt;br /&gt;b &lt;small&gt;c&lt;/small&gt; x &lt; y &gt; z"))), " ab c x z")
    }

    func testText8DecodesThenDropsEntities() throws {
        // &amp; -> & once ("&amp;amp;" -> "&amp;"), then "&...;" -> " " up to the next ";":
        // "&T is;" goes too, as in the script.
        XCTAssertEqual(
            try cleaned(dump(page("Tom &amp;amp; Jerry. AT&amp;T is; here &quot;Quoted&quot; &amp;nbsp;done"))),
            " tom jerry at here quoted done")
    }

    func testText8RemovesTemplatesAndTables() throws {
        // {{...}} up to the first "}}" (so a nested template leaves its tail), {| tables |}.
        let body =
            "A {{cite web|url=x}} B {{outer {{inner}} tail}} C\n{| class=&quot;wikitable&quot;\n|-\n| cell one || cell two\n|} D"
        XCTAssertEqual(try cleaned(dump(page(body))), " a b tail c d")
    }

    func testText8KeepsLinkText() throws {
        // [[target|text]] -> text, [[link]] -> link; only the first "target|" of [[a|b|c]] goes.
        XCTAssertEqual(
            try cleaned(dump(page("[[Link target|shown text]] and [[Plain link]] [[a|b|c]]"))),
            " shown text and plain link b c")
    }

    func testText8ImageLinksKeepTheirCaption() throws {
        // |thumb |left |right |NNNpx (any case) go, then "[[Image:...|" up to the last "|";
        // "|Thumbnail" loses its "|Thumb" as in the script.
        let body =
            "[[Image:Foo.jpg|thumb|left|250px|A caption here]] [[image:bar.png|RIGHT|Other [[caption link|words]]]] |Thumbnail |12PX"
        XCTAssertEqual(try cleaned(dump(page(body))), " a caption here other words nail")
    }

    func testText8CategoriesShowTheirName() throws {
        // The script keeps a category's name (drops the sort key): [[Category:A|k]] -> A.
        XCTAssertEqual(
            try cleaned(dump(page("End.\n[[Category:Political philosophy|Sort key]]\n[[category:Lower case]]"))),
            " end political philosophy lower case")
    }

    func testText8RemovesInterlanguageLinks() throws {
        // [[xx:...]], [[xx-yy:...]] and [[:...]] (lowercase prefixes) go; [[File:x|caption]] keeps
        // its caption like any link.
        let body = "Text [[de:Anarchismus]] [[simple:Foo bar]] [[fr-ca:x]] [[:Category:Y]] [[File:X.png|file caption]]"
        XCTAssertEqual(try cleaned(dump(page(body))), " text file caption")
    }

    func testText8RemovesURLsKeepingTheirText() throws {
        // [http:... text] -> text, [http:...] -> nothing; https and bare URLs are only split.
        let body = "[http://www.example.com Example site] [http://x.org] [https://secure.org Secure] http://bare.org"
        XCTAssertEqual(try cleaned(dump(page(body))), " example site https secure org secure http bare org")
    }

    func testText8LowercasesSpellsDigitsAndSqueezes() throws {
        XCTAssertEqual(
            try cleaned(dump(page("In 1984, ABC's 2nd   edition\n\ncost $3.50"))),
            " in one nine eight four abc s two nd edition cost three five zero")
        // Non-ASCII bytes are "other characters" (the script works on bytes).
        XCTAssertEqual(try cleaned(dump(page("Café—naïve… x_y"))), " caf na ve x y")
    }

    // MARK: vocabulary and splits

    func testText8KeepsByteVocabularyUnlessCompact() throws {
        let xml = dump(page("Ab z. " + String(repeating: "Zebra quick ", count: 20)))
        let path = try writeFixture(Array(xml.utf8), name: "vocab.xml")
        let text = Array((" ab z" + String(repeating: " zebra quick", count: 20)).utf8)
        let bytes = try openDataset(path: path, seqLen: 8, hp: ["clean": "text8"])
        XCTAssertEqual(bytes.vocabSize, 256)
        // Splits 90/5/5 of the cleaned text.
        let n = text.count
        XCTAssertEqual(bytes.splitSizes, [n * 9 / 10, n * 95 / 100 - n * 9 / 10, n - n * 95 / 100])
        XCTAssertEqual(try cleanedTokens(path), text.map { Int32($0) })
        // compact_vocab: space -> 0, a..z -> 1..26.
        let compact = try openDataset(path: path, seqLen: 8, hp: ["clean": "text8", "compact_vocab": true])
        XCTAssertEqual(compact.vocabSize, 27)
        let ids = try cleanedTokens(path, hp: ["clean": "text8", "compact_vocab": true])
        XCTAssertEqual(Array(ids.prefix(5)), [0, 1, 2, 0, 26])
        XCTAssertEqual(ids, text.map { $0 == 32 ? 0 : Int32($0) - 96 })
        // The valid split's first window: the cleaned text right after the train split.
        let v = try XCTUnwrap(compact.read(.valid, index: 0, batchSize: 1))
        XCTAssertEqual(Array(v.inputsInt[0..<8]), Array(ids[(n * 9 / 10)..<(n * 9 / 10 + 8)]))
    }

    func testCompactVocabOnPlainText8File() throws {
        // text8 itself (already clean) with clean=none.
        let text = " anarchism originated as a term of abuse first used against early working class radicals"
        let path = try writeFixture(Array(text.utf8), name: "text8")
        let ds = try openDataset(path: path, seqLen: 8, hp: ["compact_vocab": true])
        XCTAssertEqual(ds.vocabSize, 27)
        XCTAssertEqual(
            try cleanedTokens(path, hp: ["compact_vocab": true]), text.utf8.map { $0 == 32 ? 0 : Int32($0) - 96 })
    }

    // MARK: errors

    func testText8Errors() throws {
        // compact_vocab on text with other bytes: names the file and the byte.
        let raw = try writeFixture(Array("abc Def ghi jkl mno pqr stu".utf8), name: "raw.txt")
        var msg = errorMessage { _ = try openDataset(path: raw, seqLen: 4, hp: ["compact_vocab": true]) }
        XCTAssertTrue(
            msg.contains(raw) && msg.contains("byte 4") && msg.contains("0x44") && msg.contains("clean=text8"), msg)
        // clean=text8 on something that is not a dump: nothing is left.
        msg = errorMessage { _ = try openDataset(path: raw, seqLen: 4, hp: ["clean": "text8"]) }
        XCTAssertTrue(msg.contains(raw) && msg.contains("left no text") && msg.contains("<text"), msg)
        // A dump of redirects only: also empty.
        let redirects = try writeFixture(Array(dump(page("#REDIRECT [[A]]")).utf8), name: "redirects.xml")
        msg = errorMessage { _ = try openDataset(path: redirects, seqLen: 4, hp: ["clean": "text8"]) }
        XCTAssertTrue(msg.contains("left no text"), msg)
        // Too short after cleaning: the sizes say so.
        let tiny = try writeFixture(Array(dump(page("Hi there")).utf8), name: "tiny.xml")
        msg = errorMessage { _ = try openDataset(path: tiny, seqLen: 32, hp: ["clean": "text8"]) }
        XCTAssertTrue(msg.contains("train split has 8 bytes") && msg.contains("after clean=text8"), msg)
        // An unknown cleaning mode: the schema's choices.
        msg = errorMessage { _ = try openDataset(path: raw, seqLen: 4, hp: ["clean": "wiki"]) }
        XCTAssertTrue(msg.contains("wiki") && msg.contains("none") && msg.contains("text8"), msg)
    }

    func testCleanSchemaEntries() throws {
        let lib = try openPlugin("DatasetChar")
        let clean = try XCTUnwrap(lib.schema.first { $0.name == "clean" })
        XCTAssertEqual(clean.choices, ["none", "text8"])
        XCTAssertEqual(clean.defaultString, "none")
        let compact = try XCTUnwrap(lib.schema.first { $0.name == "compact_vocab" })
        XCTAssertEqual(compact.type, .bool)
        XCTAssertEqual(compact.defaultNumber, 0)
    }

    // MARK: real data

    func testRealEnwik8MiniCleansToText8() throws {
        guard let dir = sharedDataDirectory() else { throw XCTSkip("../shared/data not present") }
        let path = dir + "/enwik8-mini/enwik8-mini"
        guard FileManager.default.fileExists(atPath: path) else { throw XCTSkip("\(path) not present") }
        let n = 3_085_829  // what wikifil.pl prints for this file, byte for byte
        let ds = try openDataset(path: path, seqLen: 128, hp: ["clean": "text8"])
        XCTAssertEqual(ds.vocabSize, 256)
        XCTAssertEqual(ds.splitSizes, [2_777_246, 154_291, 154_292])  // 90/5/5 of the cleaned text
        let ids = try cleanedTokens(path)
        XCTAssertEqual(ids.count, n)
        XCTAssertTrue(ids.allSatisfy { $0 == 32 || ($0 >= 97 && $0 <= 122) }, "only a-z and space")
        XCTAssertFalse(zip(ids, ids.dropFirst()).contains { $0 == 32 && $1 == 32 }, "no double spaces")
        XCTAssertEqual(ids.last.map { $0 != 32 }, true)
        let text = String(decoding: ids.map { UInt8($0) }, as: UTF8.self)
        // The first article of enwik8 is "Anarchism" (the redirect before it is skipped).
        XCTAssertTrue(
            text.hasPrefix(" anarchism is a political philosophy that advocates self gove"), String(text.prefix(80)))
        XCTAssertEqual(text.split(separator: " ").count, 512_934)
        // compact_vocab: the same text in 27 symbols.
        let compact = try openDataset(path: path, seqLen: 128, hp: ["clean": "text8", "compact_vocab": true])
        XCTAssertEqual(compact.vocabSize, 27)
        let v = try XCTUnwrap(compact.read(.valid, index: 0, batchSize: 1))
        XCTAssertEqual(Array(v.inputsInt[0..<40]), ids[2_777_246..<(2_777_246 + 40)].map { $0 == 32 ? 0 : $0 - 96 })
        XCTAssertEqual(
            String(decoding: ids[2_777_246..<(2_777_246 + 40)].map { UInt8($0) }, as: UTF8.self),
            "rganization and centralization of japane")
    }
}

/// The generic plugin check with clean=text8, and with compact_vocab.
final class DatasetCharText8CheckerTests: XCTestCase {
    func testPluginCheckerPassesWithText8AndCompactVocab() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "vqmoe-char8-check-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let url = dir.appendingPathComponent("dump.xml")
        let body = String(repeating: "To be, or not to be: [[Hamlet|that]] is the {{question}} 1603. ", count: 30)
        try Data(
            ("<mediawiki><page><revision><text xml:space=\"preserve\">" + body + "</text></revision></page></mediawiki>")
                .utf8
        ).write(to: url)
        for hp: [String: Any] in [
            ["path": url.path, "clean": "text8"], ["path": url.path, "clean": "text8", "compact_vocab": true],
        ] {
            let results = PluginChecker(library: try openPlugin("DatasetChar"), hyperparameters: hp).run()
            XCTAssertTrue(results.allSatisfy(\.passed), results.map(\.description).joined(separator: "\n"))
            XCTAssertGreaterThanOrEqual(results.count, 10)
        }
    }
}
