import Foundation

/// `qconvert calibrate`: runs a float ONNX model in onnxruntime over sample inputs and gathers the
/// statistics of every activation a quantizable op consumes, streaming (one pass whose histogram ranges
/// grow by doubling, or two: ranges, then histograms), so memory does not grow with the number of samples.
public enum ActivationCalibrator {
    /// The ops whose activation inputs are observed by default: those onnxruntime runs as integer kernels.
    public static let defaultOps: Set<String> = ["MatMul", "Gemm", "Conv"]

    /// What calibration needs of the main graph, read from the wire bytes without unpacking the weights:
    /// nodes (op, domain, inputs, outputs), initializer names, graph outputs, external data.
    struct Outline {
        var nodes: [(op: String, domain: String, inputs: [String], outputs: [String])] = []
        var initializers = Set<String>()
        var outputs = Set<String>()

        init(_ b: UnsafeRawBufferPointer, path: String) throws {
            _ = try OnnxWireCheck.check(b)  // lengths within their messages, nesting bounded
            let w = WireFields(bytes: b, path: path)
            try w.each(0..<b.count) { f in
                guard f.number == 7, f.wire == 2 else { return }  // ModelProto.graph
                try w.each(f.payload) { g in
                    guard g.wire == 2 else { return }
                    switch g.number {
                    case 1:  // NodeProto: input 1, output 2, op_type 4, domain 7
                        var node = (op: "", domain: "", inputs: [String](), outputs: [String]())
                        try w.each(g.payload) { n in
                            guard n.wire == 2 else { return }
                            switch n.number {
                            case 1: node.inputs.append(w.text(n.payload))
                            case 2: node.outputs.append(w.text(n.payload))
                            case 4: node.op = w.text(n.payload)
                            case 7: node.domain = w.text(n.payload)
                            default: break
                            }
                        }
                        nodes.append(node)
                    case 5:  // TensorProto: name 8
                        try w.each(g.payload) { t in
                            if t.number == 8, t.wire == 2 { initializers.insert(w.text(t.payload)) }
                        }
                    case 12:  // ValueInfoProto: name 1
                        try w.each(g.payload) { v in
                            if v.number == 1, v.wire == 2 { outputs.insert(w.text(v.payload)) }
                        }
                    default: break
                    }
                }
            }
        }

        /// Non-constant inputs of `ops` (default domain), in graph order.
        func targets(_ ops: Set<String>) -> [String] {
            let constants = Set(nodes.filter { $0.op == "Constant" }.flatMap(\.outputs))
            var out: [String] = []
            var seen = Set<String>()
            for n in nodes where (n.domain.isEmpty || n.domain == "ai.onnx") && ops.contains(n.op) {
                for name in n.inputs
                where !name.isEmpty && !initializers.contains(name) && !constants.contains(name)
                    && seen.insert(name).inserted
                {
                    out.append(name)
                }
            }
            return out
        }
    }

    /// Bytes that, appended to a model, add `names` as graph outputs: a second `graph` field holding only
    /// outputs, which protobuf merges into the first (repeated fields append). Their type is left to
    /// onnxruntime's inference.
    static func outputsTail(_ names: [String]) -> [UInt8] {
        typealias PB = ProtobufBytes
        var graph: [UInt8] = []
        for n in names { graph += PB.ld(12, PB.text(1, n)) }  // GraphProto.output: ValueInfoProto { name }
        return PB.ld(7, graph)  // ModelProto.graph
    }

    /// The samples of `data`: a folder of .npz files (one run each), or one .npz whose arrays have a
    /// leading sample axis (one run per index along it).
    struct Samples {
        var files: [Checkpoint] = []
        var stacked: Checkpoint?
        var count: Int

