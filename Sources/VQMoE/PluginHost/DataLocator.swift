import Foundation

/// Finds the real data sets: `$VQMOE_DATA`, else a `shared/data` folder beside the checkout
/// (the development setup) or under the current directory's parents.
///
/// ```swift
/// let root = DataLocator.defaultRoot()        // "/work/shared/data" here
/// ```
public enum DataLocator {
    public static func defaultRoot() -> String? {
        let env = ProcessInfo.processInfo.environment
        if let d = env["VQMOE_DATA"], !d.isEmpty { return d }
        var starts = [FileManager.default.currentDirectoryPath, Registry.executableDirectory()]
        if let reg = Registry.findRegistry(from: starts) {
            starts.insert(URL(fileURLWithPath: reg).deletingLastPathComponent().path, at: 0)
        }
        for start in starts {
            var dir = URL(fileURLWithPath: start).standardizedFileURL
            for _ in 0..<6 {
                for rel in ["shared/data", "data"] {
                    let c = dir.appendingPathComponent(rel).path
                    if FileManager.default.fileExists(atPath: c + "/README.md")
                        || FileManager.default.fileExists(atPath: c + "/enwik8-mini")
                    {
                        return c
                    }
                }
                dir = dir.deletingLastPathComponent()
            }
        }
        return nil
    }

    /// Expand `$DATA` and `$ROOT` in a path-valued hyperparameter.
    public static func expand(_ path: String, dataRoot: String, root: String) -> String {
        path.replacingOccurrences(of: "${DATA}", with: dataRoot).replacingOccurrences(of: "$DATA", with: dataRoot)
            .replacingOccurrences(of: "${ROOT}", with: root).replacingOccurrences(of: "$ROOT", with: root)
    }
}
