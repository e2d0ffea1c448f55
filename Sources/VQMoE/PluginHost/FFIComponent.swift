import Foundation
import VQMoEABI

/// A plain C function of the registry (`ffi` entries) as a component: the host wraps the
/// `FFIFunction` in a descriptor of its own with the ABI's router or quantizer function table,
/// so `RouterInstance` / `QuantizerInstance`, training, fine-tuning, evaluation, benchmarks and
/// `plugins check` all use it exactly as they use a native plugin.
///
///     router:     shape top-k (hyperparameter k, default 1); forward c = f(...) per token, experts
///                 (c + j) mod E for j < k with weight 1/k (k = 1: the function's expert, weight 1),
///                 load counted, aux 0; no backward (non-trainable, no input gradient)
///     quantizer:  shape K = the model's n_codes, L = 1; forward code = f(...) per token,
///                 quantized = x (so the straight-through gradient is exact: grad_x += grad_q),
///                 loss 0; no parameters
///
/// ```swift
/// let lib = try FFIComponent.library(name: "hash", entry: ffiEntry)      // a PluginLibrary
/// let router = try RouterInstance(PluginInstance(library: lib, instanceName: "l0.router", ...))
/// ```
enum FFIComponent {
    /// One instance: the bound function and the sizes it is called with.
    final class Instance {
        let function: FFIFunction
        let name: String
        let nExperts: Int, nCodes: Int, dModel: Int
        /// Router: experts per token.
        let k: Int
        /// Router: the function's choice per token (N).
        let choice = Storage<Int32>()
        init(function: FFIFunction, info: vqmoe_create_info, k: Int) {
            self.function = function
            name = String(cString: info.instance_name)
            nExperts = Int(info.n_experts)
            nCodes = Int(info.n_codes)
            dModel = Int(info.d_model)
            self.k = k
        }
        var describe: String { "ffi \(function.kind.rawValue) '\(function.name)' (\(name))" }
    }

    nonisolated(unsafe) private static var cache: [String: PluginLibrary] = [:]
    private static let lock = NSLock()

    /// The component for a registry `ffi` entry (one per library, symbol and signature).
    static func library(name: String, entry: FFISignatureEntry) throws -> PluginLibrary {
        let key = "\(name)|\(entry.library)|\(entry.symbol)|\(entry.signatureText)"
        lock.lock()
        defer { lock.unlock() }
        if let lib = cache[key] { return lib }
        let function = try FFIFunction(name: name, entry: entry)
        let desc = descriptor(name: name, function: function)
        let lib = try PluginLibrary(host: desc, path: "\(entry.library):\(entry.symbol)") { info, hp in
            if function.kind == .quantizer && info.n_codes < 1 {
                throw VQMoEError(.config, "ffi quantizer '\(name)' needs the model's n_codes (K) >= 1")
            }
            let k = hp.values["k"] as? Int ?? 1
            if function.kind == .router && k > info.n_experts {
                throw VQMoEError(.config, "ffi router '\(name)': k = \(k) exceeds the \(info.n_experts) experts")
            }
            return OpaquePointer(Unmanaged.passRetained(Instance(function: function, info: info, k: k)).toOpaque())
        }
        cache[key] = lib
        return lib
    }

