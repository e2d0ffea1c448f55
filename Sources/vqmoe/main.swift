// vqmoe: the command-line front end. Thin: it parses arguments and calls the VQMoE library;
// the commands are the table in Commands.swift.
import Foundation
import VQMoE

func run() throws -> Int32 {
    PluginCallGuard.install()  // a crash inside a plugin names the plugin and the call
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
    // Launched by mpirun or srun: join the job (one process: nothing happens).
    if command.distributed { try Comm.start() }
    let status = try command.run(&args)
    Comm.world.finish()
    return status
}

/// An error ends this process; in a distributed run it ends every rank (the others would wait
/// for this one in their next collective).
func fail(_ message: String, _ code: Int32) -> Never {
    if Comm.world.isDistributed { Comm.world.abort(message, code: code) }
    FileHandle.standardError.write(Data("error: \(message)\n".utf8))
    exit(code)
}

do {
    exit(try run())
} catch let e as VQMoEError {
    fail(e.message, e.exitCode)
} catch {
    fail("\(error)", 70)
}
