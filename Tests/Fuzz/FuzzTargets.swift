// libFuzzer targets for the host's readers of outside input, compiled into one binary together
// with the VQMoE module's sources (scripts/fuzz.sh): the target is chosen by VQMOE_FUZZ_TARGET.
// A target must never crash, hang or trip a sanitizer on any input; errors are fine.
//
//   config       a JSON config → RunConfig (every section's reader)
//   set          "key=value" lines → ConfigReader.parseSettings + apply onto a valid config → RunConfig
//   registry     a registry.json → Registry (entries, ffi signatures, pins, defaults)
//   safetensors  a checkpoint file → Checkpoint.read (header, offsets, checksum)
//   char, word, csv, sst, idx, cifar
//                the dataset plugin of that name (linked in by scripts/fuzz.sh, its entry renamed
//                vqmoe_fuzz_entry_NAME) reading files cut from the input, then batches of every
//                split through the host's DatasetInstance (which checks every value handed on).
//                Input: one flags byte choosing hyperparameters, then the files' bytes separated
//                by "\n#####\n" (see `fuzzDatasets`; files the input lacks are empty).
import Foundation
import VQMoEABI

/// The valid config the `set` target edits.
let fuzzBaseConfig: [String: Any] = [
    "name": "fuzz", "seed": 1, "data": ["name": "char", "path": "/nonexistent"],
    "model": [
        "n_layer": 1, "n_head": 2, "d_model": 16, "seq_len": 16,
        "ffn": [
            "mode": "vqmoe", "d_inner": 16, "n_experts": 4, "router": ["name": "smoe"], "quantizer": ["name": "vqvae"],
        ],
    ],
    "head": ["name": "lm"], "train": ["steps": 4, "batch_size": 2],
]

/// A scratch file for the readers that take a path (in /dev/shm when there is one).
let fuzzScratch: String = {
    let dir = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory()
    return "\(dir)/vqmoe-fuzz-\(getpid())"
}()

let fuzzTarget = ProcessInfo.processInfo.environment["VQMOE_FUZZ_TARGET"] ?? ""

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ bytes: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let data = Data(bytes: bytes, count: size)
    switch fuzzTarget {
    case "config":
        if let obj = try? JSONSerialization.jsonObject(with: data) as? [String: Any] { _ = try? RunConfig(json: obj) }
    case "set":
        let lines = String(decoding: data, as: UTF8.self).split(separator: "\n").map(String.init)
        if let overrides = try? ConfigReader.parseSettings(lines) {
            var obj = fuzzBaseConfig
            if (try? ConfigReader.apply(overrides, to: &obj)) != nil { _ = try? RunConfig(json: obj) }
        }
    case "registry":
        let file = fuzzScratch + "-registry.json"
        try? data.write(to: URL(fileURLWithPath: file))
        _ = try? Registry(base: file, overlays: [], binDir: "/nonexistent", searchPath: [])
    case "safetensors":
        let file = fuzzScratch + ".safetensors"
        try? data.write(to: URL(fileURLWithPath: file))
        _ = try? Checkpoint.read(path: file)
    default:
        guard let d = fuzzDatasets[fuzzTarget] else {
            fatalError("set VQMOE_FUZZ_TARGET to config, set, registry, safetensors or a dataset: \(fuzzDatasetNames)")
        }
        fuzzDataset(d, data)
    }
    return 0
}

// MARK: - dataset plugins

/// One dataset plugin under fuzzing: the files its input is cut into, and its hyperparameters
/// for the input's flags byte and the folder holding those files.
struct FuzzDataset {
    let files: (_ flags: UInt8) -> [String]
    let values: (_ flags: UInt8, _ dir: String) -> [String: Any]
}

