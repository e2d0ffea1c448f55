// swift-tools-version:6.0
// The vqmoe router plugin 'my_router': one dynamic library on PluginKit, the framework's
// plugin kit (linked statically into the library; the host never shares Swift types with it).
import Foundation
import PackageDescription

/// The vqmoe checkout to build against (`vqmoe plugin new` writes its absolute path here).
let vqmoe = "../../../.."
let vqmoeRoot = URL(fileURLWithPath: vqmoe, relativeTo: URL(fileURLWithPath: Context.packageDirectory + "/"))
    .standardizedFileURL

let package = Package(
    name: "MyRouter",
    products: [.library(name: "MyRouter", type: .dynamic, targets: ["MyRouter"])],
    dependencies: [.package(path: vqmoeRoot.path)],
    targets: [
        .target(
            name: "MyRouter", dependencies: [.product(name: "PluginKit", package: vqmoeRoot.lastPathComponent)],
            path: "Sources", swiftSettings: [.unsafeFlags(["-Ounchecked"])])
    ]
)
