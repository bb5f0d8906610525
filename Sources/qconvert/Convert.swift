import ArgumentParser
import Foundation
import QConvertKit

struct Convert: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Convert (and quantize) a checkpoint. The default subcommand.",
        discussion: """
            The output is written to a temporary file beside it and renamed on success: a failure never \
            leaves a partial output and never touches an existing file. The same input and policy give \
            byte-identical output, whatever --jobs.
            """
    )

    @Argument(
        help: ArgumentHelp(
            "Input checkpoint: a .safetensors file, a folder of shards or a Hugging Face model folder, a *.index.json, an .onnx, .gguf, .pt or .npz file.",
            valueName: "input"))
    var input: String

    @Option(
        name: [.short, .long],
        help: ArgumentHelp(
            "Output path; its extension picks the format. A path without one is a folder of shards.",
            valueName: "output"))
    var output: String?

    @OptionGroup var policyOptions: PolicyOptions

    @OptionGroup var gateOptions: GateOptions

    @Option(
        name: .long,
        help: ArgumentHelp("Write a JSON report (per-tensor metrics) to this file.", valueName: "file.json"))
    var report: String?

    @Option(name: .long, parsing: .unconditional, help: "Tensors processed at once (output bytes do not depend on it).")
    var jobs: Int = 2

    @Option(name: .long, help: ArgumentHelp("Output format, when the extension does not say.", valueName: "name"))
    var format: FormatName?

    @Option(
        name: .long, parsing: .unconditional,
        help: ArgumentHelp(
            "Split the output into shards of at most this size (e.g. 5GB); the output is then a folder.",
            valueName: "size"),
        transform: parseSize)
    var maxShardSize: Int?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Input fingerprint recorded in the metadata: xxh64 (fast) or sha256 (checkable with sha256sum).",
            valueName: "algorithm"))
    var inputHash: ContentHash = .xxh64

    @Flag(name: .long, help: "ONNX: write tensor data to OUT.data beside the model (automatic past 2 GB).")
    var externalData = false

    @Option(
        name: .long,
        help: ArgumentHelp(
            "When a quality gate fails, write the rejected result here for inspection (the output is never created or replaced by a rejected result).",
            valueName: "path"))
    var rejectedOutput: String?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "ONNX: activation statistics from 'qconvert calibrate': quantize the activations statically (the policy's 'activations' section) and the weights in the forms onnxruntime runs as integer kernels with them (MatMulIntegerToFloat, QLinearMatMul, QLinearConv).",
            valueName: "stats.json"))
    var calibration: String?

    @Flag(name: .long, help: "Print the plan and stop, as 'qconvert plan' does.")
    var dryRun = false

    @Flag(name: [.short, .long], help: "No progress bar and no summary.")
    var quiet = false

    func validate() throws {
        if !FileManager.default.fileExists(atPath: input), !input.contains("/"), !input.contains(".") {
            // Not a path: most likely a mistyped subcommand (the default subcommand took it as the input).
            let names = ["plan", "inspect", "dequantize", "diff", "batch", "calibrate", "help"]
            let near = names.min { editDistance(input, $0) < editDistance(input, $1) }!
            let hint = editDistance(input, near) <= 2 ? " (did you mean '\(near)'?)" : ""
            throw ValidationError("'\(input)' is neither a file nor a subcommand\(hint)")
        }
        if !dryRun && output == nil { throw ValidationError("missing -o/--output (or use --dry-run to see the plan)") }
        if jobs < 1 { throw ValidationError("--jobs must be at least 1") }
    }

    func run() throws {
        try runReportingErrors {
            let policy = try policyOptions.load()
            var options = ConvertOptions(policy: policy, jobs: jobs, strict: policyOptions.strict, format: format?.name)
            if let calibration { options.calibration = try ActivationStats.read(path: calibration) }
            options.maxShardSize = maxShardSize
            options.inputHash = inputHash
            options.consumeInput = true
            options.externalData = externalData
            options.gates = gateOptions.gates
            if dryRun {
                let (ckpt, plans) = try Converter.plan(input: input, options: options)
                PlanCommand.printTable(ckpt: ckpt, plans: plans, policy: policy)
                return
            }
            if let report { try PathGuard.checkReport(report, input: input, output: output) }
            if let r = rejectedOutput, let o = output,
                URL(fileURLWithPath: r).standardizedFileURL == URL(fileURLWithPath: o).standardizedFileURL
                    || PathGuard.identity(r).map({ $0 == PathGuard.identity(o) }) == true
            {
                throw QConvertError.usage(message: "\(r): --rejected-output must differ from the output")
            }
            installInterruptCleanup()
            let bar = ProgressBar(enabled: !quiet)
            let result: ConversionReport
            do {
                result = try Converter.convert(input: input, output: output!, options: options) { bar.update($0) }
            } catch var g as GateFailure {
                bar.finish()
                // The output is untouched; the rejected result goes where the user asked, to be inspected.
                if let rejected = rejectedOutput {
                    var again = options
                    again.gates = QualityGates()
                    _ = try Converter.convert(input: input, output: rejected, options: again)
                    g.rejectedPath = rejected
                }
                if let report, let r = g.report {
                    try? Data(r.json.utf8).write(to: URL(fileURLWithPath: report))
                }
                throw g
            }
            bar.finish()
            if let report {
                do { try Data(result.json.utf8).write(to: URL(fileURLWithPath: report)) } catch {
                    throw QConvertError.write(path: report, message: error.localizedDescription)
                }
            }
            if !quiet { printSummary(result) }
        }
    }

    func printSummary(_ r: ConversionReport) {
        var out = "\(r.input) → \(r.output) (\(r.outputFormat), \(r.policySource))\n"
        out += "  tensors: \(r.quantizedCount) quantized, \(r.castCount) cast, \(r.keptCount) kept\n"
        let ratio = r.bytesBefore > 0 ? 100 * Double(r.bytesAfter) / Double(r.bytesBefore) : 100
        out +=
            "  size: \(formatBytes(r.bytesBefore)) → \(formatBytes(r.bytesAfter)) (\(String(format: "%.1f", ratio)) %)\n"
        if let w = r.worst, let m = w.metrics, let sq = m.sqnrDB {
            out +=
                "  worst tensor: \(w.plan.name) SQNR \(String(format: "%.1f", sq)) dB, cosine \(String(format: "%.6f", m.cosine))\n"
        }
        let warnings = r.warnings
        if !warnings.isEmpty {
            out += "  warnings: \(warnings.count)\n"
            for w in warnings.prefix(10) { out += "    \(w.tensor): \(w.message)\n" }
            if warnings.count > 10 { out += "    … \(warnings.count - 10) more in --report\n" }
        }
        for n in r.notes { out += "  note: \(n)\n" }
        out += "  time: \(String(format: "%.2f", r.seconds)) s\n"
        print(out, terminator: "")
    }
}

