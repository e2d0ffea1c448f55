// vqmoe: the command-line front end. Thin: it parses arguments and calls the VQMoE library.
import Foundation
import VQMoE

let usage = """
vqmoe: sparse mixture-of-experts with discrete (vector-quantized) routing, on the CPU.

usage: vqmoe [--registry FILE] [--threads N] COMMAND ...

commands:
  train CONFIG [--set key.path=value ...] [--out DIR]
                                   train a model from a JSON config (see configs/); writes
                                   DIR/metrics.jsonl, DIR/best.safetensors (+ .json sidecar) and
                                   reports test loss / bits per character with the best checkpoint;
                                   SIGINT/SIGTERM write DIR/last.* and stop
  train --resume DIR               continue an interrupted run exactly where it stopped
  finetune CONFIG [--from CHECKPOINT|RUN_DIR] [--out DIR] [--set key.path=value ...]
                                   fine-tune pre-trained weights on a classification task (new head,
                                   frozen parts from finetune.freeze); reports accuracy and the FFN
                                   FLOPs per token of the pre-training vs fine-tuning path
  eval RUN_DIR [--split valid|test] [--checkpoint NAME]
                                   evaluate a run's checkpoint (default best) on a whole split
  sweep CONFIG [--set key.path=value ...]
                                   run a grid of trainings (config key "sweep": grid, seeds,
                                   parallel, out), skip finished runs, write results.md/.csv
                                   with mean ± std over seeds
  report RUN_DIR... [--out DIR]    report.md and SVG plots: curves, consistency, expert load, code
                                   usage, routing movement, PCA of expert inputs
  results RUN_DIR...               a markdown table of finished runs (test / valid BPC, params, speed)
  bench CONFIG [--steps N] [--threads T] [--json] [--ffn] [--set key.path=value ...]
                                   time training steps: tokens/s, ms per step (forward / backward /
                                   optimizer), training GFLOP/s, peak RSS; --ffn: one MoE layer
                                   against a dense FFN with the same active FLOPs
  plugins list [--json]            every registered component: kind, name, version, abi, library
  plugins inspect NAME             a component's description and hyperparameter schema
  plugins docs                     markdown reference of every component (the README's plugin list)
  plugins check NAME|PATH [--set key=value ...]
                                   load it, validate the descriptor, run forward and backward on
                                   seeded random inputs and compare every gradient with finite
                                   differences; exit 1 on any failure
  plugin new KIND NAME [--lang c|swift] [--dir DIR]
                                   write a plugin folder (KIND: router, quantizer, dataset, head)
                                   that builds with its build.sh and passes `plugins check`

options:
  --registry FILE   plugin registry (default: registry.json found from the current directory or
                    the executable's; env VQMOE_REGISTRY). VQMOE_PLUGIN_PATH adds directories of
                    plugin libraries, registered by their descriptor names.
  --threads N       threads for BLAS and parallel loops (default 1)
  -h, --help        this text; `vqmoe COMMAND --help` for a command

exit codes: 0 ok, 1 a check failed, 64 usage, 65 config, 66 data, 67 plugin/registry, 70 internal
"""

struct Args {
    var rest: [String]
    var registryPath: String?
    var threads: Int?

    init(_ argv: [String]) throws {
        var out: [String] = []
        var i = 0
        while i < argv.count {
            let a = argv[i]
            if a == "--registry" || a == "--threads" {
                guard i + 1 < argv.count else { throw VQMoEError(.usage, "\(a) needs a value") }
                if a == "--registry" { registryPath = argv[i + 1] } else {
                    guard let n = Int(argv[i + 1]), n >= 1 else { throw VQMoEError(.usage, "--threads: expected a positive integer, got '\(argv[i + 1])'") }
                    threads = n
                }
                i += 2
                continue
            }
            out.append(a)
            i += 1
        }
        rest = out
    }

    /// Remove `--flag VALUE` pairs (repeatable) and return the values.
    mutating func take(_ flag: String) throws -> [String] {
        var values: [String] = []
        var i = 0
        while i < rest.count {
            if rest[i] == flag {
                guard i + 1 < rest.count else { throw VQMoEError(.usage, "\(flag) needs a value") }
                values.append(rest[i + 1])
                rest.removeSubrange(i...(i + 1))
            } else { i += 1 }
        }
        return values
    }

