import CQKernels
import Foundation

/// Options of one conversion.
public struct ConvertOptions: Sendable {
    public var policy: Policy
    public var jobs: Int
    public var strict: Bool
    public var format: String?
    public var maxShardSize: Int?
    /// Use the scalar reference kernels (for tests and debugging).
    public var referenceKernels: Bool
    /// How the input is fingerprinted in the metadata.
    public var inputHash: ContentHash = .xxh64
    /// ONNX: write tensor data to a side file.
    public var externalData = false
    /// Quality gates checked on the result.
    public var gates = QualityGates()
    /// The input is converted once: the memory holding each converted tensor is released as soon as
    /// the writer has its replacement (`Checkpoint.consume`), keeping peak memory near the input's size.
    public var consumeInput = false
    /// Activation statistics (`qconvert calibrate`): ONNX outputs quantize the activations statically.
    public var calibration: ActivationStats?

    public init(
        policy: Policy, jobs: Int = 1, strict: Bool = false, format: String? = nil, maxShardSize: Int? = nil,
        referenceKernels: Bool = false
    ) {
        self.policy = policy
        self.jobs = max(1, jobs)
        self.strict = strict
        self.format = format
        self.maxShardSize = maxShardSize
        self.referenceKernels = referenceKernels
    }
}

/// Progress of a conversion, for the command line's display.
public struct ConvertProgress: Sendable {
    public var tensorsDone: Int
    public var tensorsTotal: Int
    public var bytesDone: Int
    public var bytesTotal: Int
    public var current: String
}

/// What one tensor became.
public struct TensorOutcome: Sendable {
    public var plan: TensorPlan
    public var metrics: TensorMetrics?
    public init(plan: TensorPlan, metrics: TensorMetrics?) {
        self.plan = plan
        self.metrics = metrics
    }
}

/// The result of a conversion: what was read, what was written, and how each tensor fared.
public struct ConversionReport: Sendable {
    public var input: String
    public var output: String
    public var inputFormat: String
    public var outputFormat: String
    public var policySource: String
    public var inputHash: String
    public var tensors: [TensorOutcome]
    public var seconds: Double
    /// Remarks on the output as a whole (its layout), shown in the summary and the report.
    public var notes: [String]

    public init(
        input: String, output: String, inputFormat: String, outputFormat: String, policySource: String,
        inputHash: String, tensors: [TensorOutcome], seconds: Double, notes: [String] = []
    ) {
        self.notes = notes
        self.input = input
        self.output = output
        self.inputFormat = inputFormat
        self.outputFormat = outputFormat
        self.policySource = policySource
        self.inputHash = inputHash
        self.tensors = tensors
        self.seconds = seconds
    }

    public var quantizedCount: Int { tensors.filter { $0.plan.decision.scheme?.target.isQuantization == true }.count }
    public var castCount: Int { tensors.filter { $0.plan.decision.scheme?.target.isCast == true }.count }
    public var keptCount: Int { tensors.filter { $0.plan.decision.scheme == nil }.count }
    public var bytesBefore: Int { tensors.reduce(0) { $0 + $1.plan.bytesBefore } }
    public var bytesAfter: Int { tensors.reduce(0) { $0 + ($1.metrics?.bytesAfter ?? $1.plan.bytesAfter) } }

    /// The converted tensor with the lowest SQNR (exact ones never qualify).
    public var worst: TensorOutcome? {
        tensors.filter { $0.metrics?.sqnrDB != nil }.min { $0.metrics!.sqnrDB! < $1.metrics!.sqnrDB! }
    }

    public var warnings: [(tensor: String, message: String)] {
        tensors.flatMap { t in t.plan.warnings.map { (t.plan.name, $0) } }
    }

    static func metricsJSON(_ m: TensorMetrics) -> JSONValue {
        .object([
            ("max_abs_err", .number(m.maxAbsError)),
            ("mse", .number(m.mse)),
            ("sqnr_db", m.sqnrDB.map(JSONValue.number) ?? .null),
            ("cosine", .number(m.cosine)),
            ("clipped", .number(m.clippedFraction)),
            ("bits_per_weight", .number(m.bitsPerWeight)),
            ("bytes_before", .int(m.bytesBefore)),
            ("bytes_after", .int(m.bytesAfter)),
            (
                "sums",
                .object([
                    ("x2", .number(m.sums.x2)), ("e2", .number(m.sums.e2)), ("xq", .number(m.sums.xq)),
                    ("q2", .number(m.sums.q2)),
                    ("count", .int(m.sums.count))
                ])
            )
        ])
    }