/// A one-line progress bar on stderr, drawn only when stderr is a terminal.
final class ProgressBar: @unchecked Sendable {
    let enabled: Bool
    var lastDraw = Date.distantPast
    var drawn = false

    init(enabled: Bool) { self.enabled = enabled && isatty(2) != 0 }

    func update(_ p: ConvertProgress) {
        guard enabled else { return }
        let now = Date()
        guard now.timeIntervalSince(lastDraw) > 0.1 || p.tensorsDone == p.tensorsTotal else { return }
        lastDraw = now
        let frac = p.bytesTotal > 0 ? Double(p.bytesDone) / Double(p.bytesTotal) : 1
        let width = 28
        let filled = Int(frac * Double(width))
        let bar = String(repeating: "█", count: filled) + String(repeating: "·", count: width - filled)
        var name = p.current
        if name.count > 40 { name = "…" + name.suffix(39) }
        let line =
            "\r\u{1B}[2K[\(bar)] \(String(format: "%3.0f", frac * 100))%  \(p.tensorsDone)/\(p.tensorsTotal) tensors  \(name)"
        FileHandle.standardError.write(Data(line.utf8))
        drawn = true
    }

    func finish() {
        if drawn { FileHandle.standardError.write(Data("\r\u{1B}[2K".utf8)) }
    }
}

/// Levenshtein distance, for suggesting a subcommand.
func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a)
    let b = Array(b)
    var row = Array(0...b.count)
    for i in 1...max(a.count, 1) where !a.isEmpty {
        var prev = row[0]
        row[0] = i
        for j in 1...max(b.count, 1) where !b.isEmpty {
            let old = row[j]
            row[j] = min(row[j] + 1, row[j - 1] + 1, prev + (a[i - 1] == b[j - 1] ? 0 : 1))
            prev = old
        }
    }
    return row[b.count]
}
