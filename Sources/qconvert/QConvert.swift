import ArgumentParser
import Foundation
import QConvertKit

@main
struct QConvert: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qconvert",
        abstract: "Convert model checkpoints between formats and quantize them on the way.",
        discussion: """
            A policy decides, tensor by tensor, what to keep, cast or quantize. Without one, the int8 \
            preset applies: symmetric int8 per output channel, max calibration, for float tensors of rank ≥ 2 \
            with ≥ 1024 elements.

            Examples:
              qconvert model.safetensors -o model.int8.safetensors
              qconvert model.safetensors -o model.w4.safetensors --preset w4g128
              qconvert model.safetensors -o out.safetensors --policy Samples/policy.cfg --report report.json
              qconvert plan model.safetensors --policy Samples/policy.cfg
              qconvert inspect model.int8.safetensors

            Exit codes: \(ExitStatus.summary)
            """,
        version: QConvertVersion.string,
        subcommands: [
            Convert.self, PlanCommand.self, Inspect.self, DequantizeCommand.self, DiffCommand.self, BatchCommand.self,
            CalibrateCommand.self
        ],
        defaultSubcommand: Convert.self
    )

    /// Every error is one line on stderr: usage errors too (swift-argument-parser's default adds the
    /// usage lines, and its usage line is the root's even for a subcommand's option).
    static func main() {
        TempFileRegistry.installTruncationGuard()
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            if error is ExitCode || error is CleanExit || exitCode(for: error) == .success { exit(withError: error) }
            if let e = error as? QConvertError {
                FileHandle.standardError.write(Data("qconvert: error: \(oneLine(e.description))\n".utf8))
                Foundation.exit(e.exitCode)
            }
            if exitCode(for: error) == .failure {
                // not the argument parser's: an error nothing in qconvert names
                FileHandle.standardError.write(
                    Data("qconvert: error: \(oneLine(unexpected(error).description))\n".utf8))
                Foundation.exit(ExitStatus.internalFault.rawValue)
            }
            let message = message(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
            FileHandle.standardError.write(
                Data("qconvert: error: \(oneLine(message)) (qconvert --help shows the usage)\n".utf8))
            Foundation.exit(ExitStatus.usage.rawValue)
        }
    }
}

/// Policy selection shared by convert and plan.
struct PolicyOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("A policy file (YAML, any extension).", valueName: "file"))
    var policy: String?

    @Option(name: .long, help: ArgumentHelp("A built-in policy (default int8).", valueName: "name"))
    var preset: Preset?

    @Option(
        name: .customLong("set"),
        help: ArgumentHelp(
            "Override a default of the policy, e.g. --set dtype=int4 --set group_size=64.", valueName: "key=value"))
    var overrides: [String] = []

    @Flag(name: .long, help: "Fail when a policy rule matches no tensor.")
    var strict = false

    @Option(
        name: .long,
        help: ArgumentHelp(
            "ONNX outputs: how quantized MatMul/Gemm weights run in onnxruntime, overriding every rule: auto (MatMulNBits where it fits, the default), qdq (portable DequantizeLinear), matmulnbits, dynamic (activations quantized per run).",
            valueName: "form"))
    var onnxForm: OnnxForm?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "safetensors outputs: compressed-tensors (what transformers and vLLM load as quantized; the default for a Hugging Face model folder written to a folder) or qconvert (its own layout, the default for single files), overriding the policy's 'layout'.",
            valueName: "layout"))
    var layout: OutputLayout?

    func validate() throws {
        if policy != nil && preset != nil { throw ValidationError("give either --policy or --preset, not both") }
    }

    func load() throws -> Policy {
        let base = try policy.map(PolicyLoader.load(path:)) ?? PolicyLoader.preset(preset ?? .int8)
        var p = try PolicyLoader.applyOverrides(base, overrides + (onnxForm.map { ["onnx_form=\($0.rawValue)"] } ?? []))
        if onnxForm != nil {
            for i in p.rules.indices { p.rules[i].settings.onnxForm = nil }  // the command line wins over every rule
        }
        if let layout {
            p.layout = layout
            p.text += "\n# --layout \(layout.rawValue)"
        }
        return p
    }
}

