import Foundation

/// Writes GGUF files (llama.cpp) with plain tensor types (F32, F16, BF16 and the integer types GGUF has).
/// A GGUF input's metadata is carried over key by key, `general.file_type` is set from the tensors, and
/// qconvert's metadata document is stored as the string key `qconvert.quantization`.
/// Block-quantized types (Q8_0, Q4_0, Q4_1) are not written yet: such plans are refused before any work.
public struct GGUFWriter: FormatWriter {
    public init() {}
    public var name: String { "gguf" }
    public var fileExtensions: [String] { [".gguf"] }

    /// The GGML type holding a dtype as is (the plain types the reader reads as themselves).
    static func ggmlType(_ d: DType) -> GGMLType? {
        GGMLType.allCases.first { $0.block.elements == 1 && $0.readDType == d }
    }

    public var holdsBlockTypes: Bool { true }

    /// The GGML type of a block target.
    static func ggmlType(_ t: TargetType) -> GGMLType? {
        switch t {
        case .q8_0: .q8_0
        case .q4_0: .q4_0
        case .q4_1: .q4_1
        case .int8, .uint8, .int4, .uint4, .fp8_e4m3, .fp8_e5m2, .fp16, .bf16, .keep: nil
        }
    }

    /// The GGUF form of a Hugging Face model input (nil for a GGUF or plain input: names kept as they are).
    /// Built once, when the output opens: before any tensor is quantized, so a refused architecture or
    /// tokenizer costs no work and leaves no file.
    static func hfModel(_ source: Checkpoint, names: [String]) throws -> GGUFModel? {
        guard let hf = source.hfModel, !(source.container is GGUFContainer) else { return nil }
        return try GGUFArchitecture.model(hf, tensorNames: names)
    }

    public func check(_ plans: inout [TensorPlan], source: Checkpoint, output: String) throws {
        // llama.cpp aborts on norms and biases cast to 16 bits (measured with SmolLM2 and --preset fp16):
        // 1-D tensors keep their float type, as llama.cpp's own F16 and BF16 files have them
        for i in plans.indices where plans[i].shape.count < 2 && plans[i].decision.scheme?.target.isCast == true {
            plans[i].decision = .keep(reason: "GGUF: llama.cpp needs 1-D tensors (norms, biases) unconverted")
            plans[i].bytesAfter = plans[i].bytesBefore
        }
        for p in plans {
            if let s = p.decision.scheme, s.target.isQuantization, !s.target.isBlock {
                throw QConvertError.usage(
                    message:
                        "\(output): GGUF holds llama.cpp's block types (q8_0, q4_0, q4_1) and plain types, not '\(p.name)' as \(s.target.rawValue); use --preset q8_0, q4_0 or q4_1"
                )
            }
            let dtype = p.decision.scheme?.target.storageDType ?? p.dtype
            guard p.decision.scheme?.target.isBlock == true || Self.ggmlType(dtype) != nil else {
                throw QConvertError.usage(
                    message: "\(output): tensor '\(p.name)' of \(dtype.rawValue) has no GGUF type")
            }
        }
    }

    public func open(path: String, tensors: [OutputTensor], source: Checkpoint, options: WriterOptions) throws
        -> CheckpointSink
    {
        try GGUFSink(path: path, tensors: tensors, source: source, options: options)
    }
}

final class GGUFSink: CheckpointSink {
    static let alignment = 32
    let path: String
    let tensors: [OutputTensor]
    let file: AtomicFile
    let carried: [(key: String, value: GGUFValue)]
    let infos: [UInt8]
    let offsets: [Int]
    /// Bytes reserved for qconvert's metadata document (padded with spaces, which JSON allows); nil when
    /// the writer is given no document (dequantize), so no key is written.
    let reserve: Int?
    let fileType: UInt32
    /// The source shapes of the plans (rows of block-quantized values).
    let planShapes: [[Int]]
    /// Tensors in the file, and the end of the last one's data.
    let written: Int
    let dataLength: Int
    /// Output index → heads whose rows are interleaved on the way out (llama's q and k from a Hugging
    /// Face model).
    let permutedHeads: [Int: Int]
    /// Output indices not written (buffers llama.cpp recomputes).
    let dropped: Set<Int>

