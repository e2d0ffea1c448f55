import Foundation
import VQMoEABI

/// Model facts handed to a component at creation (`vqmoe_create_info`).
///
/// ```swift
/// let dims = ModelDims(dModel: 256, nExperts: 16, nCodes: 16)
/// ```
public struct ModelDims: Sendable, Equatable {
    public var dModel = 0, nExperts = 0, nCodes = 0, vocabSize = 0, nClasses = 0, seqLen = 0, totalSteps = 0
    public var dataRoot = ""
    public init(
        dModel: Int = 0, nExperts: Int = 0, nCodes: Int = 0, vocabSize: Int = 0, nClasses: Int = 0,
        seqLen: Int = 0, totalSteps: Int = 0, dataRoot: String = ""
    ) {
        self.dModel = dModel; self.nExperts = nExperts; self.nCodes = nCodes; self.vocabSize = vocabSize
        self.nClasses = nClasses; self.seqLen = seqLen; self.totalSteps = totalSteps; self.dataRoot = dataRoot
    }

    /// Set one dimension by its create_info name (d_model, n_experts, n_codes, vocab_size,
    /// n_classes, seq_len, total_steps) from a config value.
    public mutating func set(_ key: String, _ value: Any) throws {
        let paths: [String: WritableKeyPath<ModelDims, Int>] = [
            "d_model": \.dModel, "n_experts": \.nExperts, "n_codes": \.nCodes, "vocab_size": \.vocabSize,
            "n_classes": \.nClasses, "seq_len": \.seqLen, "total_steps": \.totalSteps,
        ]
        guard let path = paths[key] else {
            throw VQMoEError(
                .usage,
                "model.\(key): unknown model dimension; dimensions: \(paths.keys.sorted().joined(separator: ", "))")
        }
        guard let v = (value as? Int) ?? (value as? Double).flatMap({ $0 == $0.rounded() ? Int($0) : nil }), v >= 1
        else { throw VQMoEError(.usage, "model.\(key) = \(value): must be an integer >= 1") }
        self[keyPath: path] = v
    }
}

/// Per-call step facts (`vqmoe_step_info`).
///
/// ```swift
/// let s = StepInfo(step: 10, totalSteps: 1000, train: true, seed: 7)
/// ```
public struct StepInfo: Sendable, Equatable {
    public var step: Int
    public var totalSteps: Int
    public var flags: UInt32
    public var seed: UInt64
    /// This rank's first token in the global batch and the global batch's tokens (a forward in one
    /// process: 0 and N; 0 and 0 where there is no batch, as in begin_step).
    public var tokenOffset = 0, globalTokens = 0

    public init(
        step: Int, totalSteps: Int, train: Bool, noGrad: Bool = false, frozen: Bool = false,
        surrogate: Bool = false, seed: UInt64
    ) {
        self.step = step; self.totalSteps = totalSteps; self.seed = seed
        flags =
            (train ? VQMOE_STEP_TRAIN : 0) | (noGrad ? VQMOE_STEP_NO_GRAD : 0)
            | (frozen ? VQMOE_STEP_FROZEN : 0) | (surrogate ? VQMOE_STEP_SURROGATE : 0)
    }

    var c: vqmoe_step_info {
        vqmoe_step_info(
            struct_size: UInt32(MemoryLayout<vqmoe_step_info>.size), flags: flags,
            step: Int64(step), total_steps: Int64(totalSteps), seed: seed, token_offset: Int64(tokenOffset),
            global_tokens: Int64(globalTokens))
    }
    var savesContext: Bool { flags & VQMOE_STEP_TRAIN != 0 && flags & VQMOE_STEP_NO_GRAD == 0 }

    /// VQMOE_STEP_FROZEN: the component's parameters and state must not change (fine-tuning).
    public var frozen: Bool {
        get { flags & VQMOE_STEP_FROZEN != 0 }
        set { flags = newValue ? flags | VQMOE_STEP_FROZEN : flags & ~VQMOE_STEP_FROZEN }
    }
}

/// A buffer a plugin declared and the host owns: parameters (with a gradient) and state.
///
/// ```swift
/// for b in instance.buffers where b.isParameter { print(b.name, b.shape) }
/// ```
public final class HostBuffer: @unchecked Sendable {
    public let name: String
    public let isParameter: Bool
    public let flags: UInt32
    public let dtype: vqmoe_dtype
    public let shape: [Int]
    public let count: Int
    public let byteCount: Int
    public let data: UnsafeMutableRawPointer
    public let grad: UnsafeMutablePointer<Float>?