        init(path: String) throws {
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
                throw QConvertError.io(path: path, message: "no such file or folder")
            }
            if isDir.boolValue {
                let names = ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).filter {
                    $0.hasSuffix(".npz") && !$0.hasPrefix(".")
                }.sorted()
                guard !names.isEmpty else { throw QConvertError.badInput(path: path, message: "holds no .npz samples") }
                files = try names.map { try NpzReader().read(path: path + "/" + $0) }
                count = files.count
            } else {
                let ck = try NpzReader().read(path: path)
                guard let first = ck.entries.first, let n = first.shape.first, n > 0 else {
                    throw QConvertError.badInput(path: path, message: "holds no arrays with a leading sample axis")
                }
                for e in ck.entries where e.shape.first != n {
                    throw QConvertError.badInput(
                        path: path, message: "array '\(e.name)' has \(e.shape.first ?? 0) samples, '\(first.name)' \(n)"
                    )
                }
                stacked = ck
                count = n
            }
        }

        /// Samples of a stacked file run `batch` at a time; files run one each. Two at a time ran MiniLM-L3
        /// as fast as eight, at 166 MB of peak RSS instead of 273 (onnxruntime's intermediates grow with it).
        static let batch = 2
        var runs: Int { stacked == nil ? count : (count + Self.batch - 1) / Self.batch }

        /// The feeds of run `i` for the session's inputs.
        func feeds(_ i: Int, inputs: [OrtValueInfo], path: String) throws -> [OrtSessionHandle.Input] {
            let ck = stacked ?? files[i]
            let where_ = stacked == nil ? files[i].path : path
            return try inputs.map { info in
                guard let e = ck.entries.first(where: { $0.name == info.name }) else {
                    throw QConvertError.badInput(path: where_, message: "no array named '\(info.name)' (a model input)")
                }
                guard let type = OnnxRuntime.elementType(e.dtype), type == info.elementType else {
                    throw QConvertError.badInput(
                        path: where_,
                        message:
                            "array '\(e.name)' is \(e.dtype.rawValue), the model input takes ONNX type \(info.elementType)"
                    )
                }
                var shape = e.shape.map(Int64.init)
                var range = 0..<e.bytes.count
                if stacked != nil {
                    // only this run's rows of the stacked arrays
                    let per = e.bytes.count / Swift.max(e.shape[0], 1)
                    let first = i * Self.batch
                    let n = Swift.min(Self.batch, e.shape[0] - first)
                    range = (first * per)..<((first + n) * per)
                    shape[0] = Int64(n)
                }
                let bytes = try e.bytes.withUnsafeBytes { [UInt8](UnsafeRawBufferPointer(rebasing: $0[range])) }
                return .init(name: info.name, elementType: type, shape: shape, bytes: bytes)
            }
        }
    }

    public static func run(
        model path: String, data: String, runtime: OnnxRuntime, ops: Set<String> = defaultOps, bins: Int = 2048,
        passes: Int = 1, output: String? = nil,
        progress: ((String, Int, Int) -> Void)? = nil
    ) throws -> ActivationStats {
        guard (try? FormatRegistry.reader(for: path))?.name == "onnx" else {
            throw QConvertError.usage(message: "\(path): calibrate runs ONNX models")
        }
        let file = try MappedFile(path: path)
        let outline = try Outline(file.bytes(at: 0, count: file.size), path: path)
        file.release(offset: 0, count: file.size)
        let names = outline.targets(ops)
        guard !names.isEmpty else {
            throw QConvertError.usage(
                message: "\(path): no \(ops.sorted().joined(separator: ", ")) node takes an activation")
        }
        let samples = try Samples(path: data)
        // onnxruntime runs a temporary copy with the extra outputs, its weights in a data file it maps
        let tmp = NSTemporaryDirectory() + "/qconvert-calibrate-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).onnx"
        let session: OrtSessionHandle
        do {
            defer {
                unlink(tmp)
                unlink(tmp + ".data")
            }
            let externals = try RunnableCopy.write(
                file, sourcePath: path, model: tmp, tail: outputsTail(names.filter { !outline.outputs.contains($0) }))
            // the model's external data files are inputs too: an output naming one is refused before any run
            if let output { try PathGuard.checkOutput(output, inputPaths: externals) }
            session = try runtime.session(path: tmp, name: path, threads: ProcessInfo.processInfo.activeProcessorCount)
        }
        let inputNames = Set(session.inputs.map(\.name))
        let fromGraph = names.filter { !inputNames.contains($0) }
        var stats = [String: ActivationStats.Tensor]()
        var growing = [String: ActivationStats.GrowingHistogram]()
        for n in names {
            stats[n] = ActivationStats.Tensor()
            if passes == 1 { growing[n] = ActivationStats.GrowingHistogram(bins: bins) }
        }
        for pass in (passes == 1 ? [2] : [0, 1]) {
            for i in 0..<samples.runs {
                progress?(["ranges", "histograms", "samples"][pass], i, samples.runs)
                let feeds = try samples.feeds(i, inputs: session.inputs, path: data)
                func observe(_ name: String, _ v: UnsafeBufferPointer<Float>) {
                    if pass == 2 {
                        growing[name]!.observe(&stats[name]!, v)
                    } else if pass == 0 {
                        ActivationStats.observeRange(&stats[name]!, v)
                    } else {
                        ActivationStats.observeHistogram(&stats[name]!, v, bins: bins)
                    }
                }
                for f in feeds where stats[f.name] != nil && f.elementType == 1 {
                    f.bytes.withUnsafeBytes { observe(f.name, $0.bindMemory(to: Float.self)) }
                }
                try session.run(feeds, outputs: fromGraph) { k, _, values in observe(fromGraph[k], values) }
            }
        }
        for (n, g) in growing { g.finish(&stats[n]!) }
        return ActivationStats(
            modelPath: path, modelSHA256: ContentHash.sha256.digest(of: file), samples: samples.count, bins: bins,
            tensors: stats)
    }
}
