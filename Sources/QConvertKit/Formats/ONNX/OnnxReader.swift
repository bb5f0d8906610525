import COnnxProto
import Foundation

/// Reads ONNX models: initializers (raw or typed payloads, external data), Constant-node weights,
/// weights in subgraphs and function bodies; each tensor's consumers give its output-channel axis.
public struct OnnxReader: FormatReader {
    public init() {}
    public var name: String { "onnx" }
    public var fileExtensions: [String] { [".onnx"] }

    /// ONNX has no magic number; models are recognised by extension.
    public func sniff(_ prefix: [UInt8], fileSize: Int) -> Bool { false }
    public func recognizesFolder(_ path: String) -> Bool { false }

    public func read(path: String) throws -> Checkpoint {
        func bad(_ m: String) -> QConvertError { .badInput(path: path, message: m) }
        let model: OnnxModel
        let f = try MappedFile(path: path)
        do {
            guard f.size < Int(Int32.max) else {
                throw QConvertError.violation(path: path, OnnxWireRule.tooLarge)
            }
            let raw = f.bytes(at: 0, count: f.size)
            let wire: OnnxWireCheck
            do { wire = try OnnxWireCheck.check(raw) } catch let e as OnnxWireRule {
                throw QConvertError.violation(path: path, e)
            }
            // protobuf-c copies every payload; drop the file's pages behind the copying so that
            // memory holds one copy of the weights, not two.
            let releaser = UnpackReleaser(file: f, blocks: wire.largePayloads)
            var allocator = ProtobufCAllocator(
                alloc: { data, size in
                    let r = Unmanaged<UnpackReleaser>.fromOpaque(data!).takeUnretainedValue()
                    if size >= 1 << 20 { r.largeAllocation() }
                    return malloc(size)
                },
                free: { _, p in free(p) },
                allocator_data: Unmanaged.passUnretained(releaser).toOpaque())
            let unpacked = withExtendedLifetime(releaser) {
                raw.baseAddress.flatMap {
                    onnx__model_proto__unpack(&allocator, f.size, $0.assumingMemoryBound(to: UInt8.self))
                }
            }
            guard let m = unpacked else {
                throw QConvertError.violation(path: path, OnnxWireRule.undecodable)
            }
            model = OnnxModel(model: m, path: path)
        }
        guard let graph = model.model.pointee.graph else { throw bad("the model has no graph") }
        _ = graph
        var entries: [TensorEntry] = []
        try model.index { t, dtype, name, graphName in
            var dims: [Int] = []
            for i in 0..<t.pointee.n_dims {
                let d = t.pointee.dims[i]
                guard d >= 0 else { throw bad("tensor '\(graphName)': negative dimension \(d)") }
                dims.append(Int(d))
            }
            guard let expected = Shape(dims).checkedByteCount(dtype) else {
                throw bad("tensor '\(graphName)': shape \(Shape(dims)) overflows")
            }
            let bytes = try payload(t, name: graphName, dtype: dtype, expected: expected, model: model)
            entries.append(TensorEntry(name: name, dtype: dtype, shape: dims, bytes: bytes))
        }

        // Roles from consumers: the output-channel axis (QUANTIZATION.md section 4) and op names.
        for k in entries.indices {
            let gname = model.located[entries[k].name]!.graphName
            let uses = model.consumers[gname] ?? []
            entries[k].consumerOps = Array(Set(uses.map(\.op))).sorted()
            entries[k].outputAxis = OnnxReader.outputAxis(rank: entries[k].shape.count, uses: uses)
        }
        // The model file and its external data files, for the input hash.
        let files = [f] + model.externalFiles.sorted { $0.key < $1.key }.map(\.value)
        return Checkpoint(
            format: name, path: path, files: files, entries: entries,
            metadata: OnnxReader.metadataProps(model.model).map { (key: $0.0, value: $0.1) }, container: model)
    }

    static func metadataProps(_ m: UnsafeMutablePointer<Onnx__ModelProto>) -> [(String, String)] {
        (0..<m.pointee.n_metadata_props).compactMap { i in
            m.pointee.metadata_props[i].map { (Proto.string($0.pointee.key), Proto.string($0.pointee.value)) }
        }
    }

