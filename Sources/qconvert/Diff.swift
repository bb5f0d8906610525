import ArgumentParser
import Foundation
import QConvertKit

struct DiffCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "diff",
        abstract: "Compare two checkpoints tensor by tensor (any formats; qconvert outputs are dequantized).",
        discussion:
            "Prints max abs error, SQNR and cosine per tensor, the worst first, then the model's figures (from the summed error sums of the tensors that differ, as a conversion's gates compute them). With gates, exits 5 when one fails."
    )

    @Argument(help: ArgumentHelp("The reference checkpoint (e.g. the float original).", valueName: "a"))
    var a: String

    @Argument(help: ArgumentHelp("The checkpoint to compare (e.g. its quantized output).", valueName: "b"))
    var b: String

    @Flag(name: .long, help: "Print JSON.")
    var json = false

    @OptionGroup var gateOptions: GateOptions

    func run() throws {
        try runReportingErrors {
            let r = try Diff.run(a, b)
            if json {
                print(r.json, terminator: "")
            } else {
                var rows = [["tensor", "max abs err", "SQNR dB", "cosine"]]
                for x in r.rows {
                    rows.append([
                        x.name, String(format: "%.4g", x.maxAbsError),
                        x.sqnrDB.map { String(format: "%.2f", $0) } ?? "exact",
                        String(format: "%.6f", x.cosine)
                    ])
                }
                var w = [0, 0, 0, 0]
                for row in rows { for (i, c) in row.enumerated() { w[i] = max(w[i], c.count) } }
                for row in rows {
                    print(
                        row.enumerated().map { $1.padding(toLength: w[$0], withPad: " ", startingAt: 0) }.joined(
                            separator: "  "))
                }
                let m = r.model
                print(
                    "model (\(r.rows.filter(\.changed).count) differing tensors): SQNR "
                        + (m.sqnrDB.map { String(format: "%.2f dB", $0) } ?? "exact")
                        + String(format: ", cosine %.6f", m.cosine))
                if !r.onlyInA.isEmpty { print("only in \(a): \(r.onlyInA.joined(separator: ", "))") }
                if !r.onlyInB.isEmpty { print("only in \(b): \(r.onlyInB.joined(separator: ", "))") }
            }
            let failures = r.gateFailures(gateOptions.gates)
            if !failures.isEmpty { throw GateFailure(failures: failures, outputWritten: nil) }
        }
    }
}
