import ArgumentParser
import Foundation
import QConvertKit

struct PlanCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "plan",
        abstract: "Show what a policy would do to each tensor, reading no tensor data.",
        discussion:
            "Columns: tensor, shape, source dtype → result, granularity (axis), deciding rule, bytes before → after, bits per weight, notes."
    )

    @Argument(help: ArgumentHelp("Input checkpoint.", valueName: "input"))
    var input: String

    @OptionGroup var policyOptions: PolicyOptions

    @Flag(name: .long, help: "Print the plan as JSON.")
    var json = false

    @Option(
        name: .long,
        help: ArgumentHelp(
            "ONNX: activation statistics from 'qconvert calibrate': also list each activation's quantization.",
            valueName: "stats.json"))
    var calibration: String?

    func run() throws {
        try runReportingErrors {
            let policy = try policyOptions.load()
            var options = ConvertOptions(policy: policy, strict: policyOptions.strict)
            options.calibration = try calibration.map { try ActivationStats.read(path: $0) }
            let (ckpt, plans, params) = try Converter.planWithActivations(input: input, options: options)
            if json {
                let report = ConversionReport(
                    input: input, output: "", inputFormat: ckpt.format, outputFormat: "",
                    policySource: policy.source, inputHash: "",
                    tensors: plans.map { TensorOutcome(plan: $0, metrics: nil) }, seconds: 0)
                print(report.json, terminator: "")
            } else {
                PlanCommand.printTable(ckpt: ckpt, plans: plans, policy: policy)
            }
            if let stats = options.calibration {
                let a = policy.activations
                print(
                    "\nactivations (\(a.dtype.rawValue) \(a.mapping.rawValue) per tensor, \(a.calibration.rawValue), into \(a.ops.sorted().joined(separator: ", "))): \(params.count) of \(stats.tensors.count) with data"
                )
                for p in params {
                    print(
                        "  \(oneLine(p.name)): range [\(p.beta), \(p.alpha)] scale \(p.scale) zero point \(p.zeroPoint)"
                            + (p.note.map { " (\($0))" } ?? "")
                    )
                }
            }
        }
    }

    static func printTable(ckpt: Checkpoint, plans: [TensorPlan], policy: Policy) {
        var rows: [[String]] = [["tensor", "shape", "dtype", "granularity", "rule", "bytes", "bpw", "notes"]]
        for p in plans {
            let shape = "[" + p.shape.map(String.init).joined(separator: "×") + "]"
            var gran = "-"
            var to = p.dtype.rawValue
            var notes = p.warnings
            switch p.decision {
            case .keep(let why):
                to += " (keep)"
                notes.insert(why, at: 0)
            case .cast(let s):
                to += " → \(s.target.rawValue)"
            case .quantize(let s):
                to += " → \(s.target.rawValue)"
                switch s.granularity {
                case .tensor: gran = "tensor"
                case .channel: gran = "channel(\(s.axis))"
                case .group: gran = "group(\(s.groupSize))"
                case .element: gran = "element"
                }
                if s.mapping == .affine { gran += " affine" }
                if !s.calibration.isMax { gran += " " + s.calibration.name }
                if let form = p.onnxFormChosen { notes.insert("onnx: " + form, at: 0) }
            }
            rows.append([
                p.name, shape, to, gran, p.rule, "\(formatBytes(p.bytesBefore)) → \(formatBytes(p.bytesAfter))",
                String(format: "%.2f", p.bitsPerWeight), notes.joined(separator: "; ")
            ])
        }
        var widths = [Int](repeating: 0, count: rows[0].count)
        for r in rows { for (i, c) in r.enumerated() where i < r.count - 1 { widths[i] = max(widths[i], c.count) } }
        var out = ""
        for r in rows {
            out +=
                r.enumerated().map { i, c in
                    i < r.count - 1 ? c.padding(toLength: widths[i], withPad: " ", startingAt: 0) : c
                }
                .joined(separator: "  ").trimmingCharacters(in: .whitespaces) + "\n"
        }
        let before = plans.reduce(0) { $0 + $1.bytesBefore }
        let after = plans.reduce(0) { $0 + $1.bytesAfter }
        let q = plans.filter { $0.decision.scheme?.target.isQuantization == true }.count
        let c = plans.filter { $0.decision.scheme?.target.isCast == true }.count
        out +=
            "\n\(plans.count) tensors (\(ckpt.format), \(policy.source)): \(q) quantized, \(c) cast, \(plans.count - q - c) kept; "
        out += "\(formatBytes(before)) → \(formatBytes(after))"
        if before > 0 { out += String(format: " (%.1f %%)", 100 * Double(after) / Double(before)) }
        let calibration = plans.reduce(0) { $0 + $1.calibrationSeconds }
        if calibration >= 0.1 {
            let slow = plans.filter { $0.calibrationSeconds >= CalibrationCost.slow }.count
            out += String(format: "\ncalibration: about %.1f s of one core", calibration)
            if slow > 0 { out += ", \(slow) slow tensor\(slow == 1 ? "" : "s") (see notes)" }
        }
        print(out)
    }
}