    /// The report document (Schemas/report.schema.json).
    public var json: String {
        let w = worst
        let model = modelSums
        let doc: JSONValue = .object([
            ("format", .string("qconvert.report/1")),
            ("tool", .object([("name", .string("qconvert")), ("version", .string(QConvertVersion.string))])),
            (
                "input",
                .object([("path", .string(input)), ("format", .string(inputFormat)), ("hash", .string(inputHash))])
            ),
            ("output", .object([("path", .string(output)), ("format", .string(outputFormat))])),
            ("policy", .string(policySource)),
            ("seconds", .number((seconds * 1000).rounded() / 1000)),
            (
                "totals",
                .object([
                    ("tensors", .int(tensors.count)), ("quantized", .int(quantizedCount)), ("cast", .int(castCount)),
                    ("kept", .int(keptCount)), ("bytes_before", .int(bytesBefore)), ("bytes_after", .int(bytesAfter)),
                    ("size_ratio", .number(bytesBefore > 0 ? Double(bytesAfter) / Double(bytesBefore) : 1)),
                    ("worst_tensor", w.map { .string($0.plan.name) } ?? .null),
                    ("worst_sqnr_db", w?.metrics?.sqnrDB.map(JSONValue.number) ?? .null),
                    ("model_sqnr_db", model.sqnrDB.map(JSONValue.number) ?? .null),
                    ("model_cosine", .number(model.cosine))
                ])
            ),
            (
                "tensors",
                .array(
                    tensors.map { t in
                        var kv: [(String, JSONValue)] = [
                            ("name", .string(t.plan.name)),
                            (
                                "action",
                                .string(
                                    t.plan.decision.scheme == nil
                                        ? "keep" : (t.plan.decision.scheme!.target.isCast ? "cast" : "quantize"))
                            ),
                            ("dtype", .string(t.plan.decision.scheme?.target.rawValue ?? t.plan.dtype.rawValue)),
                            ("source_dtype", .string(t.plan.dtype.rawValue)),
                            ("shape", .array(t.plan.shape.map(JSONValue.int))),
                            ("rule", .string(t.plan.rule))
                        ]
                        if case .keep(let why) = t.plan.decision { kv.append(("reason", .string(why))) }
                        if let s = t.plan.decision.scheme, s.target.isQuantization {
                            kv.append(("granularity", .string(s.granularity.rawValue)))
                            kv.append(("axis", .int(s.axis)))
                        }
                        kv.append(("bytes_before", .int(t.plan.bytesBefore)))
                        kv.append(("bytes_after", .int(t.metrics?.bytesAfter ?? t.plan.bytesAfter)))
                        if let m = t.metrics { kv.append(("metrics", ConversionReport.metricsJSON(m))) }
                        kv.append(("warnings", .array(t.plan.warnings.map(JSONValue.string))))
                        return .object(kv)
                    })
            )
        ])
        guard !notes.isEmpty, case .object(var fields) = doc else { return doc.compact + "\n" }
        fields.insert(("notes", .array(notes.map(JSONValue.string))), at: 6)
        return JSONValue.object(fields).compact + "\n"
    }
}

/// read → plan → quantize → write, one tensor at a time (or `jobs` at a time), output committed atomically.
public enum Converter {
    public static func open(_ path: String) throws -> Checkpoint {
        try FormatRegistry.reader(for: path).read(path: path)
    }

    public static func plan(input: String, options: ConvertOptions) throws -> (Checkpoint, [TensorPlan]) {
        let (ckpt, plans, _) = try planWithActivations(input: input, options: options)
        return (ckpt, plans)
    }

    /// The plan, and with `options.calibration` the activations' parameters and the weights' static forms.
    public static func planWithActivations(input: String, options: ConvertOptions) throws -> (
        Checkpoint, [TensorPlan], [ActivationParameters]
    ) {
        let ckpt = try open(input)
        var plans = try Planner.plan(ckpt, policy: options.policy, strict: options.strict)
        var activations: [ActivationParameters] = []
        if let stats = options.calibration, ckpt.container is OnnxModel {
            activations = try staticForms(&plans, source: ckpt, stats: stats, policy: options.policy)
        }
        try OnnxWriter.annotate(&plans, source: ckpt)
        let layout = try CompressedTensors.layout(
            policy: options.policy, source: ckpt, output: nil,
            writerName: options.format ?? FormatRegistry.folderFormat(of: ckpt))
        if layout == .compressedTensors { try CompressedTensors.prepare(&plans, source: ckpt, strict: options.strict) }
        return (ckpt, plans, activations)
    }

