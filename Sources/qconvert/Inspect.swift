import ArgumentParser
import Foundation
import QConvertKit

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List a checkpoint's tensors and its embedded quantization metadata."
    )

    @Argument(help: ArgumentHelp("A checkpoint file or folder.", valueName: "file"))
    var file: String

    @Flag(name: .long, help: "Print as JSON.")
    var json = false

    func run() throws {
        try runReportingErrors {
            let ckpt = try Converter.open(file)
            let quant = ckpt.metadata.first { $0.key == MetadataDocument.key }?.value
            if json {
                let doc: JSONValue = .object([
                    ("path", .string(file)),
                    ("format", .string(ckpt.format)),
                    (
                        "tensors",
                        .array(
                            ckpt.entries.map { e in
                                .object([
                                    ("name", .string(e.name)), ("dtype", .string(e.dtype.rawValue)),
                                    ("shape", .array(e.shape.map(JSONValue.int))), ("bytes", .int(e.bytes.count))
                                ])
                            })
                    ),
                    (
                        "metadata",
                        .object(
                            ckpt.metadata.filter { $0.key != MetadataDocument.key }.map { ($0.key, .string($0.value)) })
                    ),
                    ("quantization", quant.flatMap { try? JSONParser.parse($0) } ?? .null)
                ])
                print(doc.compact)
                return
            }
            var rows: [[String]] = [["tensor", "dtype", "shape", "bytes"]]
            for e in ckpt.entries {
                rows.append([
                    oneLine(e.name), e.dtype.rawValue, "[" + e.shape.map(String.init).joined(separator: "×") + "]",
                    formatBytes(e.bytes.count)
                ])
            }
            var widths = [0, 0, 0, 0]
            for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
            var out = "\(file) (\(ckpt.format)\(ckpt.shardNames.map { ", \($0.count) shards" } ?? ""))\n"
            for r in rows {
                out +=
                    r.enumerated().map { $1.padding(toLength: widths[$0], withPad: " ", startingAt: 0) }.joined(
                        separator: "  ") + "\n"
            }
            let total = ckpt.entries.reduce(0) { $0 + $1.bytes.count }
            out += "\(ckpt.entries.count) tensors, \(formatBytes(total))\n"
            if !ckpt.dequantizedOnRead.isEmpty {
                out +=
                    "\(ckpt.dequantizedOnRead.count) tensors are stored quantized (\(ckpt.hfModel != nil ? "compressed-tensors" : ckpt.format)) and shown as the float values they stand for\n"
            }
            // one line per key: values (chat templates, a hostile file's terminal escapes) are shown escaped
            for (k, v) in ckpt.metadata where k != MetadataDocument.key {
                out += "metadata \(oneLine(k)): \(oneLine(v))\n"
            }
            if let doc = try MetadataDocument.find(in: ckpt.metadata, path: file) {
                out += "\nquantization metadata (\(MetadataDocument.key)): "
                out += "qconvert \(doc.tool.version), policy \(doc.policy.source)\n"
                out += "  input \(doc.input.hash)\n"
                for (name, r) in doc.tensors.sorted(by: { $0.key < $1.key }) {
                    var line = "  \(oneLine(name)): \(r.sourceDType) → \(r.dtype.rawValue)"
                    if let g = r.granularity { line += " \(g.rawValue)" }
                    if let m = r.mapping { line += " \(m.rawValue)" }
                    if let m = r.metrics { line += m.sqnrDB.map { String(format: "  SQNR %.1f dB", $0) } ?? "  exact" }
                    out += line + "\n"
                }
            }
            print(out, terminator: "")
        }
    }
}

struct DequantizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "dequantize",
        abstract: "Turn a qconvert-quantized checkpoint back into float tensors (x = (q − zero_point) · scale)."
    )

    @Argument(help: ArgumentHelp("A checkpoint written by qconvert.", valueName: "input"))
    var input: String

    @Option(name: [.short, .long], help: ArgumentHelp("Output path.", valueName: "output"))
    var output: String

    @Option(name: .long, help: ArgumentHelp("Output format, when the extension does not say.", valueName: "name"))
    var format: FormatName?

    @Flag(name: [.short, .long], help: "No summary.")
    var quiet = false

    func run() throws {
        try runReportingErrors {
            installInterruptCleanup()
            let r = try Dequantizer.run(input: input, output: output, format: format?.name)
            if !quiet { print("\(input) → \(output): \(r.restored) tensors restored to float, \(r.copied) copied") }
        }
    }
}
