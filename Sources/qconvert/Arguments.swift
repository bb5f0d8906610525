import ArgumentParser
import Foundation
import QConvertKit

// Command-line values are parsed once, here, into the library's types; `--help` lists the choices of
// every enumerated option.

extension ContentHash: ExpressibleByArgument {}
extension Preset: ExpressibleByArgument {}
extension OnnxForm: ExpressibleByArgument {}
extension OutputLayout: ExpressibleByArgument {}

/// An output format, by the name of a registered writer.
struct FormatName: ExpressibleByArgument {
    var name: String

    init?(argument: String) {
        guard FormatRegistry.writers.contains(where: { $0.name == argument }) else { return nil }
        name = argument
    }

    static var allValueStrings: [String] { FormatRegistry.writers.map(\.name) }
}

/// `--shard I/N`: share I (0-based) of N.
struct ShardSpec {
    var index = 0
    var count = 1

    static func parse(_ s: String) throws -> ShardSpec {
        let parts = s.split(separator: "/", omittingEmptySubsequences: false).map { Int($0) }
        guard parts.count == 2, let i = parts[0], let n = parts[1], n >= 1, i >= 0, i < n else {
            throw ValidationError("--shard is I/N with 0 ≤ I < N, e.g. 1/4")
        }
        return ShardSpec(index: i, count: n)
    }
}

/// `--variant NAME=preset:NAME` or `NAME=policy:FILE`.
struct VariantSpec {
    enum Source {
        case preset(Preset)
        case policy(String)
    }
    var name: String
    var source: Source

    static func parse(_ spec: String) throws -> VariantSpec {
        guard let eq = spec.firstIndex(of: "=") else {
            throw ValidationError("--variant is NAME=preset:NAME or NAME=policy:FILE")
        }
        let name = String(spec[..<eq])
        let what = String(spec[spec.index(after: eq)...])
        guard !name.isEmpty, !name.contains("/") else {
            throw ValidationError("variant name '\(name)' must be a plain folder name")
        }
        if what.hasPrefix("preset:") {
            let p = String(what.dropFirst(7))
            guard let preset = Preset(rawValue: p) else {
                throw ValidationError(
                    "variant '\(name)': unknown preset '\(p)' (\(Preset.allCases.map(\.rawValue).joined(separator: ", ")))"
                )
            }
            return VariantSpec(name: name, source: .preset(preset))
        }
        if what.hasPrefix("policy:") { return VariantSpec(name: name, source: .policy(String(what.dropFirst(7)))) }
        throw ValidationError("variant '\(name)': give preset:NAME or policy:FILE")
    }

    func load() throws -> Policy {
        switch source {
        case .preset(let p): try PolicyLoader.preset(p)
        case .policy(let path): try PolicyLoader.load(path: path)
        }
    }
}