    init(spec: vqmoe_buffer_spec, owner: String) throws {
        name = spec.name.map { String(cString: $0) } ?? ""
        guard !name.isEmpty else { throw VQMoEError(.plugin, "\(owner): a declared buffer has no name") }
        guard spec.role == VQMOE_BUF_PARAM || spec.role == VQMOE_BUF_STATE else {
            throw VQMoEError(.plugin, "\(owner): buffer '\(name)' has unknown role \(spec.role)")
        }
        isParameter = spec.role == VQMOE_BUF_PARAM
        flags = spec.flags
        dtype = spec.dtype
        guard spec.ndim >= 0 && spec.ndim <= VQMOE_MAX_DIMS else {
            throw VQMoEError(.plugin, "\(owner): buffer '\(name)' has ndim \(spec.ndim)")
        }
        shape = withUnsafeBytes(of: spec.shape) { raw in
            (0..<Int(spec.ndim)).map { Int(raw.load(fromByteOffset: $0 * 8, as: Int64.self)) }
        }
        guard shape.allSatisfy({ $0 >= 0 }) else {
            throw VQMoEError(.plugin, "\(owner): buffer '\(name)' has a negative dimension \(shape)")
        }
        let elementBytes = Int(dtype.bits) / 8 * Int(max(dtype.lanes, 1))
        guard elementBytes > 0, !isParameter || (dtype.code == UInt8(VQMOE_DTYPE_FLOAT) && dtype.bits == 32) else {
            throw VQMoEError(.plugin, "\(owner): parameter '\(name)' must be float32")
        }
        (count, byteCount) = try MemoryBudget.checkedSize(
            shape, elementBytes: elementBytes, copies: isParameter ? 2 : 1, what: "\(owner): buffer '\(name)'")
        guard let d = HostRuntime.alignedAlloc(byteCount) else {
            throw VQMoEError(.plugin, "\(owner): buffer '\(name)' of \(byteCount) bytes: allocation failed")
        }
        memset(d, 0, max(byteCount, 1))
        data = d
        if isParameter {
            guard let raw = HostRuntime.alignedAlloc(byteCount) else {
                free(d)
                throw VQMoEError(
                    .plugin, "\(owner): the gradient of buffer '\(name)' (\(byteCount) bytes): allocation failed")
            }
            let g = raw.bindMemory(to: Float.self, capacity: count)
            g.initialize(repeating: 0, count: count)
            grad = g
        } else {
            grad = nil
        }
    }

    deinit {
        free(data)
        if let grad { free(grad) }
    }

    /// The data as float32 (parameters, float state).
    public var floats: UnsafeMutablePointer<Float> { data.bindMemory(to: Float.self, capacity: count) }
    public func zeroGrad() { grad?.update(repeating: 0, count: count) }
}

/// An instance of a plugin: created through the descriptor, its buffers allocated by the host
/// and bound, its calls wrapped so that every failure becomes a `VQMoEError` naming the
/// plugin, the instance and the call. The kind wrappers (`RouterInstance`, …) build on it.
///
/// ```swift
/// let inst = try PluginInstance(library: lib, instanceName: "layers.0.router",
///                               dims: ModelDims(dModel: 64, nExperts: 8), hyperparameters: hp, seed: 1)
/// ```
public final class PluginInstance: @unchecked Sendable {
    public let library: PluginLibrary
    public let instanceName: String
    public let hyperparameters: ResolvedHyperparameters
    public let dims: ModelDims
    public private(set) var buffers: [HostBuffer] = []
    let handle: OpaquePointer

