// The shape every Swift plugin takes: a class conforming to one kind protocol (RouterPlugin,
// QuantizerPlugin, HeadPlugin, DatasetPlugin), which declares its identity, hyperparameters
// and buffers as data; the kit builds the descriptor and the C function tables, checks every
// argument, keeps contexts, and turns failures into status codes.
import Glibc
import VQMoEABI

/// What the host tells a component about the model it sits in (vqmoe_create_info).
public struct ModelInfo {
    public let host: Host
    public let instanceName: String
    public let seed: UInt64
    public let dModel: Int, nExperts: Int, nCodes: Int, vocabSize: Int, nClasses: Int, seqLen: Int, totalSteps: Int
    public let dataRoot: String
    let bindingSize: UInt32

    init(_ info: UnsafePointer<vqmoe_create_info>?) throws(PluginFailure) {
        guard let info else { throw .invalid("create_info is NULL") }
        let i = info.pointee
        // ABI 1.0's create_info ends where 1.2's binding_size begins.
        guard Int(i.struct_size) >= MemoryLayout<vqmoe_create_info>.offset(of: \.binding_size)! else {
            throw .invalid("create_info: struct_size \(i.struct_size) is smaller than ABI 1.0's")
        }
        host = try Host.checked(i.host)
        instanceName = i.instance_name.map { String(cString: $0) } ?? ""
        seed = i.seed
        (dModel, nExperts, nCodes) = (Int(i.d_model), Int(i.n_experts), Int(i.n_codes))
        (vocabSize, nClasses, seqLen, totalSteps) = (
            Int(i.vocab_size), Int(i.n_classes), Int(i.seq_len), Int(i.total_steps)
        )
        dataRoot = i.data_root.map { String(cString: $0) } ?? ""
        bindingSize = vqmoe_binding_size(info)
    }
}

/// One step as a forward sees it (vqmoe_step_info).
public struct Step {
    public let step: Int, totalSteps: Int
    public let seed: UInt64
    public let flags: UInt32
    /// This rank's first token in the global batch and the global batch's tokens (ABI 1.3; from
    /// an older host: 0 and 0).
    public let tokenOffset: Int, globalTokens: Int

    init(_ s: UnsafePointer<vqmoe_step_info>?) throws(PluginFailure) {
        guard let s else { throw .invalid("step info is NULL") }
        let grown = MemoryLayout<vqmoe_step_info>.offset(of: \.token_offset)!
        guard Int(s.pointee.struct_size) >= grown else {
            throw .invalid("step info: struct_size \(s.pointee.struct_size) is smaller than ABI 1.0's \(grown)")
        }
        (step, totalSteps, seed, flags) = (
            Int(s.pointee.step), Int(s.pointee.total_steps), s.pointee.seed, s.pointee.flags
        )
        let has13 = Int(s.pointee.struct_size) >= MemoryLayout<vqmoe_step_info>.size
        (tokenOffset, globalTokens) = has13 ? (Int(s.pointee.token_offset), Int(s.pointee.global_tokens)) : (0, 0)
    }

    public var train: Bool { flags & VQMOE_STEP_TRAIN != 0 }
    public var frozen: Bool { flags & VQMOE_STEP_FROZEN != 0 }
    public var surrogate: Bool { flags & VQMOE_STEP_SURROGATE != 0 }
    /// A training forward that a backward will follow: the only kind that keeps a context.
    public var savesContext: Bool { train && flags & VQMOE_STEP_NO_GRAD == 0 }
}

/// Named scalars and vectors for logs and reports ("vqmoe.metrics/1").
public struct MetricSink {
    let sink: vqmoe_metric_sink
    public func scalar(_ name: String, _ value: Double) { sink.scalar?(sink.user, name, value) }
    public func vector(_ name: String, _ values: [Float]) {
        values.withUnsafeBufferPointer { sink.vector?(sink.user, name, $0.baseAddress, Int64($0.count)) }
    }
}

extension CodeUsage {
    /// usage_perplexity, dead_codes and code_counts.
    public func report(_ sink: MetricSink) {
        sink.scalar("usage_perplexity", perplexity)
        sink.scalar("dead_codes", Double(deadCodes))
        sink.vector("code_counts", counts)
    }
}