    mutating func flag(_ name: String) -> Bool {
        guard let i = rest.firstIndex(of: name) else { return false }
        rest.remove(at: i)
        return true
    }
}

/// `key=value` settings; values parse as JSON when they can (numbers, true/false), else strings.
func parseSettings(_ items: [String]) throws -> [String: Any] {
    var out: [String: Any] = [:]
    for item in items {
        guard let eq = item.firstIndex(of: "=") else { throw VQMoEError(.usage, "--set \(item): expected key=value") }
        let key = String(item[..<eq]), raw = String(item[item.index(after: eq)...])
        if let data = raw.data(using: .utf8), let v = try? JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed]),
           !(v is [Any]), !(v is [String: Any]) {
            out[key] = v
        } else {
            out[key] = raw
        }
    }
    return out
}

func trainSummary(_ cfg: RunConfig, _ r: TrainResult) -> String {
    if r.interrupted { return "run \(cfg.name) stopped after \(r.steps) steps; resume with: vqmoe train --resume \(r.outDir)" }
    var lines = ["run \(cfg.name): \(r.steps) steps in \(String(format: "%.1f", r.wallSeconds)) s (\(String(format: "%.0f", r.tokensPerSecond)) tokens/s), output in \(r.outDir)"]
    if let v = r.bestValid {
        lines.append(r.isLM ? String(format: "best valid  loss %.4f  bpc %.4f  (step %d)", v.loss, v.bpc, r.bestStep + 1)
                            : String(format: "best valid  loss %.4f  accuracy %.4f  (step %d)", v.loss, v.accuracy, r.bestStep + 1))
    }
    if let t = r.test {
        lines.append(r.isLM ? String(format: "test        loss %.4f  bpc %.4f  (best-validation checkpoint)", t.loss, t.bpc)
                            : String(format: "test        loss %.4f  accuracy %.4f  (best-validation checkpoint)", t.loss, t.accuracy))
    }
    return lines.joined(separator: "\n")
}

func emit(_ o: PluginCommands.Output) -> Int32 {
    print(o.text)
    return o.ok ? 0 : 1
}