    public init(
        library: PluginLibrary, instanceName: String, dims: ModelDims,
        hyperparameters: ResolvedHyperparameters, seed: UInt64, initialize: Bool = true
    ) throws {
        self.library = library
        self.instanceName = instanceName
        let root =
            Registry.findRegistry(from: [FileManager.default.currentDirectoryPath, Registry.executableDirectory()])
            .map { URL(fileURLWithPath: $0).deletingLastPathComponent().path }
            ?? FileManager.default.currentDirectoryPath
        let hyperparameters = hyperparameters.expandingPaths(
            schema: library.schema, dataRoot: dims.dataRoot, root: root)
        self.hyperparameters = hyperparameters
        self.dims = dims
        let d = library.desc.pointee
        var out: OpaquePointer?
        let status: Int32 = instanceName.withCString { namePtr in
            dims.dataRoot.withCString { rootPtr in
                var info = vqmoe_create_info(
                    abi_version: UInt32(VQMOE_ABI_VERSION), struct_size: UInt32(MemoryLayout<vqmoe_create_info>.size),
                    host: UnsafePointer(HostRuntime.api), instance_name: namePtr, seed: seed,
                    d_model: Int64(dims.dModel), n_experts: Int64(dims.nExperts), n_codes: Int64(dims.nCodes),
                    vocab_size: Int64(dims.vocabSize), n_classes: Int64(dims.nClasses), seq_len: Int64(dims.seqLen),
                    total_steps: Int64(dims.totalSteps), data_root: rootPtr,
                    binding_size: UInt32(MemoryLayout<vqmoe_buffer_binding>.stride))
                _ = HostRuntime.takeError()
                if let make = library.hostCreate {
                    do { out = try make(info, hyperparameters) } catch {
                        HostRuntime.setError("\(error)")
                        return VQMOE_ERR_INVALID_ARGUMENT
                    }
                    return VQMOE_OK
                }
                PluginCallGuard.enter("\(library.kind.rawValue) '\(library.name)' (\(instanceName))", call: "create")
                let s = hyperparameters.withC { hp in d.create!(&info, hp, &out) }
                PluginCallGuard.leave()
                HostRuntime.releaseScratch()
                return s
            }
        }
        guard status == VQMOE_OK, let h = out else {
            let msg = HostRuntime.takeError() ?? "no message"
            if let h = out { d.destroy?(h) }
            throw VQMoEError(
                .plugin,
                "\(library.kind.rawValue) '\(library.name)' (\(instanceName)) failed in create: "
                    + "\(statusName(status)): \(msg)"
            )
        }
        handle = h
        // Declared buffers, allocated and zeroed by the host, then bound.
        let n = Int(d.num_buffers!(h))
        guard n >= 0 && n < 100_000 else { throw VQMoEError(.plugin, "\(describe) declares \(n) buffers") }
        var bindings: [vqmoe_buffer_binding] = []
        for i in 0..<n {
            var spec = vqmoe_buffer_spec()
            spec.struct_size = UInt32(MemoryLayout<vqmoe_buffer_spec>.size)
            try call("buffer_spec(\(i))") { d.buffer_spec!(h, Int32(i), &spec) }
            let b = try HostBuffer(spec: spec, owner: describe)
            if buffers.contains(where: { $0.name == b.name }) {
                throw VQMoEError(.plugin, "\(describe): buffer '\(b.name)' declared twice")
            }
            buffers.append(b)
            bindings.append(vqmoe_buffer_binding(data: b.data, grad: b.grad))
        }
        try call("bind_buffers") { d.bind_buffers!(h, bindings, Int32(n)) }
        if initialize { try initBuffers(seed: seed) }
    }

    deinit { library.desc.pointee.destroy?(handle) }

    /// "router 'smoe' (layers.0.router)".
    public var describe: String { "\(library.kind.rawValue) '\(library.name)' (\(instanceName))" }

    /// Fill the buffers with the plugin's initial values (fresh runs).
    public func initBuffers(seed: UInt64) throws {
        try call("init_buffers") { library.desc.pointee.init_buffers!(handle, seed) }
    }

    /// The per-step hook (no-op when the plugin has none).
    public func beginStep(_ step: StepInfo) throws {
        guard let f = library.desc.pointee.begin_step else { return }
        var s = step.c
        try call("begin_step") { f(handle, &s) }
    }

    public var parameters: [HostBuffer] { buffers.filter(\.isParameter) }
    public var states: [HostBuffer] { buffers.filter { !$0.isParameter } }
    public func buffer(_ name: String) -> HostBuffer? { buffers.first { $0.name == name } }
    public func zeroGrads() { buffers.forEach { $0.zeroGrad() } }

    /// Run one plugin call: clear the error slot, call, free scratch, turn a bad status into
    /// an error naming the plugin, the instance and the call.
    func call(_ what: String, _ body: () -> Int32) throws {
        _ = HostRuntime.takeError()
        PluginCallGuard.enter(describe, call: what)
        let status = body()
        PluginCallGuard.leave()
        HostRuntime.releaseScratch()
        if status != VQMOE_OK {
            let msg = HostRuntime.takeError() ?? "no message"
            throw VQMoEError(
                status == VQMOE_ERR_NUMERIC ? .numeric : .plugin,
                "\(describe) failed in \(what): \(statusName(status)): \(msg)")
        }
    }