    static func outputAxis(rank: Int, uses: [(op: String, index: Int, node: Proto.NodeP)]) -> Int? {
        guard rank >= 1 else { return nil }
        for u in uses {
            switch (u.op, u.index) {
            case ("MatMul", 1): return rank - 1
            case ("Gemm", 1): return (Proto.intAttribute(u.node, "transB") ?? 0) != 0 ? 0 : min(1, rank - 1)
            case ("Conv", 1): return 0
            case ("ConvTranspose", 1): return min(1, rank - 1)
            case ("Gather", 0): return 0
            case ("LSTM", 1), ("LSTM", 2), ("GRU", 1), ("GRU", 2), ("RNN", 1), ("RNN", 2): return min(1, rank - 1)
            default: continue
            }
        }
        return nil
    }

    /// The tensor's bytes in raw (little-endian, packed) layout: borrowed from raw_data, mapped from
    /// external data, or rebuilt from the typed fields.
    func payload(_ t: Proto.TensorP, name: String, dtype: DType, expected: Int, model: OnnxModel) throws -> TensorBytes
    {
        func bad(_ m: String) -> QConvertError { .badInput(path: model.path, message: "tensor '\(name)': \(m)") }
        if t.pointee.has_data_location != 0 && t.pointee.data_location == ONNX__TENSOR_PROTO__DATA_LOCATION__EXTERNAL {
            return try external(t, name: name, expected: expected, model: model)
        }
        if t.pointee.has_raw_data != 0 {
            guard t.pointee.raw_data.len == expected else {
                throw bad(
                    "dims \(Shape(Proto.dimsOf(t))) of \(dtype.rawValue) need \(expected) bytes but raw_data has \(t.pointee.raw_data.len)"
                )
            }
            return .borrowed(UnsafeRawPointer(t.pointee.raw_data.data), count: expected, owner: model)
        }
        let n = Shape(Proto.dimsOf(t)).elementCount
        var out = [UInt8]()
        out.reserveCapacity(expected)
        func need(_ have: Int, _ want: Int, _ field: String) throws {
            guard have == want else {
                throw bad("dims \(Shape(Proto.dimsOf(t))) need \(want) values but \(field) has \(have)")
            }
        }
        func append<T>(_ v: T) { withUnsafeBytes(of: v) { out += $0 } }
        switch dtype {
        case .f32, .c64:  // complex values are (re, im) pairs
            let count = dtype == .c64 ? 2 * n : n
            try need(t.pointee.n_float_data, count, "float_data")
            for i in 0..<count { append(t.pointee.float_data[i].bitPattern.littleEndian) }
        case .f64, .c128:
            let count = dtype == .c128 ? 2 * n : n
            try need(t.pointee.n_double_data, count, "double_data")
            for i in 0..<count { append(t.pointee.double_data[i].bitPattern.littleEndian) }
        case .i64:
            try need(t.pointee.n_int64_data, n, "int64_data")
            for i in 0..<n { append(t.pointee.int64_data[i].littleEndian) }
        case .u64:
            try need(t.pointee.n_uint64_data, n, "uint64_data")
            for i in 0..<n { append(t.pointee.uint64_data[i].littleEndian) }
        case .u32:
            try need(t.pointee.n_uint64_data, n, "uint64_data")
            for i in 0..<n { append(UInt32(truncatingIfNeeded: t.pointee.uint64_data[i]).littleEndian) }
        case .i32:
            try need(t.pointee.n_int32_data, n, "int32_data")
            for i in 0..<n { append(t.pointee.int32_data[i].littleEndian) }
        case .i16, .u16, .f16, .bf16:
            try need(t.pointee.n_int32_data, n, "int32_data")
            for i in 0..<n { append(UInt16(truncatingIfNeeded: t.pointee.int32_data[i]).littleEndian) }
        case .i8, .u8, .bool, .f8e4m3, .f8e5m2:
            try need(t.pointee.n_int32_data, n, "int32_data")
            for i in 0..<n { out.append(UInt8(truncatingIfNeeded: t.pointee.int32_data[i])) }
        case .int4, .uint4:
            try need(t.pointee.n_int32_data, (n + 1) / 2, "int32_data")
            for i in 0..<((n + 1) / 2) { out.append(UInt8(truncatingIfNeeded: t.pointee.int32_data[i])) }
        }
        guard out.count == expected else { throw bad("payload has \(out.count) bytes, dims need \(expected)") }
        return .owned(out)
    }

