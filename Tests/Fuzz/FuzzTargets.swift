// libFuzzer targets for the host's readers of outside input, compiled into one binary together
// with the VQMoE module's sources (scripts/fuzz.sh): the target is chosen by VQMOE_FUZZ_TARGET.
// A target must never crash, hang or trip a sanitizer on any input; errors are fine.
//
//   config       a JSON config → RunConfig (every section's reader)
//   set          "key=value" lines → ConfigReader.parseSettings + apply onto a valid config → RunConfig
//   registry     a registry.json → Registry (entries, ffi signatures, pins, defaults)
//   safetensors  a checkpoint file → Checkpoint.read (header, offsets, checksum)
import Foundation

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
        fatalError("set VQMOE_FUZZ_TARGET to config, set, registry or safetensors")
    }
    return 0
}
