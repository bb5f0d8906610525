import Foundation

/// The compressed-tensors layout that transformers and vLLM load as quantized (RUNTIMES.md section 2):
/// per quantized Linear module `m`, `m.weight_packed` (int32, offset-binary values packed densely
/// along the input features), `m.weight_scale` in the model's dtype, `m.weight_zero_point` (affine:
/// packed along the output features), `m.weight_shape`; fp8 weights as `m.weight` (float8_e4m3fn)
/// and `m.weight_scale`. config.json describes it in `quantization_config`.
public enum CompressedTensors {
    /// The layout a conversion writes. `output` nil: the input's own kind of output (`plan`).
    public static func layout(
        policy: Policy, source: Checkpoint, output: String?, writerName: String
    ) throws -> OutputLayout {
        let folderOutput = output.map { !$0.hasSuffix(".safetensors") } ?? (source.hfModel?.namedAsFolder ?? false)
        guard let asked = policy.layout else {
            let hf = source.hfModel?.namedAsFolder == true
            return hf && folderOutput && writerName == "safetensors" ? .compressedTensors : .qconvert
        }
        if asked == .compressedTensors {
            let out = output ?? source.path
            guard writerName == "safetensors" else {
                throw QConvertError.usage(
                    message: "\(out): the compressed-tensors layout is a safetensors layout, not \(writerName)")
            }
            guard source.hfModel != nil else {
                throw QConvertError.usage(
                    message:
                        "\(source.path): the compressed-tensors layout needs a Hugging Face model (config.json beside the weights) to describe"
                )
            }
            guard folderOutput else {
                throw QConvertError.usage(
                    message:
                        "\(out): the compressed-tensors layout is a model folder (weights and config.json); give a folder as the output"
                )
            }
        }
        return asked
    }

    /// The output's bits, signedness and strategy for one plan the layout holds.
    struct Scheme: Hashable {
        var bits: Int
        var float: Bool
        var symmetric: Bool
        var strategy: String
        var groupSize: Int?
        /// Subtracted from stored codes to get compressed-tensors' signed values (uint8: 128, uint4: 8).
        var offset: Int
        var format: String { float ? "float-quantized" : "pack-quantized" }

        init?(_ s: QuantScheme) {
            let t = s.target
            switch t {
            case .int8, .uint8, .int4, .uint4:
                bits = t.bits
                float = false
                offset = t.isSigned ? 0 : 1 << (t.bits - 1)
                // unsigned symmetric codes sit around the midpoint: signed and symmetric once shifted
                symmetric = s.mapping == .scale
            case .fp8_e4m3:
                bits = 8
                float = true
                offset = 0
                symmetric = true
            case .fp8_e5m2, .fp16, .bf16, .q8_0, .q4_0, .q4_1, .keep:
                return nil
            }
            switch s.granularity {
            case .tensor: strategy = "tensor"
            case .channel: strategy = "channel"
            case .group:
                if float { return nil }
                strategy = "group"
                groupSize = s.groupSize
            case .element: return nil
            }
        }

        var weights: JSONValue {
            .object([
                ("dynamic", .bool(false)),
                ("group_size", groupSize.map { .number(String($0)) } ?? .null),
                ("num_bits", .number(String(bits))),
                ("strategy", .string(strategy)),
                ("symmetric", .bool(symmetric)),
                ("type", .string(float ? "float" : "int"))
            ])
        }
    }

    static func module(of name: String) -> String? {
        name.hasSuffix(".weight") ? String(name.dropLast(".weight".count)) : nil
    }

    /// Embedding tables (and an output projection tied to one) stay in the model's dtype: the consumers
    /// run quantized Linear layers only.
    static func isEmbedding(_ module: String, ties: Bool) -> Bool {
        let parts = module.split(separator: ".").map { $0.lowercased() }
        if parts.contains(where: { $0.contains("embed") }) { return true }
        if let last = parts.last, ["wte", "wpe", "shared"].contains(last) { return true }
        return ties && parts.last == "lm_head"
    }

    /// Scales take the model's dtype (config.json), as the consumers expect; float32 when it says none.
    static func scaleDType(_ source: Checkpoint) -> DType {
        source.hfModel?.modelDType.flatMap { [.f16, .bf16].contains($0) ? $0 : nil } ?? .f32
    }

