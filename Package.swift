// swift-tools-version:6.0
// vqmoe: sparse mixture-of-experts with discrete (vector-quantized) routing, on the CPU.
//
// Layout: Sources/ is the host (C ABI header, engine, plugin host, CLI); Plugins/ holds one
// dynamic library per component, each depending ONLY on the C ABI target.
import PackageDescription

/// One component = one folder under Plugins/ = one dynamic library.
let pluginNames = [
    "QuantizerVQVAE", "QuantizerVQGANCos", "QuantizerLFQ", "QuantizerRVQ",
    "RouterSMoE", "RouterXMoE", "RouterStableMoE", "RouterSMoEDropout", "RouterSoftMoE", "RouterDense",
    "DatasetChar", "DatasetWord", "DatasetSST", "DatasetCSV", "DatasetIDX", "DatasetCIFAR",
    "HeadLM", "HeadClassifier", "HeadImageClassifier",
]

/// Plugins that also link a system C library (never a host Swift module).
let pluginSystemLibraries: [String: [Target.Dependency]] = ["DatasetIDX": ["CZlib"]]

/// Release builds keep Swift's checks (bounds, overflow, exclusivity): measured against
/// `-Ounchecked` on configs/bench (dense, SMoE, VQMoE at 1 and 2 threads, 2026-12-05) the
/// tokens/s ratio was 0.98–1.03, median 1.00 — the hot loops are BLAS and SIMD on raw buffers.
let swiftFlags: [SwiftSetting] = []

let package = Package(
    name: "vqmoe",
    products: [
        .executable(name: "vqmoe", targets: ["vqmoe"]),
        .library(name: "VQMoE", targets: ["VQMoE"]),
        // What a third-party Swift plugin depends on: the ABI header and the plugin kit, linked
        // statically into the plugin's own dynamic library (see Plugins/templates/swift).
        .library(name: "PluginKit", targets: ["PluginKit"]),
        // A plain C function called through the libffi bridge (registry "ffi" entries).
        .library(name: "FFIHashRouter", type: .dynamic, targets: ["FFIHashRouter"]),
    ] + pluginNames.map { .library(name: $0, type: .dynamic, targets: [$0]) },
    targets: [
        .target(name: "VQMoEABI", path: "Sources/VQMoEABI"),
        .systemLibrary(name: "CBLAS", path: "Sources/CBLAS"),
        .systemLibrary(name: "CFFI", path: "Sources/CFFI"),
        .systemLibrary(name: "CZlib", path: "Sources/CZlib"),
        // C kernels compiled for AVX2 + FMA and chosen at run time (Swift code is built for baseline x86-64).
        .target(name: "CKernels", path: "Sources/CKernels"),
        .target(name: "VQMoE", dependencies: ["VQMoEABI", "CBLAS", "CFFI", "CKernels"], swiftSettings: swiftFlags),
        .executableTarget(name: "vqmoe", dependencies: ["VQMoE"], swiftSettings: swiftFlags),
        .target(name: "FFIHashRouter", path: "Plugins/FFIHashRouter"),
        .testTarget(
            name: "PluginHostTests", dependencies: ["VQMoE", "VQMoEABI"], path: "Tests/PluginHostTests",
            exclude: ["Fixtures"]),
        .testTarget(
            name: "EngineTests", dependencies: ["VQMoE", "VQMoEABI"], path: "Tests/EngineTests", exclude: ["Fixtures"]),
        .testTarget(name: "PluginsTests", dependencies: ["VQMoE", "VQMoEABI"], path: "Tests/PluginsTests"),
        // Shared plumbing of the Swift plugins, linked statically into each (never into the host).
        .target(name: "PluginKit", dependencies: ["VQMoEABI"], path: "Plugins/PluginKit", swiftSettings: swiftFlags),
    ]
        + pluginNames.map {
            .target(
                name: $0, dependencies: ["VQMoEABI", "PluginKit"] + (pluginSystemLibraries[$0] ?? []),
                path: "Plugins/\($0)",
                swiftSettings: swiftFlags)
        }
)
