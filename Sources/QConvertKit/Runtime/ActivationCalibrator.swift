import Foundation

/// `qconvert calibrate`: runs a float ONNX model in onnxruntime over sample inputs and gathers the
/// statistics of every activation a quantizable op consumes, in two streaming passes (ranges, then
/// histograms), so memory does not grow with the number of samples.
public enum ActivationCalibrator {
    /// The ops whose activation inputs are observed by default: those onnxruntime runs as integer kernels.
    public static let defaultOps: Set<String> = ["MatMul", "Gemm", "Conv"]

    /// Non-constant inputs of `ops` in the main graph, in graph order.
    static func targets(_ model: OnnxModel, ops: Set<String>) -> [String] {
        guard let g = model.model.pointee.graph else { return [] }
        var out: [String] = []
        var seen = Set<String>()
        for i in 0..<g.pointee.n_node {
            guard let n = g.pointee.node[i] else { continue }
            let domain = Proto.string(n.pointee.domain)
            guard domain.isEmpty || domain == "ai.onnx", ops.contains(Proto.string(n.pointee.op_type)) else { continue }
            for name in Proto.strings(n.pointee.input, n.pointee.n_input)
            where !name.isEmpty && model.located[name] == nil && seen.insert(name).inserted {
                out.append(name)
            }
        }
        return out
    }

    /// The graph's existing outputs.
    static func graphOutputs(_ model: OnnxModel) -> Set<String> {
        guard let g = model.model.pointee.graph else { return [] }
        return Set((0..<g.pointee.n_output).compactMap { g.pointee.output[$0].map { Proto.string($0.pointee.name) } })
    }

    /// The model's bytes with `names` appended as graph outputs: a second `graph` field holding only
    /// outputs, which protobuf merges into the first (repeated fields append). Their type is left to
    /// onnxruntime's inference.
    static func withOutputs(_ bytes: [UInt8], _ names: [String]) -> [UInt8] {
        func varint(_ v: Int) -> [UInt8] {
            var v = UInt64(v)
            var out: [UInt8] = []
            repeat {
                let b = UInt8(v & 0x7F)
                v >>= 7
                out.append(v != 0 ? b | 0x80 : b)
            } while v != 0
            return out
        }
        func ld(_ field: Int, _ payload: [UInt8]) -> [UInt8] {
            varint(field << 3 | 2) + varint(payload.count) + payload
        }
        var graph: [UInt8] = []
        for n in names { graph += ld(12, ld(1, Array(n.utf8))) }  // GraphProto.output: ValueInfoProto { name }
        return bytes + ld(7, graph)  // ModelProto.graph
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

        /// The feeds of sample `i` for the session's inputs.
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
                var bytes = try e.bytes.withUnsafeBytes { [UInt8]($0) }
                var shape = e.shape.map(Int64.init)
                if stacked != nil {
                    let per = bytes.count / Swift.max(e.shape[0], 1)
                    bytes = Array(bytes[(i * per)..<((i + 1) * per)])
                    shape[0] = 1
                }
                return .init(name: info.name, elementType: type, shape: shape, bytes: bytes)
            }
        }
    }

    public static func run(
        model path: String, data: String, runtime: OnnxRuntime, ops: Set<String> = defaultOps, bins: Int = 2048,
        progress: ((String, Int, Int) -> Void)? = nil
    ) throws -> ActivationStats {
        let ck = try Converter.open(path)
        guard let model = ck.container as? OnnxModel else {
            throw QConvertError.usage(message: "\(path): calibrate runs ONNX models; this is \(ck.format)")
        }
        if ck.files.count > 1 || !model.externalFiles.isEmpty {
            throw QConvertError.usage(
                message: "\(path): calibrate runs models that hold their weights (no external data) for now")
        }
        let names = targets(model, ops: ops)
        guard !names.isEmpty else {
            throw QConvertError.usage(
                message: "\(path): no \(ops.sorted().joined(separator: ", ")) node takes an activation")
        }
        let samples = try Samples(path: data)
        let file = ck.files[0]
        let bytes = Array(file.bytes(at: 0, count: file.size))
        let existing = graphOutputs(model)
        let session = try runtime.session(
            model: withOutputs(bytes, names.filter { !existing.contains($0) }), name: path,
            threads: ProcessInfo.processInfo.activeProcessorCount)
        let inputNames = Set(session.inputs.map(\.name))
        let fromGraph = names.filter { !inputNames.contains($0) }
        var stats = [String: ActivationStats.Tensor]()
        for n in names { stats[n] = ActivationStats.Tensor() }
        for pass in 0..<2 {
            for i in 0..<samples.count {
                progress?(pass == 0 ? "ranges" : "histograms", i, samples.count)
                let feeds = try samples.feeds(i, inputs: session.inputs, path: data)
                func observe(_ name: String, _ v: UnsafeBufferPointer<Float>) {
                    if pass == 0 {
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
        return ActivationStats(
            modelPath: path, modelSHA256: ContentHash.sha256.digest(of: file), samples: samples.count, bins: bins,
            tensors: stats)
    }
}
