import Foundation
import VQMoE

/// `vqmoe report RUN_DIR...`.
func reportCommand(_ args: inout Args) throws -> Int32 {
    let out = try args.take("--out").last
    guard !args.rest.isEmpty else { throw VQMoEError(.usage, "usage: vqmoe report RUN_DIR... [--out DIR]") }
    let files = try Report(runs: args.rest, outDir: out ?? (args.rest.count == 1 ? args.rest[0] : "runs/report"))
        .write()
    print(files.joined(separator: "\n"))
    return 0
}

/// `vqmoe results RUN_DIR...`.
func resultsCommand(_ args: inout Args) throws -> Int32 {
    guard !args.rest.isEmpty else { throw VQMoEError(.usage, "usage: vqmoe results RUN_DIR...") }
    print(try ResultsTable.markdown(runs: args.rest))
    return 0
}

func emit(_ o: PluginCommands.Output) -> Int32 {
    print(o.text)
    return o.ok ? 0 : 1
}

/// `vqmoe plugins list|inspect|docs|check`.
func pluginsCommand(_ args: inout Args) throws -> Int32 {
    guard !args.rest.isEmpty else {
        print(commands.first { $0.name == "plugins" }!.help)
        return 64
    }
    let sub = args.rest.removeFirst()
    switch sub {
    case "list":
        let json = args.flag("--json")
        guard args.rest.isEmpty else { throw VQMoEError(.usage, "plugins list: unexpected '\(args.rest[0])'") }
        return emit(try PluginCommands.list(try args.registry(), json: json))
    case "docs":
        return emit(try PluginCommands.docs(try args.registry()))
    case "inspect":
        return emit(
            try PluginCommands.inspect(
                try args.registry(), name: try args.positional(1, usage: "plugins inspect NAME")[0]))
    case "check":
        let settings = try parseSettings(try args.take("--set"))
        let target = try args.positional(1, usage: "plugins check NAME|PATH [--set key=value ...]")[0]
        // The checks run in a child process: a plugin that crashes is a failed check, not a dead checker.
        guard ProcessInfo.processInfo.environment[checkChildVariable] != nil else { return try checkInChild() }
        let isPath = target.contains("/") || target.hasSuffix(".so")
        return emit(
            try PluginCommands.check(
                isPath ? (try? args.registry()) : try args.registry(), target: target, settings: settings))
    default:
        let known = closestFirst(sub, among: ["list", "inspect", "check", "docs"]).joined(separator: ", ")
        throw VQMoEError(.usage, "unknown command 'plugins \(sub)'; commands: \(known)")
    }
}

/// Set in the child that runs `plugins check`'s checks.
let checkChildVariable = "VQMOE_CHECK_CHILD"

/// Run this same command line in a child process and relay its output; when the child dies of
/// a signal, report the plugin call it died in (from `PluginCallGuard`'s line) as a failed check.
func checkInChild() throws -> Int32 {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/proc/self/exe")
    p.arguments = Array(CommandLine.arguments.dropFirst())
    // The parent reports a crash itself: no crash report (backtracer) in the child.
    p.environment = ProcessInfo.processInfo.environment.merging([
        checkChildVariable: "1", "SWIFT_BACKTRACE": "enable=no",
    ]) { _, new in new }
    let out = Pipe(), err = Pipe()
    (p.standardOutput, p.standardError) = (out, err)
    try p.run()
    // Read both pipes while the child runs (a full pipe would block it); once it has ended, wait
    // at most 5 s for the pipes to close (a helper it started could hold them open).
    nonisolated(unsafe) var outData = Data(), errData = Data()
    let readers = [
        Thread { outData = out.fileHandleForReading.readDataToEndOfFile() },
        Thread { errData = err.fileHandleForReading.readDataToEndOfFile() },
    ]
    readers.forEach { $0.start() }
    p.waitUntilExit()
    let deadline = Date().addingTimeInterval(5)
    while readers.contains(where: { !$0.isFinished }) && Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
    let stderrText = String(decoding: errData, as: UTF8.self)
    FileHandle.standardOutput.write(outData)
    guard p.terminationReason == .uncaughtSignal else {
        FileHandle.standardError.write(errData)
        return p.terminationStatus
    }
    let signal = p.terminationStatus
    let named = String(cString: strsignal(signal))
    if let (sig, plugin, call) = PluginCallGuard.parse(stderrText) {
        print("FAIL  crashed  with \(sig) in \(call) (\(plugin))")
    } else {
        print("FAIL  crashed  the checker's child process died of signal \(signal) (\(named)) outside any plugin call")
    }
    print("the checks stopped there: a plugin must never crash its host (fix the crash, then check again)")
    return 1
}

/// `vqmoe plugin new KIND NAME`.
func pluginNewCommand(_ args: inout Args) throws -> Int32 {
    let usage = "plugin new KIND NAME [--lang c|swift] [--dir DIR]"
    guard args.rest.first == "new" else { throw VQMoEError(.usage, "usage: vqmoe \(usage)") }
    args.rest.removeFirst()
    let lang = try args.take("--lang").last ?? "c", dir = try args.take("--dir").last
    let kindAndName = try args.positional(2, usage: usage)
    let root =
        ProcessInfo.processInfo.environment["VQMOE_ROOT"]
        ?? (try? args.registry())?.registryPath.map { URL(fileURLWithPath: $0).deletingLastPathComponent().path }
        ?? FileManager.default.currentDirectoryPath
    return emit(
        try PluginCommands.scaffold(
            kind: kindAndName[0], name: kindAndName[1], language: lang, directory: dir, root: root))
}