    init(path: String, tensors: [OutputTensor], source: Checkpoint, options: WriterOptions) throws {
        self.path = path
        self.tensors = tensors
        reserve = options.metadataSizeHint > 0 ? max(options.metadataSizeHint, 256) : nil
        let model = try GGUFWriter.hfModel(source, names: tensors.map(\.name))
        var input = (source.container as? GGUFContainer)?.file.metadata ?? model?.metadata ?? []
        if model != nil,
            tensors.contains(where: { t in
                t.role.plan.map { options.plans[$0].decision.scheme?.target.isBlock == true } ?? false
            })
        {
            input.append(("general.quantization_version", .uint(2, type: 4)))
        }
        carried = input.filter {
            $0.key != "general.file_type" && $0.key != MetadataDocument.key && $0.key != "general.alignment"
        }
        var permuted: [Int: Int] = [:]
        var dropped = Set<Int>()
        var info = GGUFBytes()
        var offsets: [Int] = []
        var offset = 0
        var blockTypes: [GGMLType] = []
        var written = 0
        var dataLength = 0
        for (i, t) in tensors.enumerated() {
            var name = t.name
            if let model {
                if model.dropped.contains(t.name) {
                    dropped.insert(i)
                    offsets.append(0)
                    continue
                }
                guard let n = model.names[t.name] else {
                    throw QConvertError.usage(message: "\(path): tensor '\(t.name)' has no GGUF name")
                }
                name = n
                if let h = model.permutedHeads[t.name] { permuted[i] = h }
            }
            written += 1
            // a block-quantized tensor: its GGML type and the shape of its values, from its plan
            var type = GGUFWriter.ggmlType(t.dtype)
            var shape = t.shape
            if case .values(let pi) = t.role, pi < options.plans.count,
                let target = options.plans[pi].decision.scheme?.target,
                let block = GGUFWriter.ggmlType(target)
            {
                type = block
                shape = options.plans[pi].shape
                blockTypes.append(block)
            }
            guard let type else {
                throw QConvertError.usage(
                    message: "\(path): tensor '\(t.name)' of \(t.dtype.rawValue) has no GGUF type")
            }
            info.string(name)
            let dims = shape.isEmpty ? [1] : Array(shape.reversed())
            info.u32(UInt32(dims.count))
            for d in dims { info.u64(UInt64(d)) }
            info.u32(type.rawValue)
            info.u64(UInt64(offset))
            offsets.append(offset)
            dataLength = offset + t.byteCount
            offset = (offset + t.byteCount + GGUFSink.alignment - 1) / GGUFSink.alignment * GGUFSink.alignment
        }
        infos = info.bytes
        // llama.cpp's file types: all F32 (0), mostly F16 (1), Q4_0 (2), Q4_1 (3), Q8_0 (7), BF16 (32):
        // the most common block type, else the float type
        let types = Set(tensors.map(\.dtype))
        let counts = Dictionary(grouping: blockTypes, by: { $0 }).mapValues(\.count)
        if let common = counts.max(by: { ($0.value, $0.key.rawValue) < ($1.value, $1.key.rawValue) })?.key {
            fileType = common == .q8_0 ? 7 : common == .q4_0 ? 2 : 3
        } else {
            fileType = types.contains(.bf16) ? 32 : types.contains(.f16) ? 1 : 0
        }
        self.offsets = offsets
        self.permutedHeads = permuted
        planShapes = options.plans.map(\.shape)
        self.dropped = dropped
        self.written = written
        self.dataLength = dataLength
        file = try AtomicFile(path: path)
    }

