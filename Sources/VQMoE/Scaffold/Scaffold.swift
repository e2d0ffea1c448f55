import Foundation

/// Language of a scaffolded plugin.
public enum ScaffoldLanguage: String, CaseIterable, Sendable { case c, swift }

/// `vqmoe plugin new KIND NAME [--lang c|swift]`: copies the template folder
/// `Plugins/templates/<lang>/<kind>/` of the vqmoe checkout, with the template's placeholder
/// name (`my_<kind>`, `My<Kind>`) replaced by NAME in file names and contents. The templates are
/// real plugins that CI builds and checks as they are, so the copy builds (`./build.sh`) and
/// passes `vqmoe plugins check`. A C copy carries the ABI headers (vqmoe_plugin.h and
/// vqmoe_plugin_helpers.h) beside its source, so it builds anywhere; a Swift copy depends on the
/// checkout's PluginKit product by path.
///
/// ```swift
/// let files = try Scaffold(kind: .quantizer, name: "my_vq", language: .c, root: "/src/vqmoe").write(to: "my_vq")
/// ```
public struct Scaffold {
    public let kind: PluginKind
    public let name: String
    public let language: ScaffoldLanguage
    /// The vqmoe checkout (templates, ABI headers, the PluginKit package).
    public let root: String

    public init(kind: PluginKind, name: String, language: ScaffoldLanguage, root: String) throws {
        guard name.range(of: "^[a-z][a-z0-9_]*$", options: .regularExpression) != nil else {
            throw VQMoEError(
                .usage, "plugin name '\(name)' must be lower_snake_case (a-z, 0-9, _; starting with a letter)")
        }
        self.kind = kind
        self.name = name
        self.language = language
        self.root = URL(fileURLWithPath: root).standardizedFileURL.path
        guard FileManager.default.fileExists(atPath: templateDirectory) else {
            throw VQMoEError(
                .io,
                "cannot find the plugin template at \(templateDirectory) (run from the vqmoe checkout, or set VQMOE_ROOT)"
            )
        }
    }

    /// The template this scaffold copies.
    public var templateDirectory: String { "\(root)/Plugins/templates/\(language.rawValue)/\(kind.rawValue)" }

    /// The template's placeholder name and its UpperCamel form ("my_head", "MyHead").
    var placeholder: (snake: String, camel: String) { ("my_\(kind.rawValue)", "My" + kind.rawValue.capitalized) }

    /// UpperCamelCase of the name ("my_vq" → "MyVq"), used for the Swift module.
    public var typeName: String {
        name.split(separator: "_").map { $0.prefix(1).uppercased() + $0.dropFirst() }.joined()
    }

    /// Library file the build leaves in the folder (what VQMOE_PLUGIN_PATH finds).
    public var libraryFile: String { "lib\(name).so" }

    /// The files to write, relative to the plugin folder: the template's sources (no build
    /// outputs) with the name replaced; for C, the ABI headers beside them.
    public func files() throws -> [(path: String, contents: String)] {
        let fm = FileManager.default
        guard let walker = fm.enumerator(atPath: templateDirectory) else {
            throw VQMoEError(.io, "cannot read the plugin template at \(templateDirectory)")
        }
        var out: [(path: String, contents: String)] = []
        while let rel = walker.nextObject() as? String {
            let top = rel.split(separator: "/").first.map(String.init) ?? rel
            if [".build", ".swiftpm", "Package.resolved"].contains(top) || rel.hasSuffix(".so") {
                walker.skipDescendants()
                continue
            }
            var isDir: ObjCBool = false
            guard fm.fileExists(atPath: "\(templateDirectory)/\(rel)", isDirectory: &isDir), !isDir.boolValue else {
                continue
            }
            let text = try String(contentsOfFile: "\(templateDirectory)/\(rel)", encoding: .utf8)
            out.append((renamed(rel), renamed(text)))
        }
        if language == .c {
            for header in ["vqmoe_plugin.h", "vqmoe_plugin_helpers.h"] {
                out.append(
                    (header, try String(contentsOfFile: "\(root)/Sources/VQMoEABI/include/\(header)", encoding: .utf8)))
            }
        }
        return out.sorted { $0.path < $1.path }
    }

    /// `text` with the placeholder name replaced, and a Swift package pointed at the checkout.
    func renamed(_ text: String) -> String {
        text.replacingOccurrences(of: placeholder.snake, with: name)
            .replacingOccurrences(of: placeholder.camel, with: typeName)
            .replacingOccurrences(of: "let vqmoe = \"../../../..\"", with: "let vqmoe = \"\(root)\"")
    }

    /// Write the folder (which must not exist yet, or be empty); returns the paths written.
    @discardableResult
    public func write(to directory: String) throws -> [String] {
        let fm = FileManager.default
        if fm.fileExists(atPath: directory), let items = try? fm.contentsOfDirectory(atPath: directory), !items.isEmpty
        {
            throw VQMoEError(.usage, "\(directory) already exists and is not empty; choose another --dir")
        }
        var written: [String] = []
        for (rel, contents) in try files() {
            let url = URL(fileURLWithPath: directory).appendingPathComponent(rel)
            try fm.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            try contents.write(to: url, atomically: true, encoding: .utf8)
            if rel.hasSuffix(".sh") { try fm.setAttributes([.posixPermissions: 0o755], ofItemAtPath: url.path) }
            written.append(url.path)
        }
        return written
    }
}