    /// Keeps in float what the layout cannot hold or the consumers cannot run, sets the scales to the
    /// model's dtype, and returns the notes for the summary. With `strict`, a layer the policy
    /// quantized that a consumer could not run is an error.
    public static func prepare(_ plans: inout [TensorPlan], source: Checkpoint, strict: Bool) throws {
        let ties = source.hfModel?.tiesWordEmbeddings ?? false
        let scaleDType = scaleDType(source)
        for i in plans.indices {
            guard var s = plans[i].decision.scheme, s.target.isQuantization else { continue }
            let p = plans[i]
            var why: String? = nil
            var unrunnable = true
            if let m = module(of: p.name), p.shape.count == 2, isEmbedding(m, ties: ties) {
                why = "compressed-tensors: embeddings stay in the model's dtype"
                unrunnable = false
            } else if module(of: p.name) == nil || p.shape.count != 2 {
                why = "compressed-tensors quantizes the 2-D weights of Linear layers only"
            } else if s.axis != 0 {
                why = "compressed-tensors needs the output channels on axis 0"
            } else if Scheme(s) == nil {
                why =
                    "compressed-tensors holds int8, uint8, int4, uint4 (per tensor, channel or group) and fp8 e4m3 (per tensor or channel), not \(s.target.rawValue) per \(s.granularity.rawValue)"
            } else if s.granularity == .group, p.shape[1] % s.groupSize != 0 {
                why =
                    "in_features \(p.shape[1]) is not a multiple of the group size \(s.groupSize): it would fail at the first forward"
            }
            if let why {
                if unrunnable && strict {
                    throw QConvertError.usage(message: "\(source.path): '\(p.name)': \(why) (--strict)")
                }
                plans[i].decision = .keep(reason: why)
                plans[i].bytesAfter = p.bytesBefore
                plans[i].scaleName = nil
                plans[i].zeroPointName = nil
                plans[i].paramShape = []
                if unrunnable { plans[i].warnings.append("left in float: \(why)") }
                continue
            }
            s.scaleDType = scaleDType
            plans[i].decision = .quantize(s)
        }
    }

    /// A regular expression for module names like `m`: numbered parts (layer indices) generalized
    /// when `general`, any prefix allowed (a model loaded without its head drops one).
    static func pattern(_ module: String, general: Bool) -> String {
        let parts = module.split(separator: ".", omittingEmptySubsequences: false).map { part -> String in
            if general, !part.isEmpty, part.allSatisfy({ $0.isASCII && $0.isNumber }) { return "\\d+" }
            var e = ""
            for c in part {
                if c.isLetter || c.isNumber || c == "_" { e.append(c) } else { e += "\\" + String(c) }
            }
            return e
        }
        return "re:(.*\\.)?" + parts.joined(separator: "\\.") + "$"
    }

    /// Patterns selecting exactly the modules given as `chosen` among all `modules` (module → class):
    /// a generalized pattern where every module it matches has the same class, else one per module.
    static func targets(for chosen: [String], among modules: [String: String]) -> [String] {
        var classesOf: [String: Set<String>] = [:]
        for (m, c) in modules { classesOf[pattern(m, general: true), default: []].insert(c) }
        var out: [String] = []
        var seen = Set<String>()
        for m in chosen {
            let g = pattern(m, general: true)
            let p = classesOf[g]?.count == 1 ? g : pattern(m, general: false)
            if seen.insert(p).inserted { out.append(p) }
        }
        return out
    }

    /// config.json with `quantization_config` for the plans (nil when nothing is quantized: the
    /// source's config as it is).
    public static func config(plans: [TensorPlan], source: Checkpoint) -> JSONValue? {
        guard let hf = source.hfModel, case .object(var fields) = hf.config else { return nil }
        var groups: [Scheme] = []
        var members: [[String]] = []
        var modules: [String: String] = [:]
        var floatLinear: [String] = []
        let ties = hf.tiesWordEmbeddings
        for p in plans {
            guard let m = module(of: p.name), p.shape.count == 2 else { continue }
            if let s = p.decision.scheme, s.target.isQuantization, let cs = Scheme(s) {
                if !groups.contains(cs) {
                    groups.append(cs)
                    members.append([])
                }
                let g = groups.firstIndex(of: cs)!
                members[g].append(m)
                modules[m] = "group_\(g)"
            } else if !isEmbedding(m, ties: ties) {
                modules[m] = "float"
                floatLinear.append(m)
            } else {
                modules[m] = "embedding"
            }
        }
        fields.removeAll { $0.0 == "quantization_config" }
        guard !groups.isEmpty else { return .object(fields) }
        var configGroups: [(String, JSONValue)] = []
        for (g, s) in groups.enumerated() {
            configGroups.append(
                (
                    "group_\(g)",
                    .object([
                        ("format", .string(s.format)),
                        ("input_activations", .null),
                        ("output_activations", .null),
                        ("targets", .array(targets(for: members[g], among: modules).map(JSONValue.string))),
                        ("weights", s.weights)
                    ])
                ))
        }
        let formats = Set(groups.map(\.format))
        let q: JSONValue = .object([
            ("config_groups", .object(configGroups)),
            ("format", .string(formats.count == 1 ? formats.first! : "mixed-precision")),
            ("ignore", .array(targets(for: floatLinear, among: modules).map(JSONValue.string))),
            ("kv_cache_scheme", .null),
            ("quant_method", .string("compressed-tensors")),
            ("quantization_status", .string("compressed"))
        ])
        fields.append(("quantization_config", q))
        return .object(fields)
    }