    /// Everything before the data: the fixed header, the metadata, the tensor infos, padding.
    func header(document: String?) -> [UInt8] {
        var h = GGUFBytes()
        h.raw(Array("GGUF".utf8))
        h.u32(3)
        h.u64(UInt64(written))
        h.u64(UInt64(carried.count + (document == nil ? 2 : 3)))
        for (k, v) in carried { h.keyValue(k, v) }
        h.keyValue("general.alignment", .uint(UInt64(GGUFSink.alignment), type: 4))
        h.keyValue("general.file_type", .uint(UInt64(fileType), type: 4))
        if let document { h.keyValue(MetadataDocument.key, .string(document)) }
        h.raw(infos)
        while h.bytes.count % GGUFSink.alignment != 0 { h.raw([0]) }
        return h.bytes
    }

    /// Where the data starts: after the header with the document's reservation.
    lazy var start = header(document: reserve.map { String(repeating: " ", count: $0) }).count

    func put(_ index: Int, _ bytes: UnsafeRawBufferPointer) throws {
        if dropped.contains(index) { return }
        if let heads = permutedHeads[index] {
            let rows = tensors[index].role.plan.map { planShapes[$0].first ?? 0 } ?? tensors[index].shape.first ?? 0
            guard let out = GGUFArchitecture.permuteRows(bytes, rows: rows, heads: heads) else {
                throw QConvertError.usage(
                    message: "\(path): '\(tensors[index].name)' has \(rows) rows, not a multiple of 2 × \(heads) heads")
            }
            try out.withUnsafeBytes { try file.pwrite($0, at: start + offsets[index]) }
            return
        }
        try file.pwrite(bytes, at: start + offsets[index])
    }

    func commit(
        metadata: [(key: String, value: String)], document: MetadataDocument?, perShard: [String: MetadataDocument]
    ) throws {
        do {
            var doc: String? = nil
            if let text = document?.encoded {
                guard let reserve, text.utf8.count <= reserve else {
                    throw QConvertError.internal(message: "\(path): the metadata document outgrew its reservation")
                }
                doc = text + String(repeating: " ", count: reserve - text.utf8.count)
            }
            let h = header(document: doc)
            guard h.count == start else {
                throw QConvertError.internal(message: "\(path): the GGUF header changed size")
            }
            try file.pwrite(h, at: 0)
            // pad the last tensor to the alignment, as llama.cpp's writer does
            let end = start + dataLength
            let padded = (end + GGUFSink.alignment - 1) / GGUFSink.alignment * GGUFSink.alignment
            if padded > end { try file.pwrite([UInt8](repeating: 0, count: padded - end), at: end) }
            try file.commit()
        } catch {
            file.abort()
            throw error
        }
    }

    func abort() { file.abort() }
}

/// Little-endian GGUF fields.
struct GGUFBytes {
    var bytes: [UInt8] = []
    mutating func raw(_ b: [UInt8]) { bytes += b }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func string(_ s: String) {
        u64(UInt64(s.utf8.count))
        bytes += Array(s.utf8)
    }

    mutating func keyValue(_ key: String, _ v: GGUFValue) {
        string(key)
        u32(v.typeCode)
        value(v)
    }

    mutating func value(_ v: GGUFValue) {
        switch v {
        case .uint(let x, let t): fixed(x, type: t)
        case .int(let x, let t): fixed(UInt64(bitPattern: x), type: t)
        case .float(let x, let t): t == 12 ? u64(x.bitPattern) : u32(Float(x).bitPattern)
        case .bool(let b): bytes.append(b ? 1 : 0)
        case .string(let s): string(s)
        case .array(let t, let items):
            u32(t)
            u64(UInt64(items.count))
            for i in items { value(i) }
        }
    }

    /// An integer of the width its type code says.
    mutating func fixed(_ x: UInt64, type: UInt32) {
        switch type {
        case 0, 1: bytes.append(UInt8(truncatingIfNeeded: x))
        case 2, 3: withUnsafeBytes(of: UInt16(truncatingIfNeeded: x).littleEndian) { bytes += $0 }
        case 4, 5: u32(UInt32(truncatingIfNeeded: x))
        default: u64(x)
        }
    }
}

extension GGUFValue {
    /// The value's type code in the file.
    var typeCode: UInt32 {
        switch self {
        case .uint(_, let t), .int(_, let t), .float(_, let t): t
        case .bool: 7
        case .string: 8
        case .array: 9
        }
    }
}