    /// Throw when any of `count` floats is NaN or ±Inf.
    func checkFinite(_ p: UnsafePointer<Float>?, _ count: Int, _ what: String) throws {
        guard let p, !VecMath.allFinite(p, count: count) else { return }
        let i = (0..<count).first { !p[$0].isFinite }!
        throw VQMoEError(.numeric, "\(describe) produced a non-finite \(what) (element \(i) = \(p[i]))")
    }

    /// Whether every given buffer (pointer, count) is finite: taken before a backward call, so a
    /// non-finite gradient afterwards is this plugin's own (not one handed to it).
    static func finite(_ buffers: [(UnsafePointer<Float>?, Int)]) -> Bool {
        buffers.allSatisfy { p, n in p.map { VecMath.allFinite($0, count: n) } ?? true }
    }

    /// After backward: the input gradient (`count` floats) and every parameter gradient are
    /// finite, else the error names this plugin, its layer and the call (when what came in was
    /// finite; otherwise the host's gradient-norm check reports the step).
    func checkBackward(gradX: UnsafePointer<Float>, count: Int, inputsWereFinite: Bool) throws {
        guard inputsWereFinite else { return }
        try checkFinite(gradX, count, "input gradient in backward")
        for b in buffers where b.isParameter {
            try checkFinite(b.grad, b.count, "gradient of its parameter '\(b.name)' in backward")
        }
    }

    /// Named scalars and vectors from the optional "vqmoe.metrics/1" feature (empty if none).
    public func metrics() throws -> [String: [Double]] {
        guard let raw = library.feature(VQMOE_FEATURE_METRICS) else { return [:] }
        let f = raw.load(as: vqmoe_metrics_feature.self)
        guard let fn = f.metrics else { return [:] }
        final class Box { var out: [String: [Double]] = [:] }
        let box = Box()
        var sink = vqmoe_metric_sink(
            user: Unmanaged.passUnretained(box).toOpaque(),
            scalar: { user, name, value in
                Unmanaged<Box>.fromOpaque(user!).takeUnretainedValue().out[String(cString: name!)] = [value]
            },
            vector: { user, name, values, n in
                Unmanaged<Box>.fromOpaque(user!).takeUnretainedValue().out[String(cString: name!)] =
                    (0..<Int(n)).map { Double(values![$0]) }
            })
        try call("metrics") { fn(handle, &sink) }
        return box.out
    }
}

/// A forward's saved context; released with the plugin's `free_ctx` exactly once, when the
/// host drops it (after backward, or unused).
public final class PluginContext: @unchecked Sendable {
    let pointer: UnsafeMutableRawPointer
    let release: (UnsafeMutableRawPointer) -> Void
    init(_ p: UnsafeMutableRawPointer, release: @escaping (UnsafeMutableRawPointer) -> Void) {
        pointer = p
        self.release = release
    }
    deinit { release(pointer) }
}

/// Small shape arrays for tensor views, freed together when the arena goes away.
final class TensorArena {
    private var shapes: [UnsafeMutablePointer<Int64>] = []
    deinit { shapes.forEach { $0.deallocate() } }

    func tensor(_ data: UnsafeRawPointer?, _ dtype: vqmoe_dtype, _ shape: [Int]) -> vqmoe_tensor {
        let s = UnsafeMutablePointer<Int64>.allocate(capacity: max(shape.count, 1))
        for (i, v) in shape.enumerated() { s[i] = Int64(v) }
        shapes.append(s)
        return vqmoe_tensor(
            data: UnsafeMutableRawPointer(mutating: data),
            device: vqmoe_device(device_type: VQMOE_DEVICE_CPU, device_id: 0),
            ndim: Int32(shape.count), dtype: dtype, shape: UnsafePointer(s), strides: nil, byte_offset: 0)
    }
    func f32(_ p: UnsafePointer<Float>?, _ shape: [Int]) -> vqmoe_tensor { tensor(p, vqmoe_f32(), shape) }
    func i32(_ p: UnsafePointer<Int32>?, _ shape: [Int]) -> vqmoe_tensor { tensor(p, vqmoe_i32(), shape) }
    static var absent: vqmoe_tensor { vqmoe_tensor() }
}

func structSize<T>(_: T.Type) -> UInt32 { UInt32(MemoryLayout<T>.size) }
