// vqmoe: the command-line front end. Thin: it parses arguments and calls the VQMoE library;
// the commands are the table in Commands.swift.
import Foundation
import VQMoE

func run() throws -> Int32 {
    var args = try Args(Array(CommandLine.arguments.dropFirst()))
    HostRuntime.configure(threads: args.threads ?? 1)
    let wantsHelp = args.flag("--help") || args.flag("-h")
    guard let name = args.rest.first, name != "help" else {
        print(globalHelp())
        return 0
    }
    args.rest.removeFirst()
    guard let command = commands.first(where: { $0.name == name }) else {
        let known = closestFirst(name, among: commands.map(\.name) + ["help"]).joined(separator: ", ")
        throw VQMoEError(.usage, "unknown command '\(name)'; commands: \(known) (see vqmoe --help)")
    }
    if wantsHelp {
        print("usage:\n" + command.help)
        return 0
    }
    return try command.run(&args)
}

do {
    exit(try run())
} catch let e as VQMoEError {
    FileHandle.standardError.write(Data("error: \(e.message)\n".utf8))
    exit(e.exitCode)
} catch {
    FileHandle.standardError.write(Data("error: \(error)\n".utf8))
    exit(70)
}
