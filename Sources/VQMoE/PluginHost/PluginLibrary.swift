import Foundation
import VQMoEABI

/// A plugin library opened with `dlopen` whose descriptor passed every check: same ABI
/// major, struct sizes, kind, name, function table and a consistent hyperparameter schema.
/// Libraries are never unloaded (`RTLD_NODELETE`; unmapping a Swift plugin crashes the
/// Swift runtime).
///
/// ```swift
/// let lib = try PluginLibrary.open(".build/release/libRouterSMoE.so")
/// print(lib.name, lib.kind, lib.version)   // smoe router 1.0.0
/// ```
public final class PluginLibrary: @unchecked Sendable {
    public let path: String
    public let desc: UnsafePointer<vqmoe_plugin_desc>
    public let kind: PluginKind
    public let name: String
    public let version: String
    public let summary: String
    public let abiVersion: UInt32
    public let schema: [HyperparameterSpec]

    /// For components the host implements itself (`FFIComponent`): makes an instance in place of
    /// the descriptor's `create`, from the create info and the resolved hyperparameters.
    let hostCreate: ((vqmoe_create_info, ResolvedHyperparameters) throws -> OpaquePointer)?

    nonisolated(unsafe) private static var cache: [String: PluginLibrary] = [:]
    private static let lock = NSLock()

    /// Open (or return the already opened) library at `path` and validate its descriptor.
    /// `verified`: the library's bytes, already checked against a registry pin; they are what is
    /// loaded (from a private copy), so the file cannot change between the check and `dlopen`.
    public static func open(_ path: String, verified: [UInt8]) throws -> PluginLibrary {
        try open(path, pin: SHA256.hex(of: verified)) { verified }
    }

    /// Open `path` pinned to `pin`: `bytes` (called only when the library is not open yet, so a
    /// run's many instances read and hash the file once) returns the file's bytes checked against
    /// the pin, and those bytes are what is loaded.
    public static func open(
        _ path: String, pin: String? = nil, bytes: (() throws -> [UInt8])? = nil
    ) throws -> PluginLibrary {
        let key = URL(fileURLWithPath: path).resolvingSymlinksInPath().path + (pin.map { "#" + $0 } ?? "")
        lock.lock(); defer { lock.unlock() }
        if let lib = cache[key] { return lib }
        let verified = try bytes?()
        let lib = try PluginLibrary(path: path, loadFrom: try verified.map { try privateCopy($0, of: path) })
        cache[key] = lib
        return lib
    }