    /// How one declared output becomes compressed-tensors bytes.
    enum Transform {
        case copy
        /// Integer codes (one per byte, or packed 4-bit rows) to offset-binary int32 words per row.
        case packRows(rows: Int, cols: Int, bits: Int, packed4: Bool, signed: Bool)
        /// float32 scales to the model's dtype (exact: the quantizer rounded them already).
        case scale(DType)
        /// Zero points to signed values packed along the output channels.
        case packZeroPoints(rows: Int, groups: Int, bits: Int, offset: Int, signed: Bool)
        /// A per-tensor zero point as one signed int8.
        case zeroPointInt8(offset: Int, signed: Bool)
        case drop
    }

    /// The output tensors of the layout for the converter's declared ones: `map[i]` is the layout's
    /// index for declared tensor i (nil: dropped), `extra` the tensors the layout adds (shapes) with
    /// their bytes.
    struct Layout {
        var tensors: [OutputTensor] = []
        var map: [Int?] = []
        var transforms: [Transform] = []
        var extra: [(index: Int, bytes: [UInt8])] = []
    }

    static func layout(declared: [OutputTensor], plans: [TensorPlan], modelDType: DType) throws -> Layout {
        var l = Layout()
        func add(_ t: OutputTensor) -> Int {
            l.tensors.append(t)
            return l.tensors.count - 1
        }
        for t in declared {
            guard let pi = t.role.plan, pi < plans.count, let s = plans[pi].decision.scheme,
                s.target.isQuantization
            else {
                l.map.append(add(t))
                l.transforms.append(.copy)
                continue
            }
            let p = plans[pi]
            guard let cs = Scheme(s), let m = module(of: p.name), p.shape.count == 2 else {
                throw QConvertError.internal(message: "'\(p.name)' reached the compressed-tensors writer unprepared")
            }
            let (rows, cols) = (p.shape[0], p.shape[1])
            let groups = p.paramShape.count == 2 ? p.paramShape[1] : 1
            var out = t
            switch t.role {
            case .values:
                if cs.float {
                    out.name = m + ".weight"
                    l.transforms.append(.copy)
                } else {
                    let words = (cols * cs.bits + 31) / 32
                    out.name = m + ".weight_packed"
                    out.dtype = .i32
                    out.shape = [rows, words]
                    out.byteCount = rows * words * 4
                    l.transforms.append(
                        .packRows(
                            rows: rows, cols: cols, bits: cs.bits, packed4: s.target.isPacked4,
                            signed: s.target.isSigned))
                }
                l.map.append(add(out))
                var shape = [UInt8]()
                for v in [Int64(rows), Int64(cols)] { withUnsafeBytes(of: v.littleEndian) { shape += $0 } }
                let si = add(
                    OutputTensor(
                        name: m + ".weight_shape", dtype: .i64, shape: [2], byteCount: 16, shard: t.shard,
                        role: .plain))
                l.extra.append((si, shape))
            case .scale:
                out.name = m + ".weight_scale"
                out.dtype = modelDType
                out.shape = cs.strategy == "tensor" ? [1] : [rows, groups]
                out.byteCount = Shape(out.shape).elementCount * modelDType.bits / 8
                l.map.append(add(out))
                l.transforms.append(.scale(modelDType))
            case .zeroPoint:
                if cs.symmetric {
                    l.map.append(nil)
                    l.transforms.append(.drop)
                } else if cs.strategy == "tensor" {
                    out.name = m + ".weight_zero_point"
                    out.dtype = .i8
                    out.shape = [1]
                    out.byteCount = 1
                    l.map.append(add(out))
                    l.transforms.append(.zeroPointInt8(offset: cs.offset, signed: s.target.isSigned))
                } else {
                    let words = (rows * cs.bits + 31) / 32
                    out.name = m + ".weight_zero_point"
                    out.dtype = .i32
                    out.shape = [words, groups]
                    out.byteCount = words * groups * 4
                    l.map.append(add(out))
                    l.transforms.append(
                        .packZeroPoints(
                            rows: rows, groups: groups, bits: cs.bits, offset: cs.offset, signed: s.target.isSigned))
                }
            case .passthrough, .plain:
                l.map.append(add(t))
                l.transforms.append(.copy)
            }
        }
        return l
    }