    /// A static descriptor (never freed: libraries are never unloaded).
    private static func descriptor(name: String, function: FFIFunction) -> UnsafePointer<vqmoe_plugin_desc> {
        let kindAPI: UnsafeRawPointer
        if function.kind == .router {
            let api = UnsafeMutablePointer<vqmoe_router_api>.allocate(capacity: 1)
            api.initialize(
                to: vqmoe_router_api(
                    struct_size: UInt32(MemoryLayout<vqmoe_router_api>.size), shape: routerShape,
                    forward: routerForward,
                    backward: nil, free_ctx: { _, _ in }))
            kindAPI = UnsafeRawPointer(api)
        } else {
            let api = UnsafeMutablePointer<vqmoe_quantizer_api>.allocate(capacity: 1)
            api.initialize(
                to: vqmoe_quantizer_api(
                    struct_size: UInt32(MemoryLayout<vqmoe_quantizer_api>.size), shape: quantizerShape,
                    forward: quantizerForward, backward: quantizerBackward, free_ctx: { _, ctx in free(ctx) }))
            kindAPI = UnsafeRawPointer(api)
        }
        let d = UnsafeMutablePointer<vqmoe_plugin_desc>.allocate(capacity: 1)
        let kindCode = function.kind == .router ? VQMOE_KIND_ROUTER : VQMOE_KIND_QUANTIZER
        let flags =
            (function.needsTokenIDs ? VQMOE_PLUGIN_NEEDS_TOKEN_IDS : 0)
            | (function.kind == .router ? VQMOE_PLUGIN_NO_GRAD : 0)
        let what =
            function.kind == .router
            ? "top-1, weight 1, not trainable" : "one code per token, quantized = x, not trainable"
        d.initialize(
            to: vqmoe_plugin_desc(
                abi_version: UInt32(VQMOE_ABI_VERSION), struct_size: UInt32(MemoryLayout<vqmoe_plugin_desc>.size),
                kind: Int32(kindCode), flags: UInt32(flags), name: UnsafePointer(strdup(name)),
                version: UnsafePointer(strdup("ffi")),
                description: UnsafePointer(
                    strdup(
                        "C function \(function.entry.symbol) through libffi: \(function.entry.signatureText); \(what)")),
                hparams: function.kind == .router ? routerSchema : nil, n_hparams: function.kind == .router ? 1 : 0,
                create: { _, _, _ in VQMOE_ERR_UNSUPPORTED },  // the host makes instances itself
                destroy: { inst in if let inst { Unmanaged<Instance>.fromOpaque(UnsafeRawPointer(inst)).release() } },
                num_buffers: { _ in 0 }, buffer_spec: { _, _, _ in VQMOE_ERR_INVALID_ARGUMENT },
                bind_buffers: { _, _, n in n == 0 ? VQMOE_OK : VQMOE_ERR_INVALID_ARGUMENT },
                init_buffers: { _, _ in VQMOE_OK },
                begin_step: nil, get_feature: nil, kind_api: kindAPI,
                hparam_spec_size: UInt32(MemoryLayout<vqmoe_hparam_spec>.stride)))
        return UnsafePointer(d)
    }

    /// The routers' one hyperparameter.
    nonisolated(unsafe) private static let routerSchema: UnsafePointer<vqmoe_hparam_spec> = {
        let spec = UnsafeMutablePointer<vqmoe_hparam_spec>.allocate(capacity: 1)
        spec.initialize(
            to: vqmoe_hparam_spec(
                name: UnsafePointer(strdup("k")), type: VQMOE_HP_INT, flags: VQMOE_HP_HAS_MIN | VQMOE_HP_HAS_MAX,
                description: UnsafePointer(
                    strdup(
                        "experts per token: the function's expert c and the next k-1, (c + j) mod E, each with weight 1/k "
                            + "(k = 1: c alone, weight 1; more matches a top-k router's active compute)")),
                default_number: 1, default_string: nil, min_value: 1, max_value: 64, choices: nil))
        return UnsafePointer(spec)
    }()

    private static func instance(_ p: OpaquePointer?) -> Instance {
        Unmanaged<Instance>.fromOpaque(UnsafeRawPointer(p!)).takeUnretainedValue()
    }

    /// Run `body`, turning a thrown error into a status with its message set for the host.
    private static func guarded(_ body: () throws -> Void) -> Int32 {
        do { try body() } catch {
            HostRuntime.setError("\(error)")
            return VQMOE_ERR_INVALID_ARGUMENT
        }
        return VQMOE_OK
    }

    // MARK: router

    private static let routerShape:
        @convention(c) (OpaquePointer?, UnsafePointer<vqmoe_step_info>?, UnsafeMutablePointer<vqmoe_router_shape>?) ->
            Int32 = { inst, _, out in
                out?.pointee.mode = Int32(VQMOE_ROUTE_TOPK)
                out?.pointee.k = Int32(FFIComponent.instance(inst).k)
                return VQMOE_OK
            }