func run() throws -> Int32 {
    var args = try Args(Array(CommandLine.arguments.dropFirst()))
    HostRuntime.configure(threads: args.threads ?? 1)
    let wantsHelp = args.flag("--help") || args.flag("-h")
    guard let command = args.rest.first, command != "help" else {
        print(usage)
        return 0
    }
    args.rest.removeFirst()
    func registry() throws -> Registry { try Registry.load(registryPath: args.registryPath) }
    switch command {
    case "train":
        if wantsHelp { print(usage.components(separatedBy: "\n").filter { $0.contains("train") || $0.hasPrefix("                                   ") }.joined(separator: "\n")); return 0 }
        var overrides = try parseSettings(try args.take("--set"))
        if let t = args.threads { overrides["train.threads"] = t }
        let out = try args.take("--out").last
        let resume = try args.take("--resume").last
        let usageText = "usage: vqmoe train CONFIG [--set key.path=value ...] [--out DIR]  |  vqmoe train --resume DIR"
        let cfg: RunConfig, dir: String
        if let resume {
            guard args.rest.isEmpty, out == nil else { throw VQMoEError(.usage, usageText) }
            cfg = try RunConfig(json: try ConfigReader.load(file: "\(resume)/config.json", overrides: overrides))
            dir = resume
        } else {
            guard args.rest.count == 1 else { throw VQMoEError(.usage, usageText) }
            cfg = try RunConfig(json: try ConfigReader.load(file: args.rest[0], overrides: overrides))
            dir = out ?? "runs/\(cfg.name)"
        }
        let trainer = try Trainer(config: cfg, registry: try registry(), outDir: dir)
        Trainer.installInterruptHandlers()
        let r = try trainer.run(resume: resume != nil)
        print(trainSummary(cfg, r))
        return r.interrupted ? 130 : 0
    case "finetune":
        var overrides = try parseSettings(try args.take("--set"))
        if let t = args.threads { overrides["train.threads"] = t }
        let out = try args.take("--out").last, from = try args.take("--from").last
        guard args.rest.count == 1 else { throw VQMoEError(.usage, "usage: vqmoe finetune CONFIG [--from CHECKPOINT|RUN_DIR] [--out DIR] [--set key.path=value ...]") }
        let cfg = try RunConfig(json: try ConfigReader.load(file: args.rest[0], overrides: overrides))
        let ft = try Finetune(config: cfg, registry: try registry(), outDir: out ?? "runs/\(cfg.name)", from: from)
        Trainer.installInterruptHandlers()
        let r = try ft.run()
        print("fine-tuned \(cfg.name) from \(ft.checkpoint): \(r.trainable) trainable parameters, \(r.frozen) frozen")
        if let v = r.result.bestValid { print(String(format: "best valid  accuracy %.4f  loss %.4f  (step %d)", v.accuracy, v.loss, r.result.bestStep + 1)) }
        if let t = r.result.test { print(String(format: "test        accuracy %.4f  loss %.4f", t.accuracy, t.loss)) }
        print(r.flops.text)
        return r.result.interrupted ? 130 : 0
    case "eval":
        let split = try args.take("--split").last ?? "test"
        let name = try args.take("--checkpoint").last ?? "best"
        guard args.rest.count == 1, let sp = Split.allCases.first(where: { $0.name == split }) else {
            throw VQMoEError(.usage, "usage: vqmoe eval RUN_DIR [--split train|valid|test] [--checkpoint NAME]")
        }
        let dir = args.rest[0]
        var overrides: [String: Any] = [:]
        if let t = args.threads { overrides["train.threads"] = t }
        let cfg = try RunConfig(json: try ConfigReader.load(file: "\(dir)/config.json", overrides: overrides))
        let trainer = try Trainer(config: cfg, registry: try registry(), outDir: dir, quiet: true)
        let path = "\(dir)/\(name).safetensors"
        try trainer.model.load(try Checkpoint.read(path: path), path: path)
        let r = try trainer.evaluate(sp)
        print(String(format: "%@ %@: loss %.4f  bpc %.4f  accuracy %.4f  (%d targets, checkpoint %@)", cfg.name, split, r.loss, r.bpc, r.accuracy, r.count, path))
        return 0
    case "sweep":
        let overrides = try parseSettings(try args.take("--set"))
        guard args.rest.count == 1 else { throw VQMoEError(.usage, "usage: vqmoe sweep CONFIG [--set key.path=value ...]") }
        let sweep = try Sweep(configFile: args.rest[0], overrides: overrides, registry: try registry())
        let exe = URL(fileURLWithPath: Registry.executableDirectory()).appendingPathComponent("vqmoe").path
        let table = try sweep.execute(executable: exe, registry: args.registryPath) { print($0); fflush(nil) }
        print(table)
        return 0
    case "report":
        let out = try args.take("--out").last
        guard !args.rest.isEmpty else { throw VQMoEError(.usage, "usage: vqmoe report RUN_DIR... [--out DIR]") }
        let files = try Report(runs: args.rest, outDir: out ?? (args.rest.count == 1 ? args.rest[0] : "runs/report")).write()
        print(files.joined(separator: "\n"))
        return 0
    case "results":
        guard !args.rest.isEmpty else { throw VQMoEError(.usage, "usage: vqmoe results RUN_DIR...") }
        print(try ResultsTable.markdown(runs: args.rest))
        return 0
    case "bench":
        if wantsHelp { print("usage: vqmoe bench CONFIG [--steps N] [--threads T] [--json] [--set key.path=value ...]"); return 0 }
        var overrides = try parseSettings(try args.take("--set"))
        if let t = args.threads { overrides["train.threads"] = t }
        let steps = try args.take("--steps").last.map { s -> Int in
            guard let n = Int(s), n >= 2 else { throw VQMoEError(.usage, "--steps: expected an integer >= 2, got '\(s)'") }
            return n
        } ?? 15
        let json = args.flag("--json"), ffnOnly = args.flag("--ffn")
        guard args.rest.count == 1 else { throw VQMoEError(.usage, "usage: vqmoe bench CONFIG [--steps N] [--threads T] [--json] [--ffn]") }
        let cfg = try RunConfig(json: try ConfigReader.load(file: args.rest[0], overrides: overrides))
        if ffnOnly {
            let r = try FFNBench(config: cfg, registry: try registry(), steps: steps).run()
            if json {
                print(String(decoding: try JSONSerialization.data(withJSONObject: r.json, options: [.sortedKeys]), as: UTF8.self))
            } else {
                print(String(format: "%@ FFN layer (%@), %d tokens: %.2f ms forward+backward; dense FFN with the same active FLOPs (d_inner %d): %.2f ms; ratio %.3f",
                             cfg.name, cfg.model.ffn.mode.rawValue, r.tokens, r.moeMs, r.denseInner, r.denseMs, r.ratio))
            }
            return 0
        }
        let r = try Bench(config: cfg, registry: try registry(), steps: steps).run()
        if json {
            let data = try JSONSerialization.data(withJSONObject: r.json, options: [.sortedKeys])
            print(String(decoding: data, as: UTF8.self))
        } else {
            print(String(format: "%@: %.0f tokens/s, %.1f ms/step (forward %.1f, backward %.1f, optimizer %.1f, data %.1f), %.1f GFLOP/s, peak RSS %.0f MB, %d threads",
                         cfg.name, r.tokensPerSecond, r.msPerStep, r.msForward, r.msBackward, r.msOptimizer, r.msData, r.gflops, r.peakRSSMB, r.threads))
        }
        return 0
    case "plugins":
        let sub = args.rest.first ?? ""
        if wantsHelp || sub.isEmpty {
            print(usage.components(separatedBy: "\n").filter { $0.contains("plugins") || $0.hasPrefix("    ") }.joined(separator: "\n"))
            return sub.isEmpty && !wantsHelp ? 64 : 0
        }
        args.rest.removeFirst()
        switch sub {
        case "list":
            let json = args.flag("--json")
            guard args.rest.isEmpty else { throw VQMoEError(.usage, "plugins list: unexpected '\(args.rest[0])'") }
            return emit(try PluginCommands.list(try registry(), json: json))
        case "docs":
            return emit(try PluginCommands.docs(try registry()))
        case "inspect":
            guard args.rest.count == 1 else { throw VQMoEError(.usage, "usage: vqmoe plugins inspect NAME") }
            return emit(try PluginCommands.inspect(try registry(), name: args.rest[0]))
        case "check":
            let settings = try parseSettings(try args.take("--set"))
            guard args.rest.count == 1 else { throw VQMoEError(.usage, "usage: vqmoe plugins check NAME|PATH [--set key=value ...]") }
            let target = args.rest[0]
            let isPath = target.contains("/") || target.hasSuffix(".so")
            return emit(try PluginCommands.check(isPath ? (try? registry()) : try registry(), target: target, settings: settings))
        default:
            throw VQMoEError(.usage, "unknown command 'plugins \(sub)'; commands: \(closestFirst(sub, among: ["list", "inspect", "check", "docs"]).joined(separator: ", "))")
        }
    case "plugin":
        guard args.rest.first == "new" else {
            throw VQMoEError(.usage, "usage: vqmoe plugin new KIND NAME [--lang c|swift] [--dir DIR]")
        }
        args.rest.removeFirst()
        if wantsHelp { print("usage: vqmoe plugin new KIND NAME [--lang c|swift] [--dir DIR]"); return 0 }
        let lang = try args.take("--lang").last ?? "c"
        let dir = try args.take("--dir").last
        guard args.rest.count == 2 else { throw VQMoEError(.usage, "usage: vqmoe plugin new KIND NAME [--lang c|swift] [--dir DIR]") }
        let root = ProcessInfo.processInfo.environment["VQMOE_ROOT"]
            ?? (try? registry())?.registryPath.map { URL(fileURLWithPath: $0).deletingLastPathComponent().path }
            ?? FileManager.default.currentDirectoryPath
        return emit(try PluginCommands.scaffold(kind: args.rest[0], name: args.rest[1], language: lang, directory: dir, root: root))
    default:
        let commands = ["train", "finetune", "eval", "sweep", "report", "results", "bench", "plugins", "plugin", "help"]
        throw VQMoEError(.usage, "unknown command '\(command)'; commands: \(closestFirst(command, among: commands).joined(separator: ", ")) (see vqmoe --help)")
    }
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