    /// `bytes` written to a new file only this process knows (mode 0600, unlinked once loaded).
    private static func privateCopy(_ bytes: [UInt8], of path: String) throws -> String {
        var template = Array("\(NSTemporaryDirectory())/vqmoe-plugin-XXXXXX.so".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemps($0.baseAddress!, 3) }
        guard fd >= 0 else {
            throw VQMoEError(.io, "\(path): cannot make a private copy to load (\(String(cString: strerror(errno))))")
        }
        defer { close(fd) }
        let copy = String(cString: template)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress! + done, bytes.count - done) }
            guard n > 0 else {
                unlink(copy)
                throw VQMoEError(
                    .io, "\(path): cannot make a private copy to load (\(String(cString: strerror(errno))))")
            }
            done += n
        }
        return copy
    }

    /// A component implemented by the host behind a descriptor of its own (`desc` is never freed:
    /// libraries are never unloaded). `path` names it in messages.
    init(
        host desc: UnsafePointer<vqmoe_plugin_desc>, path: String,
        create: @escaping (vqmoe_create_info, ResolvedHyperparameters) throws -> OpaquePointer
    ) throws {
        self.path = path
        self.desc = desc
        let d = desc.pointee
        kind = PluginKind(code: d.kind)!
        name = String(cString: d.name)
        version = String(cString: d.version)
        summary = String(cString: d.description)
        abiVersion = d.abi_version
        hostCreate = create
        try PluginLibrary.checkFunctions(d, kind: kind, name: name, path: path)
        schema = try PluginLibrary.readSchema(d, plugin: "\(path) ('\(name)')")
    }

    /// `loadFrom`: a private copy of the verified bytes to dlopen instead of `path` (removed
    /// once loaded); messages name `path`.
    private convenience init(path: String, loadFrom copy: String?) throws {
        let d: UnsafePointer<vqmoe_plugin_desc>
        if let copy {
            defer { unlink(copy) }
            d = try PluginLibrary.entryDescriptor(path, loading: copy)
        } else {
            d = try PluginLibrary.entryDescriptor(path)
        }
        try self.init(path: path, descriptor: d)
    }

    /// A plugin linked into this executable rather than loaded (the fuzz harnesses link dataset
    /// plugins statically): `entry` is its `vqmoe_plugin_entry`, called with the host API, and the
    /// descriptor gets every check a loaded one gets. `path` names it in messages.
    convenience init(linked entry: vqmoe_plugin_entry_fn, path: String) throws {
        _ = HostRuntime.takeError()
        guard let d = entry(UnsafePointer(HostRuntime.api)) else {
            throw VQMoEError(.plugin, "\(path): the plugin refused this host")
        }
        try self.init(path: path, descriptor: d)
    }

    /// Check the descriptor `d` that `path`'s entry returned and keep a padded copy of it.
    private init(path: String, descriptor d: UnsafePointer<vqmoe_plugin_desc>) throws {
        self.path = path
        hostCreate = nil
        let abi = try PluginLibrary.checkVersion(d, path: path)
        let padded = PluginLibrary.paddedCopy(d)
        let desc = padded.pointee
        guard let kind = PluginKind(code: desc.kind) else {
            throw VQMoEError(
                .plugin,
                "\(path): unknown component kind \(desc.kind) (expected 1 router, 2 quantizer, 3 dataset, 4 head)")
        }
        let name = desc.name.map { String(cString: $0) } ?? ""
        guard name.range(of: "^[a-z][a-z0-9_]*$", options: .regularExpression) != nil else {
            throw VQMoEError(.plugin, "\(path): plugin name '\(name)' must be lower_snake_case (letters, digits, _)")
        }
        try PluginLibrary.checkFunctions(desc, kind: kind, name: name, path: path)
        self.desc = padded
        self.kind = kind
        self.name = name
        self.abiVersion = abi
        self.version = desc.version.map { String(cString: $0) } ?? "0.0.0"
        self.summary = desc.description.map { String(cString: $0) } ?? ""
        self.schema = try PluginLibrary.readSchema(desc, plugin: "\(path) ('\(name)')")
    }

    /// The descriptor's hyperparameter schema, each entry checked, names unique. Entries are
    /// `hparam_spec_size` bytes apart (ABI 1.2; the 1.0 size when the descriptor predates it or
    /// says 0); only the fields this host knows are read.
    private static func readSchema(_ desc: vqmoe_plugin_desc, plugin: String) throws -> [HyperparameterSpec] {
        let known = MemoryLayout<vqmoe_hparam_spec>.stride
        let covers = Int(desc.struct_size) >= MemoryLayout<vqmoe_plugin_desc>.offset(of: \.hparam_spec_size)! + 4
        let stride = covers && desc.hparam_spec_size != 0 ? Int(desc.hparam_spec_size) : known
        guard stride >= known else {
            throw VQMoEError(.plugin, "\(plugin): hparam_spec_size \(stride) is smaller than ABI 1.0's \(known)")
        }
        var specs: [HyperparameterSpec] = []
        for i in 0..<Int(max(desc.n_hparams, 0)) {
            let spec = UnsafeRawPointer(desc.hparams!).advanced(by: i * stride).loadUnaligned(
                as: vqmoe_hparam_spec.self)
            specs.append(try HyperparameterSpec(spec, plugin: plugin))
        }
        let names = specs.map(\.name)
        if let dup = names.first(where: { n in names.filter { $0 == n }.count > 1 }) {
            throw VQMoEError(.plugin, "\(plugin): hyperparameter '\(dup)' is declared twice")
        }
        return specs
    }

    /// dlopen the library, find the entry symbol and call it with the host API.
    private static func entryDescriptor(
        _ path: String, loading file: String? = nil
    ) throws -> UnsafePointer<vqmoe_plugin_desc> {
        guard FileManager.default.fileExists(atPath: path) else {
            throw VQMoEError(
                .plugin, "plugin library \(path) does not exist (build the plugins with `swift build -c release`)")
        }
        // A path without a slash would make dlopen search the library path instead of this file.
        let target = file ?? (path.contains("/") ? path : "./\(path)")
        guard let handle = dlopen(target, RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE) else {
            let why = dlerror().map { String(cString: $0) } ?? "unknown dlopen error"
            throw VQMoEError(.plugin, "cannot load plugin library \(path): dlopen failed: \(why)")
        }
        guard let sym = dlsym(handle, VQMOE_ENTRY_SYMBOL) else {
            throw VQMoEError(
                .plugin,
                "\(path) is not a vqmoe plugin: it does not export the entry symbol `\(VQMOE_ENTRY_SYMBOL)` "
                    + "(C: mark it VQMOE_EXPORT; Swift: `@_cdecl(\"\(VQMOE_ENTRY_SYMBOL)\") public func ...`)"
            )
        }
        let entry = unsafeBitCast(sym, to: vqmoe_plugin_entry_fn.self)
        _ = HostRuntime.takeError()
        guard let d = entry(UnsafePointer(HostRuntime.api)) else {
            throw VQMoEError(
                .plugin,
                "\(path): the plugin refused this host (host plugin ABI \(abiString(UInt32(VQMOE_ABI_VERSION))))"
                    + (HostRuntime.takeError().map { ": \($0)" } ?? ""))
        }
        return d
    }

    /// The descriptor, and its kind's API table, copied into host-sized zero-filled memory: a
    /// plugin built against an older 1.x has shorter structs, and the fields it lacks must read
    /// as 0 / NULL rather than past its end (structs grow only at the end). Never freed (plugins
    /// are never unloaded). The API table is padded once `checkFunctions` has checked its size.
    static func paddedCopy(_ d: UnsafePointer<vqmoe_plugin_desc>) -> UnsafePointer<vqmoe_plugin_desc> {
        func copy(_ src: UnsafeRawPointer, declared: Int, full: Int) -> UnsafeMutableRawPointer {
            let p = UnsafeMutableRawPointer.allocate(byteCount: full, alignment: 16)
            memset(p, 0, full)
            memcpy(p, src, min(declared, full))
            return p
        }
        let raw = UnsafeRawPointer(d)
        let full = MemoryLayout<vqmoe_plugin_desc>.size
        let out = copy(raw, declared: Int(raw.load(fromByteOffset: 4, as: UInt32.self)), full: full)
            .bindMemory(to: vqmoe_plugin_desc.self, capacity: 1)
        if let kind = PluginKind(code: out.pointee.kind), let api = out.pointee.kind_api {
            let declared = Int(api.load(as: UInt32.self))
            if declared >= kind.apiStructSize {
                out.pointee.kind_api = UnsafeRawPointer(copy(api, declared: declared, full: kind.apiStructSize))
            }
        }
        return UnsafePointer(out)
    }

    /// abi_version and struct_size come first in every version; nothing else is read before the
    /// major is known to match. Returns the plugin's ABI version.
    private static func checkVersion(_ d: UnsafePointer<vqmoe_plugin_desc>, path: String) throws -> UInt32 {
        let raw = UnsafeRawPointer(d)
        let abi = raw.load(as: UInt32.self)
        let size = raw.load(fromByteOffset: 4, as: UInt32.self)
        guard abi >> 16 == UInt32(VQMOE_ABI_VERSION_MAJOR) else {
            throw VQMoEError(
                .plugin,
                "\(path): built for plugin ABI \(abiString(abi)), but this host speaks ABI "
                    + "\(abiString(UInt32(VQMOE_ABI_VERSION))); rebuild the plugin against vqmoe_plugin.h "
                    + "\(VQMOE_ABI_VERSION_MAJOR).x"
            )
        }
        // ABI 1.0's descriptor ends where 1.2's hparam_spec_size begins.
        let v10 = MemoryLayout<vqmoe_plugin_desc>.offset(of: \.hparam_spec_size)!
        guard Int(size) >= v10 else {
            throw VQMoEError(.plugin, "\(path): descriptor struct_size \(size) is smaller than ABI 1.0's \(v10)")
        }
        return abi
    }

    /// The descriptor's function table and its kind's API table are complete.
    private static func checkFunctions(_ desc: vqmoe_plugin_desc, kind: PluginKind, name: String, path: String) throws {
        func need(_ ok: Bool, _ what: String) throws {
            if !ok { throw VQMoEError(.plugin, "\(path) (\(kind.rawValue) '\(name)'): descriptor is missing \(what)") }
        }
        try need(desc.create != nil, "create")
        try need(desc.destroy != nil, "destroy")
        try need(
            desc.num_buffers != nil && desc.buffer_spec != nil && desc.bind_buffers != nil && desc.init_buffers != nil,
            "one of num_buffers / buffer_spec / bind_buffers / init_buffers")
        try need(desc.kind_api != nil, "kind_api (the vqmoe_\(kind.rawValue)_api table)")
        let apiSize = Int(desc.kind_api!.load(as: UInt32.self))
        guard apiSize >= kind.apiStructSize else {
            throw VQMoEError(
                .plugin,
                "\(path) ('\(name)'): vqmoe_\(kind.rawValue)_api struct_size \(apiSize) is smaller than ABI "
                    + "1.0's \(kind.apiStructSize)"
            )
        }
        try checkKindAPI(kind, desc.kind_api!, need)
    }

    private static func checkKindAPI(
        _ kind: PluginKind, _ api: UnsafeRawPointer,
        _ need: (Bool, String) throws -> Void
    ) throws {
        switch kind {
        case .router:
            let a = api.load(as: vqmoe_router_api.self)
            try need(a.shape != nil && a.forward != nil && a.free_ctx != nil, "router shape / forward / free_ctx")
        case .quantizer:
            let a = api.load(as: vqmoe_quantizer_api.self)
            try need(
                a.shape != nil && a.forward != nil && a.backward != nil && a.free_ctx != nil,
                "quantizer shape / forward / backward / free_ctx")
        case .dataset:
            let a = api.load(as: vqmoe_dataset_api.self)
            try need(
                a.info != nil && a.num_batches != nil && a.read_batch != nil, "dataset info / num_batches / read_batch")
        case .head:
            let a = api.load(as: vqmoe_head_api.self)
            try need(
                a.shape != nil && a.forward != nil && a.backward != nil && a.free_ctx != nil,
                "head shape / forward / backward / free_ctx")
        }
    }

    /// Whether the plugin declares it has no backward (`VQMOE_PLUGIN_NO_GRAD`).
    public var hasNoGrad: Bool { desc.pointee.flags & VQMOE_PLUGIN_NO_GRAD != 0 }
    /// Whether a quantizer's loss has stop-gradient terms (`VQMOE_PLUGIN_STOPGRAD_LOSS`).
    public var hasStopGradientLoss: Bool { desc.pointee.flags & VQMOE_PLUGIN_STOPGRAD_LOSS != 0 }
    /// Whether a router reads token ids (`VQMOE_PLUGIN_NEEDS_TOKEN_IDS`).
    public var needsTokenIDs: Bool { desc.pointee.flags & VQMOE_PLUGIN_NEEDS_TOKEN_IDS != 0 }
    /// VQMOE_PLUGIN_GLOBAL_BATCH: batch statistics over every rank's rows (ABI 1.3).
    public var computesGlobalBatch: Bool { desc.pointee.flags & VQMOE_PLUGIN_GLOBAL_BATCH != 0 }

    /// An optional feature struct by string id, or nil.
    public func feature(_ id: String) -> UnsafeRawPointer? {
        guard let get = desc.pointee.get_feature else { return nil }
        return get(id)
    }
}
