import Foundation

/// Language of a scaffolded plugin.
public enum ScaffoldLanguage: String, CaseIterable, Sendable { case c, swift }

/// `vqmoe plugin new KIND NAME [--lang c|swift]`: writes a plugin folder that builds as
/// generated (`./build.sh`) and passes `vqmoe plugins check`. The folder carries its own
/// copy of the ABI header, so it builds outside this repository.
///
/// ```swift
/// let files = try Scaffold(kind: .quantizer, name: "my_vq", language: .c, headerPath: h).write(to: "my_vq")
/// ```
public struct Scaffold {
    public let kind: PluginKind
    public let name: String
    public let language: ScaffoldLanguage
    /// The ABI header to copy (Sources/VQMoEABI/include/vqmoe_plugin.h of the framework).
    public let headerPath: String

    public init(kind: PluginKind, name: String, language: ScaffoldLanguage, headerPath: String) throws {
        guard name.range(of: "^[a-z][a-z0-9_]*$", options: .regularExpression) != nil else {
            throw VQMoEError(
                .usage, "plugin name '\(name)' must be lower_snake_case (a-z, 0-9, _; starting with a letter)")
        }
        guard FileManager.default.fileExists(atPath: headerPath) else {
            throw VQMoEError(
                .io, "cannot find the ABI header at \(headerPath) (run from the vqmoe checkout, or set VQMOE_ROOT)")
        }
        self.kind = kind
        self.name = name
        self.language = language
        self.headerPath = headerPath
    }

    /// UpperCamelCase of the name ("my_vq" → "MyVq"), used for the Swift module.
    public var typeName: String {
        name.split(separator: "_").map { $0.prefix(1).uppercased() + $0.dropFirst() }.joined()
    }

    /// Library file the build leaves in the folder (what VQMOE_PLUGIN_PATH finds).
    public var libraryFile: String { "lib\(name).so" }

    /// The files to write, relative to the plugin folder.
    public func files(directory: String) throws -> [(path: String, contents: String)] {
        let header = try String(contentsOfFile: headerPath, encoding: .utf8)
        let source = ScaffoldTemplates.source(kind: kind, language: language)
            .replacingOccurrences(of: "__NAME__", with: name)
            .replacingOccurrences(of: "__TYPE__", with: typeName)
        switch language {
        case .c:
            return [
                ("\(name).c", source),
                ("vqmoe_plugin.h", header),
                (
                    "build.sh",
                    """
                    #!/bin/sh
                    # Build the \(kind.rawValue) plugin '\(name)' against the vqmoe plugin ABI header beside it.
                    set -e
                    cd "$(dirname "$0")"
                    ${CC:-cc} -O2 -std=c11 -Wall -Wextra -shared -fPIC -I. \(name).c -o \(libraryFile) -lm
                    echo "built $(pwd)/\(libraryFile)"

                    """
                ),
                ("README.md", readme(directory: directory)),
            ]
        case .swift:
            return [
                (
                    "Package.swift",
                    """
                    // swift-tools-version:6.0
                    // The vqmoe \(kind.rawValue) plugin '\(name)': one dynamic library that depends only on the ABI header.
                    import PackageDescription

                    let package = Package(
                        name: "\(typeName)",
                        products: [.library(name: "\(typeName)", type: .dynamic, targets: ["\(typeName)"])],
                        targets: [
                            .target(name: "VQMoEABI", path: "Sources/VQMoEABI"),
                            .target(name: "\(typeName)", dependencies: ["VQMoEABI"], path: "Sources/\(typeName)",
                                    swiftSettings: [.unsafeFlags(["-Ounchecked"])]),
                        ]
                    )

                    """
                ),
                ("Sources/VQMoEABI/include/vqmoe_plugin.h", header),
                (
                    "Sources/VQMoEABI/abi.c",
                    "// The ABI target is header-only; SwiftPM needs one source file.\n#include \"vqmoe_plugin.h\"\n"
                ),
                ("Sources/\(typeName)/Plugin.swift", source),
                (
                    "build.sh",
                    """
                    #!/bin/sh
                    # Build the \(kind.rawValue) plugin '\(name)' and leave \(libraryFile) in this folder.
                    set -e
                    cd "$(dirname "$0")"
                    swift build -c release
                    cp .build/release/lib\(typeName).so \(libraryFile)
                    echo "built $(pwd)/\(libraryFile)"

                    """
                ),
                ("README.md", readme(directory: directory)),
            ]
        }
    }

    private func readme(directory: String) -> String {
        let lib = URL(fileURLWithPath: directory).standardizedFileURL.appendingPathComponent(libraryFile).path
        return """
            # \(name): a vqmoe \(kind.rawValue) plugin (\(language == .c ? "C" : "Swift"))

            Generated by `vqmoe plugin new \(kind.rawValue) \(name) --lang \(language.rawValue)`. It builds as
            generated and passes `vqmoe plugins check`; edit the marked parts to make it yours.

            Build:

                ./build.sh                     # leaves \(libraryFile) here

            Check it (loads it, validates the descriptor, compares every gradient with finite differences):

                vqmoe plugins check ./\(libraryFile)

            Use it by name, either through the search path:

                export VQMOE_PLUGIN_PATH=$PWD   # every .so here is registered by its descriptor name
                vqmoe plugins inspect \(name)

            or with an entry in the framework's `registry.json`:

                {"name": "\(name)", "kind": "\(kind.rawValue)", "library": "\(lib)"}

            The ABI (ownership, threading, gradients accumulate with +=, saved contexts) is documented
            in `\(language == .c ? "vqmoe_plugin.h" : "Sources/VQMoEABI/include/vqmoe_plugin.h")`.

            """
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
        for (rel, contents) in try files(directory: directory) {
            let url = URL(fileURLWithPath: directory).appendingPathComponent(rel)
            try fm.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            try contents.write(to: url, atomically: true, encoding: .utf8)
            if rel.hasSuffix(".sh") { try fm.setAttributes([.posixPermissions: 0o755], ofItemAtPath: url.path) }
            written.append(url.path)
        }
        return written
    }
}