/// Runs a body, turning library errors into one line on stderr and a documented exit code. Errors
/// the library does not name (a Foundation error that escaped) are reported as internal faults.
func runReportingErrors(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let e as QConvertError {
        FileHandle.standardError.write(Data("qconvert: error: \(oneLine(e.description))\n".utf8))
        throw ExitCode(e.exitCode)
    } catch let g as GateFailure {
        FileHandle.standardError.write(Data("qconvert: \(oneLine(g.description))\n".utf8))
        throw ExitCode(ExitStatus.gateFailed.rawValue)
    } catch let e where e is ExitCode || e is CleanExit || e is ValidationError {
        throw e
    } catch {
        let e = unexpected(error)
        FileHandle.standardError.write(Data("qconvert: error: \(oneLine(e.description))\n".utf8))
        throw ExitCode(e.exitCode)
    }
}

/// An error nothing in qconvert names, as an internal fault with its type and text.
func unexpected(_ error: Error) -> QConvertError {
    .internal(message: "\(type(of: error)): \(error)")
}

/// A message as one printable line: control characters (newlines, terminal escapes) that names from a
/// hostile file may carry are shown as \u{..}, and the line is cut at 2,000 characters.
func oneLine(_ s: String) -> String {
    var out = ""
    for u in s.unicodeScalars {
        if u.value < 0x20 || (u.value >= 0x7f && u.value < 0xa0) || u.value == 0x2028 || u.value == 0x2029 {
            out += "\\u{" + String(u.value, radix: 16) + "}"
        } else {
            out.unicodeScalars.append(u)
        }
    }
    return out.count > 2000 ? String(out.prefix(2000)) + "… (cut)" : out
}

/// Quality gates shared by convert, batch and diff.
struct GateOptions: ParsableArguments {
    @Option(
        name: .long,
        help: ArgumentHelp(
            "Fail (exit 5) when any converted tensor, or the whole model, has a lower SQNR (dB).", valueName: "dB"))
    var minSqnr: Double?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Fail (exit 5) when any converted tensor, or the whole model, has a lower cosine similarity.",
            valueName: "x"))
    var minCosine: Double?

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Fail (exit 5) when the output is larger than this fraction of the input (whole model and per tensor).",
            valueName: "r"))
    var maxSizeRatio: Double?

    @Flag(name: .long, help: "Kept for compatibility: a failing gate never writes the output.")
    var noOutputOnFail = false

    var gates: QualityGates {
        QualityGates(minSQNR: minSqnr, minCosine: minCosine, maxSizeRatio: maxSizeRatio, noOutputOnFail: noOutputOnFail)
    }
}

/// On SIGINT/SIGTERM, removes the temporary files of outputs in flight and exits 128+signal.
/// The work happens on a dispatch queue, outside signal context.
func installInterruptCleanup() {
    for sig in [SIGINT, SIGTERM] {
        signal(sig, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
        source.setEventHandler {
            TempFileRegistry.shared.removeAll()
            FileHandle.standardError.write(Data("\nqconvert: interrupted; no output written\n".utf8))
            exit(ExitStatus.interrupted(sig))
        }
        source.resume()
        signalSources.append(source)
    }
}

nonisolated(unsafe) var signalSources: [DispatchSourceSignal] = []

func formatBytes(_ n: Int) -> String {
    let d = Double(n)
    if d >= 1e9 { return String(format: "%.2f GB", d / 1e9) }
    if d >= 1e6 { return String(format: "%.1f MB", d / 1e6) }
    if d >= 1e3 { return String(format: "%.1f kB", d / 1e3) }
    return "\(n) B"
}

func parseSize(_ s: String) throws -> Int {
    let t = s.trimmingCharacters(in: .whitespaces).uppercased()
    let units: [(String, Double)] = [
        ("TIB", 1_099_511_627_776), ("GIB", 1_073_741_824), ("MIB", 1_048_576), ("KIB", 1024),
        ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3), ("B", 1)
    ]
    var number = t
    var multiplier = 1.0
    if let (u, m) = units.first(where: { t.hasSuffix($0.0) }) {
        number = String(t.dropLast(u.count)).trimmingCharacters(in: .whitespaces)
        multiplier = m
    }
    // Digits and one decimal point only: no signs, exponents, "inf" or "nan".
    guard !number.isEmpty, number.allSatisfy({ $0.isASCII && ($0.isNumber || $0 == ".") }),
        number.filter({ $0 == "." }).count <= 1, let v = Double(number)
    else {
        throw ValidationError("bad size '\(s)' (examples: 5GB, 500MB, 2GiB, 1TB)")
    }
    let bytes = v * multiplier
    guard bytes >= 1 else { throw ValidationError("size '\(s)' must be at least 1 byte") }
    // 2^62 bytes (4 EiB) is far beyond any file; larger values would not fit the arithmetic.
    guard bytes <= 4_611_686_018_427_387_904 else { throw ValidationError("size '\(s)' is too large (at most 4 EiB)") }
    return Int(bytes)
}