/// What every component declares and does, whatever its kind. Defaults: no buffers, no
/// per-step hook, no metrics.
///
/// ```swift
/// final class MyRouter: RouterPlugin {
///     static let name = "my_router", version = "1.0.0", summary = "…"
///     static let hyperparameters: [Hyper] = [.int("k", 1, min: 1, max: 64, "experts per token")]
///     init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure) { … }
///     …
/// }
/// @_cdecl("vqmoe_plugin_entry")
/// public func vqmoePluginEntry(_ host: UnsafePointer<vqmoe_host_api>?) -> UnsafePointer<vqmoe_plugin_desc>? {
///     pluginEntry(MyRouter.self, host)
/// }
/// ```
public protocol PluginComponent: AnyObject {
    static var name: String { get }
    static var version: String { get }
    static var summary: String { get }
    static var hyperparameters: [Hyper] { get }
    /// VQMOE_PLUGIN_* flags (needs token ids, no backward, stop-gradient loss).
    static var flags: UInt32 { get }
    /// Whether the component reports "vqmoe.metrics/1".
    static var reportsMetrics: Bool { get }
    init(_ model: ModelInfo, _ hp: HyperValues) throws(PluginFailure)
    /// The buffers the host allocates, in a fixed order.
    var buffers: [BufferDecl] { get }
    /// The host's memory for `buffers`, before any other call.
    func bind(_ b: BoundBuffers) throws(PluginFailure)
    /// Initial values (fresh runs; skipped on resume).
    func initBuffers(seed: UInt64) throws(PluginFailure)
    /// Called once at the start of each training step.
    func beginStep(_ step: Step) throws(PluginFailure)
    func metrics(_ sink: MetricSink) throws(PluginFailure)
}

extension PluginComponent {
    public static var flags: UInt32 { 0 }
    public static var reportsMetrics: Bool { false }
    public static var hyperparameters: [Hyper] { [] }
    public var buffers: [BufferDecl] { [] }
    public func bind(_ b: BoundBuffers) throws(PluginFailure) {}
    public func initBuffers(seed: UInt64) throws(PluginFailure) {}
    public func beginStep(_ step: Step) throws(PluginFailure) {}
    public func metrics(_ sink: MetricSink) throws(PluginFailure) {}
}

/// The object behind an opaque instance handle: the component and the facts the kit checks with.
final class Instance {
    let component: PluginComponent
    let model: ModelInfo
    /// Declared once at create (a component's buffer list must not change afterwards).
    let decls: [BufferDecl]
    /// bind_buffers succeeded (calls that use the buffers come after it).
    var bound = false
    init(_ component: PluginComponent, _ model: ModelInfo) {
        self.component = component
        self.model = model
        decls = component.buffers
    }
}

/// A context a forward saved, with what the kit checks the backward's tensors against.
final class KitContext {
    let saved: Any
    let rows: Int
    let width: Int
    let frozen: Bool
    init(_ saved: Any, rows: Int, width: Int, frozen: Bool) {
        (self.saved, self.rows, self.width, self.frozen) = (saved, rows, width, frozen)
    }
}

/// The instance behind a handle.
func instance(_ p: OpaquePointer?) -> Instance? {
    p.map { Unmanaged<Instance>.fromOpaque(UnsafeRawPointer($0)).takeUnretainedValue() }
}

/// Run a call on the instance behind `p`, turning failures into status codes. A call that
/// uses the buffers (`bound`) fails with a STATE error before bind_buffers.
func call(_ p: OpaquePointer?, bound: Bool = true, _ body: (Instance) throws(PluginFailure) -> Void) -> Int32 {
    guard let inst = instance(p) else { return VQMOE_ERR_INVALID_ARGUMENT }
    return guarded(inst.model.host.api) { () throws(PluginFailure) in
        guard !bound || inst.bound || inst.decls.isEmpty else { throw .state("called before bind_buffers") }
        try body(inst)
    }
}

/// Keep a forward's context for the host, wrapped with its sizes.
func keep(
    _ ctx: Any?, _ step: Step, rows: Int, width: Int, _ out: UnsafeMutablePointer<UnsafeMutableRawPointer?>?
) {
    guard let ctx, step.savesContext else { return }
    out?.pointee = Unmanaged.passRetained(KitContext(ctx, rows: rows, width: width, frozen: step.frozen)).toOpaque()
}

/// The context the host hands back to a backward.
func saved(_ ptr: UnsafeMutableRawPointer?) throws(PluginFailure) -> KitContext {
    guard let ptr else {
        throw .state("backward got a NULL context (a forward saves one only in train mode without NO_GRAD)")
    }
    return Unmanaged<KitContext>.fromOpaque(ptr).takeUnretainedValue()
}

func releaseContext(_ ptr: UnsafeMutableRawPointer?) {
    guard let ptr else { return }
    Unmanaged<KitContext>.fromOpaque(ptr).release()
}

/// The type this library's `create` makes (one component per library).
nonisolated(unsafe) var componentType: PluginComponent.Type?
nonisolated(unsafe) private var builtDescriptor: UnsafePointer<vqmoe_plugin_desc>?