    private static let routerForward:
        @convention(c) (
            OpaquePointer?, UnsafePointer<vqmoe_step_info>?, UnsafePointer<vqmoe_router_input>?,
            UnsafeMutablePointer<vqmoe_router_output>?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?
        ) -> Int32 = { inst, step, input, out, ctx in
            ctx?.pointee = nil
            guard let input, let out, let step else { return VQMOE_ERR_INVALID_ARGUMENT }
            let me = FFIComponent.instance(inst), x = input.pointee.x, ids = input.pointee.token_ids
            let n = Int(x.shape![0]), e = me.nExperts, k = me.k
            let expert = out.pointee.expert_index.data!.assumingMemoryBound(to: Int32.self)
            let weights = out.pointee.weights.data!.assumingMemoryBound(to: Float.self)
            let load = out.pointee.expert_load.data!.assumingMemoryBound(to: Float.self)
            let choice = me.choice.reserve(n)
            return FFIComponent.guarded {
                try me.function.call(
                    x: x.data.map { UnsafePointer($0.assumingMemoryBound(to: Float.self)) },
                    tokenIDs: ids.data.map { UnsafePointer($0.assumingMemoryBound(to: Int32.self)) }, n: n,
                    d: me.dModel,
                    nExperts: e, nCodes: 0, seed: step.pointee.seed, output: choice)
                load.update(repeating: 0, count: e)
                for t in 0..<n {
                    for j in 0..<k {
                        let ex = (Int(choice[t]) + j) % e
                        expert[t * k + j] = Int32(ex)
                        weights[t * k + j] = 1 / Float(k)
                        load[ex] += 1
                    }
                }
                out.pointee.aux_loss = 0
            }
        }

    // MARK: quantizer

    private static let quantizerShape:
        @convention(c) (OpaquePointer?, UnsafeMutablePointer<vqmoe_quantizer_shape>?) -> Int32 = { inst, out in
            out?.pointee.codebook_size = Int64(FFIComponent.instance(inst).nCodes)
            out?.pointee.codes_per_token = 1
            return VQMOE_OK
        }

    private static let quantizerForward:
        @convention(c) (
            OpaquePointer?, UnsafePointer<vqmoe_step_info>?, UnsafePointer<vqmoe_quantizer_input>?,
            UnsafeMutablePointer<vqmoe_quantizer_output>?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?
        ) -> Int32 = { inst, step, input, out, ctx in
            ctx?.pointee = nil
            guard let input, let out, let step, let ctx else { return VQMOE_ERR_INVALID_ARGUMENT }
            let me = FFIComponent.instance(inst), x = input.pointee.x.data!.assumingMemoryBound(to: Float.self)
            let n = Int(input.pointee.x.shape![0]), d = me.dModel, k = me.nCodes
            let codes = out.pointee.codes.data!.assumingMemoryBound(to: Int32.self)
            let counts = out.pointee.code_counts.data!.assumingMemoryBound(to: Float.self)
            let status = FFIComponent.guarded {
                try me.function.call(
                    x: UnsafePointer(x), tokenIDs: nil, n: n, d: d, nExperts: 0, nCodes: k, seed: step.pointee.seed,
                    output: codes)
            }
            guard status == VQMOE_OK else { return status }
            out.pointee.quantized.data!.assumingMemoryBound(to: Float.self).update(from: x, count: n * d)
            counts.update(repeating: 0, count: k)
            for i in 0..<n { counts[Int(codes[i])] += 1 }
            out.pointee.loss = 0
            let flags = step.pointee.flags
            if flags & VQMOE_STEP_TRAIN != 0 && flags & VQMOE_STEP_NO_GRAD == 0 {
                ctx.pointee = malloc(8)  // nothing to keep: the backward is the identity
            }
            return VQMOE_OK
        }

    /// quantized = x: grad_x += grad_quantized.
    private static let quantizerBackward:
        @convention(c) (
            OpaquePointer?, UnsafeMutableRawPointer?, UnsafePointer<vqmoe_quantizer_grad_in>?,
            UnsafeMutablePointer<vqmoe_quantizer_grad_out>?
        ) -> Int32 = { inst, _, gin, gout in
            guard let gin, let gout else { return VQMOE_ERR_INVALID_ARGUMENT }
            guard let gq = gin.pointee.grad_quantized.data?.assumingMemoryBound(to: Float.self) else { return VQMOE_OK }
            let gx = gout.pointee.grad_x
            let count = (0..<Int(gx.ndim)).reduce(1) { $0 * Int(gx.shape![$1]) }
            Vec.add(gx.data!.assumingMemoryBound(to: Float.self), gq, count)
            return VQMOE_OK
        }
}
