// swift-tools-version:6.0
// The vqmoe dataset plugin 'my_dataset': one dynamic library on PluginKit, the framework's
// plugin kit (linked statically into the library; the host never shares Swift types with it).
import Foundation
import PackageDescription

/// The vqmoe checkout to build against (`vqmoe plugin new` writes its absolute path here).
let vqmoe = "../../../.."
let vqmoeRoot = URL(fileURLWithPath: vqmoe, relativeTo: URL(fileURLWithPath: Context.packageDirectory + "/"))
    .standardizedFileURL

let package = Package(
    name: "MyDataset",
    products: [.library(name: "MyDataset", type: .dynamic, targets: ["MyDataset"])],
    dependencies: [.package(path: vqmoeRoot.path)],
    targets: [
        .target(
            name: "MyDataset", dependencies: [.product(name: "PluginKit", package: vqmoeRoot.lastPathComponent)],
            path: "Sources", swiftSettings: [.unsafeFlags(["-Ounchecked"])])
    ]
)