let fuzzDatasets: [String: FuzzDataset] = [
    "char": FuzzDataset(files: { _ in ["corpus.txt"] }) { f, dir in
        [
            "path": "\(dir)/corpus.txt", "clean": f & 1 != 0 ? "text8" : "none", "compact_vocab": f & 2 != 0,
            "order": f & 4 != 0 ? "streams" : "windows", "train_fraction": 0.8, "valid_fraction": 0.1,
        ]
    },
    "word": FuzzDataset(files: { _ in ["wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"] }) { f, dir in
        [
            "dir": f & 1 != 0 ? "" : dir, "path": "\(dir)/wiki.train.tokens", "min_count": 1 + Int(f >> 1 & 1),
            "max_vocab": f & 4 != 0 ? 5 : 0, "order": f & 8 != 0 ? "streams" : "windows",
            "train_fraction": 0.8, "valid_fraction": 0.1,
        ]
    },
    "csv": FuzzDataset(files: { f in ["train.\(f & 16 != 0 ? "tsv" : "csv")", "test.csv", "categories.json"] }) {
        f, dir in
        [
            "train_path": "\(dir)/train.\(f & 16 != 0 ? "tsv" : "csv")", "test_path": "\(dir)/test.csv",
            "categories_path": f & 1 != 0 ? "" : "\(dir)/categories.json",
            "delimiter": ["auto", "comma", "tab", "auto"][Int(f >> 1 & 3)],
            "valid_rows": f & 8 != 0 ? "tail" : "spread", "valid_fraction": 0.25,
        ]
    },
    "sst": FuzzDataset(files: { f in ["train", "dev", "test"].map { "stsa.\(f & 1 != 0 ? "fine" : "binary").\($0)" } })
    {
        f, dir in ["dir": dir, "variant": f & 1 != 0 ? "fine" : "binary"]
    },
    "idx": FuzzDataset(files: { _ in ["train-images", "train-labels", "test-images", "test-labels"] }) { f, dir in
        [
            "dir": dir, "train_images": "train-images", "train_labels": "train-labels", "test_images": "test-images",
            "test_labels": "test-labels", "normalize": f & 1 != 0, "n_classes": f & 2 != 0 ? 3 : 10,
            "valid_fraction": f & 4 != 0 ? 0.5 : 0.25,
        ]
    },
    "cifar": FuzzDataset(files: { _ in ["train.bin", "test.bin"] }) { f, dir in
        ["dir": dir, "variant": "cifar100", "label": f & 1 != 0 ? "coarse" : "fine", "valid_fraction": 0.25]
    },
]

let fuzzDatasetNames = fuzzDatasets.keys.sorted().joined(separator: ", ")

/// The plugin of the dataset target, opened once: its renamed entry symbol is looked up in this
/// executable (linked with --export-dynamic) and checked as a loaded library's would be.
let fuzzDatasetLibrary: PluginLibrary = {
    let symbol = "vqmoe_fuzz_entry_\(fuzzTarget)"
    guard let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), symbol) else {
        fatalError("\(symbol) is not linked into this binary (scripts/fuzz.sh links every dataset plugin)")
    }
    do {
        return try PluginLibrary(linked: unsafeBitCast(sym, to: vqmoe_plugin_entry_fn.self), path: "fuzz:\(fuzzTarget)")
    } catch {
        fatalError("\(error)")
    }
}()

/// Files cut from the input, then a dataset instance over them and batches of every split: the
/// first two train batches and one far on (epoch arithmetic), the first and last batch of valid
/// and test and one past the end. Errors are fine; crashes, hangs and sanitizer reports are not.
func fuzzDataset(_ d: FuzzDataset, _ data: Data) {
    guard let flags = data.first else { return }
    let dir = fuzzScratch + "-data"
    try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    let separator = Data("\n#####\n".utf8)
    var rest = data.dropFirst()
    for name in d.files(flags) {
        var part = rest
        if let r = rest.range(of: separator) {
            part = rest[rest.startIndex..<r.lowerBound]
            rest = rest[r.upperBound...]
        } else {
            rest = Data()
        }
        try? part.write(to: URL(fileURLWithPath: "\(dir)/\(name)"))
    }
    do {
        let lib = fuzzDatasetLibrary
        let hp = try ResolvedHyperparameters(schema: lib.schema, values: d.values(flags, dir), keyPath: lib.name)
        let core = try PluginInstance(
            library: lib, instanceName: "fuzz.\(lib.name)", dims: ModelDims(seqLen: 8), hyperparameters: hp, seed: 1)
        let ds = try DatasetInstance(core)
        let b = 3
        var read = 0
        for index in [0, 1, 1000] where (try? ds.read(.train, index: index, batchSize: b)) != nil { read += 1 }
        for split in [Split.valid, .test] {
            let n = try ds.numBatches(split, batchSize: b)
            for index in Set([0, n - 1, n]) where index >= 0 && (try? ds.read(split, index: index, batchSize: b)) != nil
            {
                read += 1
            }
        }
        if fuzzVerbose { print("fuzz \(fuzzTarget): splits \(ds.splitSizes), \(read) batches read") }
    } catch {
        if fuzzVerbose { print("fuzz \(fuzzTarget): \(error)") }
    }
}

/// VQMOE_FUZZ_VERBOSE=1: say what each input gave (to check that seeds reach the batch code).
let fuzzVerbose = ProcessInfo.processInfo.environment["VQMOE_FUZZ_VERBOSE"] == "1"