    /// External data: `location` relative to the model's folder; absolute paths, `..`, links
    /// leaving the folder, missing files and short files are refused.
    func external(_ t: Proto.TensorP, name: String, expected: Int, model: OnnxModel) throws -> TensorBytes {
        func bad(_ m: String) -> QConvertError {
            .badInput(path: model.path, message: "tensor '\(name)': external data \(m)")
        }
        var location: String?
        var offset = 0
        var length: Int?
        for i in 0..<t.pointee.n_external_data {
            guard let e = t.pointee.external_data[i] else { continue }
            let v = Proto.string(e.pointee.value)
            switch Proto.string(e.pointee.key) {
            case "location": location = v
            case "offset":
                guard let o = Int(v), o >= 0 else { throw bad("has a bad offset '\(v)'") }
                offset = o
            case "length":
                guard let l = Int(v), l >= 0 else { throw bad("has a bad length '\(v)'") }
                length = l
            default: break
            }
        }
        guard let loc = location, !loc.isEmpty else { throw bad("has no location") }
        let resolved = try Self.resolveExternal(loc, folder: model.folder, bad: bad)
        let f: MappedFile
        if let cached = model.externalFiles[resolved] {
            f = cached
        } else {
            f = try MappedFile(path: resolved)
            model.externalFiles[resolved] = f
        }
        let len = length ?? (f.size - offset)
        guard len == expected else { throw bad("length \(len) does not match the \(expected) bytes its dims need") }
        guard offset <= f.size, len <= f.size - offset else {
            throw bad("range \(offset)+\(len) runs past the end of '\(loc)' (\(f.size) bytes)")
        }
        return .mapped(f, offset: offset, count: len)
    }

    /// The file an external-data `location` names: relative to the model's folder, never leaving it
    /// (absolute paths, `..`, drive letters and links out of the folder are refused), and existing.
    static func resolveExternal(_ loc: String, folder: String, bad: (String) -> QConvertError) throws -> String {
        let parts = loc.split(separator: "/", omittingEmptySubsequences: false)
        guard !loc.hasPrefix("/"), !loc.contains("\\"), !loc.contains("\0"), !parts.contains(".."),
            !(loc.count >= 2 && loc.dropFirst().first == ":")
        else {
            throw bad("location '\(loc)' must be a relative path inside the model's folder")
        }
        let folderURL = URL(fileURLWithPath: folder).resolvingSymlinksInPath()
        let full = folderURL.appendingPathComponent(loc).path
        let resolved = URL(fileURLWithPath: full).resolvingSymlinksInPath().path
        guard resolved.hasPrefix(folderURL.path + "/") else {
            throw bad("location '\(loc)' leads outside the model's folder")
        }
        guard FileManager.default.fileExists(atPath: resolved) else { throw bad("file '\(loc)' does not exist") }
        return resolved
    }
}

/// Releases the mapped pages of payloads protobuf-c has already copied: each large allocation
/// means the previous large payload (in file order) is done.
final class UnpackReleaser {
    let file: MappedFile
    let blocks: [(offset: Int, length: Int)]
    var seen = 0

    init(file: MappedFile, blocks: [(offset: Int, length: Int)]) {
        self.file = file
        self.blocks = blocks
    }

    func largeAllocation() {
        if seen > 0 && seen - 1 < blocks.count {
            let b = blocks[seen - 1]
            file.release(offset: b.offset, count: b.length)
        }
        seen += 1
    }
}

extension Proto {
    static func dimsOf(_ t: TensorP) -> [Int] { (0..<t.pointee.n_dims).map { Int(t.pointee.dims[$0]) } }
}
