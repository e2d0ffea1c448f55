// TEMPORARY STUB (being replaced by the real templates).
enum ScaffoldTemplates {
    static func source(kind: PluginKind, language: ScaffoldLanguage) -> String { "" }
}
