import ArgumentParser
import Foundation
import QConvertKit

struct BatchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "batch",
        abstract: "Convert a whole model zoo: a folder (walked recursively) or a manifest of inputs.",
        discussion: """
            The output mirrors the input tree. An output is skipped when its metadata records the same input \
            hash, policy hash and qconvert version, so a run that was stopped resumes where it was. One bad \
            model never stops the others; the exit code is 6 when some failed, 5 when a gate failed.

            Across machines: --shard I/N takes a deterministic share of the work (a Kubernetes Indexed Job, \
            a Slurm array or a CI matrix, see Samples/zoo/), and 'qconvert batch merge' joins their manifests.
            """,
        subcommands: [BatchRun.self, BatchMerge.self],
        defaultSubcommand: BatchRun.self
    )
}

struct BatchRun: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run", abstract: "Convert every model of SRC (the default).")

    @Argument(help: ArgumentHelp("A folder of checkpoints, or a manifest file listing them.", valueName: "src"))
    var src: String

    @Option(name: [.short, .long], help: ArgumentHelp("Output folder.", valueName: "out"))
    var output: String

    @OptionGroup var policyOptions: PolicyOptions

    @Option(
        name: .customLong("variant"),
        help: ArgumentHelp(
            "NAME=preset:NAME or NAME=policy:FILE; several variants write OUT/NAME/... from one read of each input.",
            valueName: "spec"),
        transform: VariantSpec.parse)
    var variants: [VariantSpec] = []

    @Option(name: .long, parsing: .unconditional, help: "Models converted at once.")
    var jobs: Int = 2

    @Option(
        name: .long, help: ArgumentHelp("Take share I of N of the work list (0-based), e.g. 0/3.", valueName: "I/N"),
        transform: ShardSpec.parse)
    var shard = ShardSpec()

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Write one row per model and variant: JSON lines, or CSV when the name ends in .csv.", valueName: "file"))
    var manifest: String?

    @OptionGroup var gateOptions: GateOptions

    @Flag(name: [.short, .long], help: "No progress and no table.")
    var quiet = false

    // A worker process of the supervisor (see BatchSupervisor): converts the items listed in a
    // file and reports each start and end in a journal.
    @Option(name: .customLong("worker-items"), help: .hidden)
    var workerItems: String?

    @Option(name: .customLong("worker-journal"), help: .hidden)
    var workerJournal: String?

    func validate() throws {
        if jobs < 1 { throw ValidationError("--jobs must be at least 1") }
    }

    func run() throws {
        try runReportingErrors {
            let base = try policyOptions.load()
            var vs: [Batch.Variant] = []
            for spec in variants {
                vs.append(
                    Batch.Variant(
                        name: spec.name, policy: try PolicyLoader.applyOverrides(spec.load(), policyOptions.overrides)))
            }
            if vs.isEmpty { vs = [Batch.Variant(name: "", policy: base)] }
            var template = ConvertOptions(policy: base, jobs: 1, strict: policyOptions.strict)
            template.gates = gateOptions.gates
            let tty = !quiet && isatty(2) != 0
            if let itemsFile = workerItems, let journal = workerJournal {
                try BatchSupervisor.work(
                    itemsFile: itemsFile, journal: journal, variants: vs, out: output, template: template,
                    jobs: jobs, tty: tty)
                return
            }
            let items = Batch.shard(try Batch.discover(src, excluding: output), index: shard.index, count: shard.count)
            let outcomes = try BatchSupervisor.supervise(items, jobs: jobs, variants: vs, out: output)
            if tty { FileHandle.standardError.write(Data("\r\u{1B}[2K".utf8)) }
            if let m = manifest {
                let text = Batch.Outcome.manifest(outcomes, csv: m.hasSuffix(".csv"))
                do { try Data(text.utf8).write(to: URL(fileURLWithPath: m)) } catch {
                    throw QConvertError.write(path: m, message: error.localizedDescription)
                }
            }
            if !quiet { BatchRun.printTable(outcomes) }
            let failed = outcomes.filter { $0.status == .failed }
            for f in failed {
                FileHandle.standardError.write(
                    Data(
                        (oneLine(
                            "qconvert: failed: \(f.model)\(f.variant.isEmpty ? "" : " [\(f.variant)]"): \(f.error ?? "")"
                        ) + "\n").utf8
                    ))
            }
            if !failed.isEmpty { throw ExitCode(ExitStatus.batchFailures.rawValue) }
            if outcomes.contains(where: { $0.status == .gateFailed }) {
                for g in outcomes where g.status == .gateFailed {
                    FileHandle.standardError.write(
                        Data((oneLine("qconvert: \(g.model): \(g.error ?? "")") + "\n").utf8))
                }
                throw ExitCode(ExitStatus.gateFailed.rawValue)
            }
        }
    }

    static func printTable(_ outcomes: [Batch.Outcome]) {
        var rows = [["model", "variant", "format", "size", "ratio", "worst SQNR", "time", "status"]]
        for o in outcomes {
            rows.append([
                o.model, o.variant.isEmpty ? "-" : o.variant, o.format,
                o.bytesAfter > 0
                    ? "\(formatBytes(o.bytesBefore)) → \(formatBytes(o.bytesAfter))" : formatBytes(o.bytesBefore),
                o.bytesBefore > 0 && o.bytesAfter > 0
                    ? String(format: "%.1f %%", 100 * Double(o.bytesAfter) / Double(o.bytesBefore)) : "-",
                o.worstSQNR.map { String(format: "%.1f dB", $0) } ?? "-", String(format: "%.2f s", o.seconds),
                o.status.rawValue
            ])
        }
        var w = [Int](repeating: 0, count: rows[0].count)
        for r in rows { for (i, c) in r.enumerated() { w[i] = max(w[i], c.count) } }
        for r in rows {
            print(
                r.enumerated().map { $1.padding(toLength: w[$0], withPad: " ", startingAt: 0) }.joined(separator: "  "))
        }
        let counts = Dictionary(grouping: outcomes, by: \.status).mapValues(\.count)
        print(
            "\(outcomes.count) conversions: "
                + counts.sorted { $0.key.rawValue < $1.key.rawValue }.map { "\($0.value) \($0.key.rawValue)" }.joined(
                    separator: ", "))
    }
}

