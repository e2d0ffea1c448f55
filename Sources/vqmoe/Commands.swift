import Foundation
import VQMoE

/// One sub-command: its usage lines, what it does, and its body. `vqmoe --help` lists the table;
/// `vqmoe COMMAND --help` prints one entry.
struct Command: Sendable {
    let name: String
    /// Usage lines without the leading `vqmoe `.
    let usage: [String]
    let summary: String
    /// Joins a distributed job when launched by mpirun/srun (train, finetune, eval, bench).
    var distributed = false
    let run: @Sendable (inout Args) throws -> Int32

    var help: String {
        (usage.map { "  \($0)" } + summary.split(separator: "\n").map { "        \($0)" }).joined(separator: "\n")
    }
}

/// Every command, in the order `--help` lists them.
let commands: [Command] = [
    Command(
        name: "train",
        usage: [
            "train CONFIG [--set key.path=value ...] [--out DIR] [--force] [--dry-run]",
            "train --resume DIR [--set key.path=value ...]",
        ],
        summary: """
            train a model from a JSON config (see configs/); writes DIR/metrics.jsonl, DIR/best.safetensors (+ .json
            sidecar) and reports test loss / bits per character with the best checkpoint; SIGINT/SIGTERM write
            DIR/last.* and stop (exit 130); --resume continues an interrupted run exactly where it stopped. DIR is
            locked while a run writes it; a DIR holding an earlier run is refused unless --resume or --force
            (which removes that run's files first). --dry-run prints the memory estimate and exits
            """, distributed: true, run: trainCommand),
    Command(
        name: "finetune",
        usage: ["finetune CONFIG [--from CHECKPOINT|RUN_DIR] [--out DIR] [--force] [--set key.path=value ...]"],
        summary: """
            fine-tune pre-trained weights on a classification task (new head, frozen parts from finetune.freeze);
            reports accuracy and the FFN FLOPs per token of the pre-training vs fine-tuning path
            """, distributed: true, run: finetuneCommand),
    Command(
        name: "eval",
        usage: [
            "eval RUN_DIR [--split train|valid|test] [--checkpoint NAME]",
            "eval RUN_DIR --text FILE [--stride S] [--batch B] [--checkpoint NAME]",
        ],
        summary: """
            evaluate a run's checkpoint (default best) on a whole split, or the bits per character of any text
            file (windows of seq_len every S tokens, default seq_len/2, each character scored once; Transformer-XL:
            segments with memory)
            """, distributed: true,
        run: evalCommand),
    Command(
        name: "sample",
        usage: [
            "sample RUN_DIR [--prompt TEXT | --prompt-file F] [--tokens N] [--temperature T] [--top-k K] [--top-p P]",
            "       [--seed S] [--batch B] [--checkpoint best|last]",
        ],
        summary: """
            generate text from a trained character-level model (streamed as drawn; KV cache; default 256
            tokens, temperature 1, no top-k/top-p; temperature 0 = greedy; the same seed gives the same text)
            """, distributed: false, run: sampleCommand),
    Command(
        name: "sweep", usage: ["sweep CONFIG [--set key.path=value ...]"],
        summary: """
            run a grid of trainings (config key "sweep": grid, seeds, parallel, out), skip finished runs, write
            results.md/.csv with mean ± std over seeds
            """, run: sweepCommand),
    Command(
        name: "report", usage: ["report RUN_DIR... [--out DIR]"],
        summary:
            "report.md and SVG plots: curves, consistency, expert load, code usage, routing movement, PCA of "
            + "expert inputs",
        run: reportCommand),
    Command(
        name: "results", usage: ["results RUN_DIR..."],
        summary: "a markdown table of finished runs (test / valid BPC, params, speed)", run: resultsCommand),
    Command(
        name: "bench",
        usage: [
            "bench CONFIG [--steps N] [--threads T] [--json] [--ffn] [--set key.path=value ...]",
            "bench CONFIG --sample [--tokens N] [--batch B] [--prompt-tokens P] [--threads T] [--json]",
        ],
        summary: """
            time the trainer's training steps: tokens/s, ms per step (forward / backward / optimizer), training
            GFLOP/s, peak RSS; --ffn: one MoE layer against a dense FFN with the same active FLOPs; --sample:
            generation with the KV cache (generated tokens/s, ms per token, prefill, peak RSS; default 256 tokens
            after a 64-token prompt, batch 1)
            """, distributed: true, run: benchCommand),
    Command(
        name: "plugins",
        usage: [
            "plugins list [--json]", "plugins inspect NAME", "plugins docs",
            "plugins check NAME|PATH [--set key=value ...]",
        ],
        summary: """
            list: every registered component (kind, name, version, abi, library); inspect: a component's description
            and hyperparameter schema; docs: markdown reference of every component (the README's plugin list);
            check: load it, validate the descriptor, run forward and backward on seeded random inputs and compare every
            gradient with finite differences (exit 1 on any failure)
            """, run: pluginsCommand),
    Command(
        name: "plugin", usage: ["plugin new KIND NAME [--lang c|swift] [--dir DIR]"],
        summary:
            "write a plugin folder (KIND: router, quantizer, dataset, head) that builds with its build.sh and "
            + "passes `plugins check`",
        run: pluginNewCommand),
]

/// `vqmoe --help`.
func globalHelp() -> String {
    var codes = [""]
    for (code, meaning) in VQMoEError.exitCodes {
        let item = "\(code) \(meaning)"
        if codes[codes.count - 1].count + item.count > 96 { codes.append("") }
        codes[codes.count - 1] += (codes[codes.count - 1].isEmpty ? "" : ", ") + item
    }
    return """
        vqmoe: sparse mixture-of-experts with discrete (vector-quantized) routing, on the CPU.

        usage: vqmoe [--registry FILE] [--threads N] COMMAND ...

        commands:
        \(commands.map(\.help).joined(separator: "\n"))

        options:
          --registry FILE   plugin registry (default: registry.json found from the current directory or the
                            executable's; env VQMOE_REGISTRY). VQMOE_PLUGIN_PATH adds directories of plugin
                            libraries, registered by their descriptor names.
          --threads N       threads for BLAS and parallel loops (default 1)
          --max-memory SIZE memory a run may use (e.g. 8G, 512M; default: the machine's available memory, or
                            the cgroup limit): train, finetune and eval refuse a run whose estimate exceeds it
          -h, --help        this text; `vqmoe COMMAND --help` for one command

        exit codes:
        \(codes.map { "  " + $0 }.joined(separator: "\n"))
        """
}