    /// Static quantization's parameters for `source`'s activations, and its weights' forms: those
    /// onnxruntime runs as integer kernels with the activations' quantization (`OnnxForms.applyStatic`).
    static func staticForms(
        _ planned: inout [TensorPlan], source ckpt: Checkpoint, stats: ActivationStats, policy: Policy
    ) throws -> [ActivationParameters] {
        let activations = try ActivationQuantization.parameters(stats, policy: policy.activations, source: ckpt)
        let paired = Set(activations.map(\.name))
        // the same plans the writer's form choice sees (a quantized Gemm C is no bias to fold)
        let byName = Dictionary(planned.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        for i in planned.indices where planned[i].decision.scheme?.target.isQuantization == true {
            OnnxForms.applyStatic(
                &planned[i], source: ckpt, consumerOps: ckpt.entries[planned[i].entryIndex].consumerOps,
                activations: paired, ops: policy.activations.ops, plans: byName)
        }
        return activations
    }

    /// What the summary says of the output's layout: the hazard of qconvert's own layout in a model
    /// that transformers would load.
    static func layoutNotes(_ plans: [TensorPlan], source: Checkpoint, layout: OutputLayout, writerName: String)
        -> [String]
    {
        if layout == .compressedTensors {
            let asymmetric = plans.contains {
                guard let s = $0.decision.scheme, let c = CompressedTensors.Scheme(s) else { return false }
                return !c.symmetric && c.strategy != "tensor"
            }
            return asymmetric
                ? [
                    "asymmetric per-channel or per-group layers: transformers loads them with quantization_config=CompressedTensorsConfig(dequantize=True) (its default path refuses such checkpoints, compressed-tensors' own included); vLLM reads them as written"
                ] : []
        }
        guard source.hfModel != nil, layout == .qconvert, writerName == "safetensors",
            plans.contains(where: { $0.decision.scheme?.target.isQuantization == true })
        else { return [] }
        return [
            "this is qconvert's own layout: transformers would load it beside config.json without an error and compute garbage (the integers taken for weights, the scales ignored); for transformers and vLLM write a folder with --layout compressed-tensors"
        ]
    }

    public static func convert(
        input: String, output: String, options: ConvertOptions,
        progress: ((ConvertProgress) -> Void)? = nil
    ) throws -> ConversionReport {
        try convert(open(input), output: output, options: options, progress: progress)
    }

    /// Converts an opened checkpoint (batch conversion reads each input once for several variants).
    /// `inputHash`, when known, is recorded instead of hashing again.
    public static func convert(
        _ ckpt: Checkpoint, output: String, options: ConvertOptions, inputHash knownHash: String? = nil,
        progress: ((ConvertProgress) -> Void)? = nil
    ) throws -> ConversionReport {
        let start = Date()
        let input = ckpt.path
        guard !ckpt.consumed else {
            throw QConvertError.internal(
                message: "\(ckpt.path): this reading was consumed by an earlier conversion; open it again")
        }
        var planned = try Planner.plan(ckpt, policy: options.policy, strict: options.strict)
        let writer = try FormatRegistry.writer(for: output, format: options.format, source: ckpt)
        if !writer.holdsBlockTypes, let p = planned.first(where: { $0.decision.scheme?.target.isBlock == true }) {
            throw QConvertError.usage(
                message:
                    "\(output): '\(p.name)' is planned as \(p.decision.scheme!.target.rawValue), one of llama.cpp's block types, which only a .gguf output holds"
            )
        }
        var activations: [ActivationParameters] = []
        if let stats = options.calibration {
            guard writer.name == "onnx" else {
                throw QConvertError.usage(
                    message:
                        "\(output): --calibration quantizes an ONNX model's activations; the output is \(writer.name)")
            }
            activations = try staticForms(&planned, source: ckpt, stats: stats, policy: options.policy)
        }
        try writer.check(&planned, source: ckpt, output: output)
        let layout = try CompressedTensors.layout(
            policy: options.policy, source: ckpt, output: output, writerName: writer.name)
        if layout == .compressedTensors {
            try CompressedTensors.prepare(&planned, source: ckpt, strict: options.strict)
        }
        let notes =
            layoutNotes(planned, source: ckpt, layout: layout, writerName: writer.name)
            + activations.compactMap { a in a.note.map { "activation \(a.name): \($0)" } }
        let plans = planned
        try PathGuard.checkOutput(output, input: ckpt)

        // Hash the input on another thread while converting; it is needed only at the end.
        let hashBox = Box("")
        let hashGroup = DispatchGroup()
        DispatchQueue.global().async(group: hashGroup) {
            hashBox.value = knownHash ?? ckpt.contentHash(options.inputHash)
        }
        // Integrity checks of the input's bytes (zip CRCs) run on first use of the bytes; starting them
        // here, beside the conversion, keeps them off the quantizing threads.
        let checkError = Box<Error?>(nil)
        DispatchQueue.global().async(group: hashGroup) {
            do { try ckpt.verifyIntegrity() } catch { checkError.value = error }
        }

        var outputs: [OutputTensor] = []
        var outIndex: [[Int]] = []
        for (pi, p) in plans.enumerated() {
            let e = ckpt.entries[p.entryIndex]
            var idx: [Int] = []
            func add(_ name: String, _ dtype: DType, _ shape: [Int], _ role: OutputRole) {
                idx.append(outputs.count)
                outputs.append(
                    OutputTensor(
                        name: name, dtype: dtype, shape: shape,
                        byteCount: Shape(shape).checkedByteCount(dtype) ?? 0, shard: e.shard, role: role))
            }
            if let s = p.decision.scheme {
                let quantized = s.target.isQuantization
                add(
                    p.valuesName, s.target.storageDType, Quantizer.storedShape(p.shape, target: s.target),
                    quantized ? .values(plan: pi) : .passthrough(plan: pi))
                if let sn = p.scaleName { add(sn, .f32, p.paramShape, .scale(plan: pi)) }
                if let zn = p.zeroPointName { add(zn, s.target.zeroPointDType, p.paramShape, .zeroPoint(plan: pi)) }
            } else {
                add(p.valuesName, e.dtype, e.shape, .passthrough(plan: pi))
            }
            outIndex.append(idx)
        }
        // Room for the metadata document: its size with the widest possible metrics.
        let hint = MetadataDocument.widest(plans: plans, policy: options.policy, inputFormat: ckpt.format)
        var escaped = ""
        JSONValue.writeString(hint.encoded, &escaped)
        var wopts = WriterOptions(maxShardSize: options.maxShardSize, metadataSizeHint: escaped.utf8.count)
        wopts.plans = plans
        wopts.externalData = options.externalData
        wopts.layout = layout
        wopts.activations = activations
        wopts.activationOps = options.policy.activations.ops
        let sink = try writer.open(path: output, tensors: outputs, source: ckpt, options: wopts)
        var metrics: [Int: TensorMetrics] = [:]
        func report() -> ConversionReport {
            ConversionReport(
                input: input, output: output, inputFormat: ckpt.format, outputFormat: writer.name,
                policySource: options.policy.source, inputHash: hashBox.value,
                tensors: plans.enumerated().map { TensorOutcome(plan: $1, metrics: metrics[$0]) },
                seconds: Date().timeIntervalSince(start), notes: notes)
        }
        do {
            let total = plans.reduce(0) { $0 + $1.bytesBefore }
            var done = 0
            var k = 0
            while k < plans.count {
                let window = Array(k..<min(plans.count, k + options.jobs))
                let results = Box([Result<QuantizedTensor?, Error>](repeating: .success(nil), count: window.count))
                let calibrated = Box([Int](repeating: 0, count: window.count))  // elements calibrated so far
                let lock = NSLock()
                let work = DispatchGroup()
                let reference = options.referenceKernels
                DispatchQueue.global().async(group: work) {
                    DispatchQueue.concurrentPerform(iterations: window.count) { w in
                        let i = window[w]
                        let tick: @Sendable (Int) -> Void = { n in
                            lock.lock()
                            calibrated.value[w] += n
                            lock.unlock()
                        }
                        let r = Result {
                            try process(
                                plans[i], entry: ckpt.entries[plans[i].entryIndex], reference: reference, progress: tick
                            )
                        }
                        lock.lock()
                        results.value[w] = r
                        lock.unlock()
                    }
                }
                // A long calibration moves the progress bar: the share of each tensor's elements calibrated.
                while work.wait(timeout: .now() + .milliseconds(200)) == .timedOut {
                    guard let progress else { continue }
                    lock.lock()
                    let partial = window.indices.reduce(0) { sum, w in
                        let p = plans[window[w]]
                        let n = Shape(p.shape).elementCount
                        return sum
                            + (n > 0 ? Int(Double(p.bytesBefore) * Double(min(calibrated.value[w], n)) / Double(n)) : 0)
                    }
                    lock.unlock()
                    progress(
                        ConvertProgress(
                            tensorsDone: k, tensorsTotal: plans.count, bytesDone: done + partial, bytesTotal: total,
                            current: plans[window[0]].name))
                }
                for (w, i) in window.enumerated() {
                    let produced = try results.value[w].get()
                    let p = plans[i]
                    let e = ckpt.entries[p.entryIndex]
                    progress?(
                        ConvertProgress(
                            tensorsDone: i, tensorsTotal: plans.count, bytesDone: done, bytesTotal: total,
                            current: p.name))
                    if let q = produced {
                        let o = outIndex[i]
                        try q.values.withUnsafeBytes { try sink.put(o[0], $0) }
                        if let sc = q.scale, o.count > 1 { try sc.withUnsafeBytes { try sink.put(o[1], $0) } }
                        if let zp = q.zeroPoint, o.count > 2 { try zp.withUnsafeBytes { try sink.put(o[2], $0) } }
                        metrics[i] = q.metrics
                        if options.consumeInput { ckpt.consume(p.entryIndex) }
                    } else {
                        try e.bytes.withUnsafeBytes { try sink.put(outIndex[i][0], $0) }
                    }
                    e.bytes.release()
                    done += p.bytesBefore
                }
                k += window.count
            }
            progress?(
                ConvertProgress(
                    tensorsDone: plans.count, tensorsTotal: plans.count, bytesDone: total, bytesTotal: total,
                    current: ""))
            hashGroup.wait()
            if let e = checkError.value { throw e }
            // Quality gates hold before anything is committed: a rejected result never creates or
            // replaces the output (the command line can write it elsewhere with --rejected-output).
            if !options.gates.isEmpty {
                let failures = options.gates.evaluate(report())
                if !failures.isEmpty { throw GateFailure(failures: failures, outputWritten: false, report: report()) }
            }
            let meta = ckpt.metadata.filter { $0.key != MetadataDocument.key }
            var doc = MetadataDocument(
                plans: plans, metrics: metrics, inputFormat: ckpt.format, inputHash: hashBox.value,
                policy: options.policy)
            if let stats = options.calibration {
                doc.activations = Dictionary(uniqueKeysWithValues: activations.map { ($0.name, ActivationRecord($0)) })
                doc.calibrationStatistics = stats.fileHash
            }
            var perShard: [String: MetadataDocument] = [:]
            let shardNames = Set(outputs.compactMap(\.shard))
            if shardNames.count > 1 {
                for s in shardNames {
                    let only = Set(plans.indices.filter { ckpt.entries[plans[$0].entryIndex].shard == s })
                    perShard[s] = MetadataDocument(
                        plans: plans, metrics: metrics, inputFormat: ckpt.format, inputHash: hashBox.value,
                        policy: options.policy,
                        only: only)
                }
            }
            try sink.commit(metadata: meta, document: doc, perShard: perShard)
        } catch {
            sink.abort()
            hashGroup.wait()
            throw error
        }
        return report()
    }

    /// Quantizes or casts one tensor; nil when it is kept as it is.
    static func process(
        _ p: TensorPlan, entry e: TensorEntry, reference: Bool,
        progress: (@Sendable (Int) -> Void)? = nil
    ) throws -> QuantizedTensor? {
        guard let scheme = p.decision.scheme else { return nil }
        let n = e.elementCount
        return try e.bytes.withUnsafeBytes { raw -> QuantizedTensor in
            if e.dtype == .f32, let base = raw.baseAddress, Int(bitPattern: base) % MemoryLayout<Float>.alignment == 0,
                raw.count == n * MemoryLayout<Float>.size
            {
                // The bytes (a mapped file, a protobuf payload) are untyped: bound to Float only for the call.
                return try raw.withMemoryRebound(to: Float.self) { floats in
                    try Quantizer.quantize(
                        name: e.name, values: floats, shape: e.shape, scheme: scheme,
                        bytesBefore: p.bytesBefore, reference: reference, progress: progress)
                }
            }
            let floats = FloatDecoding.toFloat32(raw, dtype: e.dtype, count: n)
            return try floats.withUnsafeBufferPointer {
                try Quantizer.quantize(
                    name: e.name, values: $0, shape: e.shape, scheme: scheme, bytesBefore: p.bytesBefore,
                    reference: reference, progress: progress)
            }
        }
    }
}

/// A mutable box shared with concurrently running closures; callers synchronise access.
final class Box<T>: @unchecked Sendable {
    var value: T
    init(_ v: T) { value = v }
}