struct BatchMerge: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "merge", abstract: "Join the JSON-lines manifests of several batch shards.")

    @Argument(help: ArgumentHelp("Manifests written by 'qconvert batch --manifest'.", valueName: "manifest"))
    var manifests: [String]

    @Option(
        name: [.short, .long],
        help: ArgumentHelp("Write the joined manifest here (JSON lines, or CSV for .csv).", valueName: "file"))
    var output: String?

    func run() throws {
        try runReportingErrors {
            var all: [Batch.Outcome] = []
            for m in manifests {
                guard let text = try? String(contentsOfFile: m, encoding: .utf8) else {
                    throw QConvertError.io(path: m, message: "cannot read")
                }
                for (n, line) in text.split(separator: "\n").enumerated() where !line.isEmpty {
                    guard let v = try? JSONParser.parse(String(line)) else {
                        throw QConvertError.badInput(path: m, message: "line \(n + 1) is not JSON")
                    }
                    guard let o = Batch.Outcome(json: v) else {
                        throw QConvertError.badInput(
                            path: m,
                            message:
                                "line \(n + 1) has no known status (\(Batch.Status.allCases.map(\.rawValue).joined(separator: ", ")))"
                        )
                    }
                    all.append(o)
                }
            }
            all.sort { ($0.model, $0.variant) < ($1.model, $1.variant) }
            if let o = output {
                let text = Batch.Outcome.manifest(all, csv: o.hasSuffix(".csv"))
                do { try Data(text.utf8).write(to: URL(fileURLWithPath: o)) } catch {
                    throw QConvertError.write(path: o, message: error.localizedDescription)
                }
            }
            BatchRun.printTable(all)
            if all.contains(where: { $0.status == .failed }) { throw ExitCode(ExitStatus.batchFailures.rawValue) }
        }
    }
}