/// The body of a plugin's one exported symbol: the descriptor of `type` (built on the first
/// call), or NULL with a log line for a host of another ABI major.
public func pluginEntry<T: PluginComponent>(
    _ type: T.Type, _ host: UnsafePointer<vqmoe_host_api>?
)
    -> UnsafePointer<vqmoe_plugin_desc>?
{
    if let host, host.pointee.abi_version >> 16 != UInt32(VQMOE_ABI_VERSION_MAJOR) {
        let msg =
            "\(T.name) was built for plugin ABI \(VQMOE_ABI_VERSION_MAJOR).\(VQMOE_ABI_VERSION_MINOR), the host speaks "
            + "\(host.pointee.abi_version >> 16).\(host.pointee.abi_version & 0xffff)"
        msg.withCString { m in T.name.withCString { n in host.pointee.log?(VQMOE_LOG_ERROR, n, m) } }
        return nil
    }
    if let d = builtDescriptor { return d }
    componentType = type
    let d = UnsafeMutablePointer<vqmoe_plugin_desc>.allocate(capacity: 1)
    d.initialize(to: descriptor(type))
    builtDescriptor = UnsafePointer(d)
    return UnsafePointer(d)
}

/// The descriptor: identity and schema from the type, the common calls, the kind's table.
private func descriptor<T: PluginComponent>(_ type: T.Type) -> vqmoe_plugin_desc {
    var d = vqmoe_plugin_desc()
    d.abi_version = UInt32(VQMOE_ABI_VERSION)
    d.struct_size = UInt32(MemoryLayout<vqmoe_plugin_desc>.size)
    d.flags = T.flags
    d.name = staticCString(T.name)
    d.version = staticCString(T.version)
    d.description = staticCString(T.summary)
    d.hparams = Hyper.cArray(T.hyperparameters)
    d.n_hparams = Int32(T.hyperparameters.count)
    d.hparam_spec_size = UInt32(MemoryLayout<vqmoe_hparam_spec>.stride)
    d.create = { info, hp, out in
        out?.pointee = nil
        return guarded(info?.pointee.host) { () throws(PluginFailure) in
            guard let out, let type = componentType else { throw .invalid("create: out is NULL") }
            let model = try ModelInfo(info)
            let component = try type.init(model, try HyperValues(hp, schema: type.hyperparameters))
            out.pointee = OpaquePointer(Unmanaged.passRetained(Instance(component, model)).toOpaque())
        }
    }
    d.destroy = { p in if let p { Unmanaged<Instance>.fromOpaque(UnsafeRawPointer(p)).release() } }
    d.num_buffers = { p in Int32(instance(p)?.decls.count ?? 0) }
    d.buffer_spec = { p, i, out in
        call(p, bound: false) { inst throws(PluginFailure) in
            guard let out else { throw .invalid("buffer_spec: out is NULL") }
            guard i >= 0 && Int(i) < inst.decls.count else {
                throw .invalid("buffer index \(i) outside [0, \(inst.decls.count))")
            }
            out.pointee = inst.decls[Int(i)].cSpec
        }
    }
    d.bind_buffers = { p, bindings, n in
        call(p, bound: false) { inst throws(PluginFailure) in
            try inst.component.bind(
                BoundBuffers(inst.decls, bindings, count: Int(n), bindingSize: inst.model.bindingSize))
            inst.bound = true
        }
    }
    d.init_buffers = { p, seed in call(p) { inst throws(PluginFailure) in try inst.component.initBuffers(seed: seed) } }
    d.begin_step = { p, s in call(p) { inst throws(PluginFailure) in try inst.component.beginStep(try Step(s)) } }
    if T.reportsMetrics || T.self is TextTokenizer.Type {
        d.get_feature = { id in
            guard let id, let type = componentType else { return nil }
            if strcmp(id, VQMOE_FEATURE_METRICS) == 0 && type.reportsMetrics { return metricsTable }
            if strcmp(id, VQMOE_FEATURE_TOKENIZER) == 0 && type is TextTokenizer.Type { return tokenizerTable }
            return nil
        }
    }
    switch type {
    case is RouterPlugin.Type:
        d.kind = VQMOE_KIND_ROUTER
        d.kind_api = T.flags & VQMOE_PLUGIN_NO_GRAD != 0 ? routerTableNoBackward : routerTable
    case is QuantizerPlugin.Type: d.kind = VQMOE_KIND_QUANTIZER; d.kind_api = quantizerTable
    case is HeadPlugin.Type: d.kind = VQMOE_KIND_HEAD; d.kind_api = headTable
    default: d.kind = VQMOE_KIND_DATASET; d.kind_api = datasetTable
    }
    return d
}

/// "vqmoe.metrics/1" of every component that reports metrics.
nonisolated(unsafe) private let metricsTable: UnsafeRawPointer = {
    let p = UnsafeMutablePointer<vqmoe_metrics_feature>.allocate(capacity: 1)
    p.initialize(
        to: vqmoe_metrics_feature(
            struct_size: UInt32(MemoryLayout<vqmoe_metrics_feature>.size),
            metrics: { inst, sink in
                call(inst) { i throws(PluginFailure) in
                    guard let sink else { throw .invalid("metrics: sink is NULL") }
                    try i.component.metrics(MetricSink(sink: sink.pointee))
                }
            }))
    return UnsafeRawPointer(p)
}()
