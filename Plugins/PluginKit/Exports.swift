// A plugin imports PluginKit alone: the C ABI types come with it.
@_exported import VQMoEABI