    /// compressed-tensors' signed value of a stored code (4-bit signed codes are sign-extended).
    @inline(__always)
    static func signedValue(_ b: UInt8, bits: Int, offset: Int, signed: Bool) -> Int {
        signed ? Int(Int8(bitPattern: Packing.signExtend(b, bits: bits))) : Int(b) - offset
    }

    static func apply(_ t: Transform, _ bytes: UnsafeRawBufferPointer) -> [UInt8]? {
        switch t {
        case .copy, .drop:
            return nil
        case .packRows(let rows, let cols, let bits, let packed4, let signed):
            // offset binary is the stored code with its top bit flipped (signed) or as it is (unsigned)
            let flip: UInt8 = signed ? (bits == 8 ? 0x80 : 0x88) : 0
            let rowBytes = packed4 ? (cols + 1) / 2 : cols
            let words = (cols * bits + 31) / 32
            var out = [UInt8](repeating: 0, count: rows * words * 4)
            out.withUnsafeMutableBufferPointer { dst in
                for r in 0..<rows {
                    let src = bytes.baseAddress!.assumingMemoryBound(to: UInt8.self) + r * rowBytes
                    let o = dst.baseAddress! + r * words * 4
                    for k in 0..<rowBytes { o[k] = src[k] ^ flip }
                    if packed4 && cols % 2 == 1 { o[rowBytes - 1] &= 0x0F }  // the padding nibble stays 0
                }
            }
            return out
        case .scale(let dtype):
            let f = bytes.bindMemory(to: Float.self)
            switch dtype {
            case .f16: return f.flatMap { withUnsafeBytes(of: Float16($0).bitPattern.littleEndian) { Array($0) } }
            case .bf16:
                return f.flatMap { withUnsafeBytes(of: UInt16($0.bitPattern >> 16).littleEndian) { Array($0) } }
            default: return nil
            }
        case .packZeroPoints(let rows, let groups, let bits, let offset, let signed):
            let words = (rows * bits + 31) / 32
            var w = [UInt32](repeating: 0, count: words * groups)
            let z = bytes.bindMemory(to: UInt8.self)
            let half = 1 << (bits - 1)
            for j in 0..<groups {
                for r in 0..<rows {
                    let v = UInt32(signedValue(z[r * groups + j], bits: bits, offset: offset, signed: signed) + half)
                    let bit = r * bits
                    w[(bit / 32) * groups + j] |= v << UInt32(bit % 32)
                    if bit % 32 + bits > 32 { w[(bit / 32 + 1) * groups + j] |= v >> UInt32(32 - bit % 32) }
                }
            }
            return w.flatMap { withUnsafeBytes(of: $0.littleEndian) { Array($0) } }
        case .zeroPointInt8(let offset, let signed):
            let v = signedValue(bytes.load(as: UInt8.self), bits: 8, offset: offset, signed: signed)
            return [UInt8(bitPattern: Int8(v))]
        }
    }
}

/// Writes a converter's outputs through the compressed-tensors layout into a safetensors sink.
final class CompressedTensorsSink: CheckpointSink {
    let inner: CheckpointSink
    let layout: CompressedTensors.Layout

    init(inner: CheckpointSink, layout: CompressedTensors.Layout) throws {
        self.inner = inner
        self.layout = layout
        do {
            for (i, b) in layout.extra { try b.withUnsafeBytes { try inner.put(i, $0) } }
        } catch {
            inner.abort()
            throw error
        }
    }

    func put(_ index: Int, _ bytes: UnsafeRawBufferPointer) throws {
        guard let target = layout.map[index] else { return }
        if let out = CompressedTensors.apply(layout.transforms[index], bytes) {
            try out.withUnsafeBytes { try inner.put(target, $0) }
        } else {
            try inner.put(target, bytes)
        }
    }

    func commit(
        metadata: [(key: String, value: String)], document: MetadataDocument?, perShard: [String: MetadataDocument]
    ) throws {
        try inner.commit(metadata: metadata, document: document, perShard: perShard)
    }

    func abort() { inner.abort() }
}
