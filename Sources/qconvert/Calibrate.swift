import ArgumentParser
import Foundation
import QConvertKit

struct CalibrateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "calibrate",
        abstract: "Run a float ONNX model on sample inputs and record its activation statistics.",
        discussion: """
            For every activation a MatMul, Gemm or Conv consumes: count, min, max and a histogram of |x|, \
            gathered while streaming over the samples, so that memory does not grow with their number: by \
            default in one pass (each histogram's range grows by doubling; 1.5x faster), with --passes 2 in \
            two (ranges, then histograms over exactly [0, max |x|]). Values of magnitude ≥ 1e30 (attention masks' −3.4e38) are counted and left out; exact \
            zeros are counted apart from the histogram. \
            The statistics feed static quantization: qconvert MODEL.onnx -o OUT.onnx --calibration STATS. \
            Layout: Schemas/calibration.schema.json.

            The model runs in onnxruntime's C library, loaded at run time: --onnxruntime, then \
            $QCONVERT_ONNXRUNTIME, then the onnxruntime Python package of $VIRTUAL_ENV or of a .venv in this \
            folder or a parent.

            Example:
              qconvert calibrate model.onnx --data samples/ -o stats.json
            """
    )

    @Argument(help: ArgumentHelp("A float ONNX model.", valueName: "model.onnx"))
    var model: String

    @Option(
        name: .long,
        help: ArgumentHelp(
            "Sample inputs: a folder of .npz files (arrays named after the model's inputs, one run each), or one .npz whose arrays have a leading sample axis.",
            valueName: "path"))
    var data: String

    @Option(name: [.short, .long], help: ArgumentHelp("The statistics file to write (JSON).", valueName: "stats.json"))
    var output: String

    @Option(name: .long, help: "Histogram bins per tensor.")
    var bins: Int = 2048

    @Option(
        name: .long,
        help: ArgumentHelp(
            "1: one run per sample; each histogram's range starts at the first run's max |x| and doubles as needed (ending below twice the max). 2: a first run for the ranges, a second for histograms over exactly [0, max |x|]."
        ))
    var passes: Int = 1

    @Option(name: .long, help: ArgumentHelp("libonnxruntime.so to load.", valueName: "path"))
    var onnxruntime: String?

    @Flag(name: [.short, .long], help: "No progress and no summary.")
    var quiet = false

    func validate() throws {
        guard (16...(1 << 20)).contains(bins) else { throw ValidationError("--bins is 16 to 1048576") }
        guard passes == 1 || passes == 2 else { throw ValidationError("--passes is 1 or 2") }
    }

    func run() throws {
        try runReportingErrors {
            try PathGuard.checkOutput(output, inputPaths: [model, data])
            let rt = try OnnxRuntime.load(explicit: onnxruntime)
            let start = Date()
            let tty = isatty(STDERR_FILENO) != 0 && !quiet
            let stats = try ActivationCalibrator.run(
                model: model, data: data, runtime: rt, bins: bins, passes: passes, output: output
            ) {
                pass, i, n in
                if tty { FileHandle.standardError.write(Data("\r\(pass): sample \(i + 1)/\(n)   ".utf8)) }
            }
            if tty { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)) }
            let f = try AtomicFile(path: output)
            do {
                try f.pwrite(Array(stats.json.utf8), at: 0)
                try f.commit()
            } catch {
                f.abort()
                throw error
            }
            if !quiet {
                let skipped = stats.tensors.values.filter(\.constant).count
                print(
                    "\(model): \(stats.tensors.count) activations over \(stats.samples) samples (onnxruntime \(rt.version)), \(skipped) constant or empty; \(String(format: "%.2f", Date().timeIntervalSince(start))) s → \(output)"
                )
            }
        }
    }
}
