import Foundation

/// NumPy .npz archives: a zip of `<name>.npy` members, stored or deflated.
public struct NpzReader: FormatReader {
    public init() {}
    public var name: String { "npz" }
    public var fileExtensions: [String] { [".npz"] }

    /// Member names of the metadata qconvert writes.
    static let metadataMember = MetadataDocument.key + ".npy"
    static let dtypesMember = "qconvert.dtypes.npy"

    /// A zip whose first member is a .npy array.
    public func sniff(_ prefix: [UInt8], fileSize: Int) -> Bool {
        guard prefix.count >= 30, prefix[0] == 0x50, prefix[1] == 0x4B, prefix[2] == 3, prefix[3] == 4 else {
            return false
        }
        let nl = Int(prefix[26]) | Int(prefix[27]) << 8
        guard 30 + nl <= prefix.count else { return false }
        return String(decoding: prefix[30..<(30 + nl)], as: UTF8.self).hasSuffix(".npy")
    }

    public func recognizesFolder(_ path: String) -> Bool { false }

    public func read(path: String) throws -> Checkpoint {
        let zip = try ZipArchive(path: path)
        var entries: [TensorEntry] = []
        var metadata: [(key: String, value: String)] = []
        var storedTypes: [String: DType] = [:]
        for m in zip.members {
            guard m.name.hasSuffix(".npy") else { continue }
            let isMeta = m.name == NpzReader.metadataMember || m.name == NpzReader.dtypesMember
            if !isMeta && m.method == 8 {
                // Only the header is inflated now; the data is inflated each time it is used.
                let head = try zip.inflate(m, prefix: 12 + Npy.maxHeader)
                entries.append(try NpzReader.deflatedTensor(head, member: m, zip: zip, path: path))
                continue
            }
            let bytes = try zip.bytes(m, deferCRC: !isMeta)
            if isMeta {
                let text = try NpzReader.unicodeScalar(bytes, name: m.name, path: path)
                if m.name == NpzReader.metadataMember {
                    metadata.append((MetadataDocument.key, text))
                } else if let obj = try? JSONParser.parse(text).objectValue {
                    for (k, v) in obj { if let s = v.stringValue, let d = DType(rawValue: s) { storedTypes[k] = d } }
                }
                continue
            }
            entries.append(try NpzReader.tensor(bytes, name: String(m.name.dropLast(4)), path: path))
        }
        // Types numpy lacks were stored as raw integers; the dtypes member says what they are.
        for k in entries.indices {
            // 4-bit values stay packed bytes (u8); bf16 and fp8 get their type back
            if let d = storedTypes[entries[k].name], d.bits == entries[k].dtype.bits { entries[k].dtype = d }
        }
        let ck = Checkpoint(format: name, path: path, files: [zip.file], entries: entries, metadata: metadata)
        return ck
    }

    /// The array's layout from its .npy header, checked against the member's size.
    struct Layout {
        var header: Npy.Header
        var dtype: DType
        var size: Int
        var bigEndian: Bool
        var count: Int
        var nbytes: Int
        var needsReorder: Bool { bigEndian || (header.fortranOrder && header.shape.count > 1) }
    }

    static func layout(_ head: UnsafeRawBufferPointer, total: Int, name: String, path: String) throws -> Layout {
        func bad(_ r: NpyRule) -> QConvertError { .violation(path: path, r) }
        let header = try Npy.parseHeader(head, name: name + ".npy", path: path)
        guard let (dtype, size, bigEndian) = Npy.dtype(header.descr) else {
            if header.descr.hasSuffix("O") { throw bad(.objectArray(array: name)) }
            throw bad(.unsupportedDType(array: name, descr: header.descr))
        }
        guard let n = Shape(header.shape).checkedElementCount,
            case (let nbytes, false) = n.multipliedReportingOverflow(by: size)
        else {
            throw bad(.shapeOverflows(array: name, shape: header.shape))
        }
        guard total - header.dataOffset == nbytes else {
            throw bad(
                .sizeMismatch(
                    array: name, shape: header.shape, descr: header.descr, needs: nbytes,
                    holds: total - header.dataOffset))
        }
        return Layout(header: header, dtype: dtype, size: size, bigEndian: bigEndian, count: n, nbytes: nbytes)
    }

    /// Big-endian and Fortran-order arrays become little-endian, C-order bytes.
    static func reorder(_ bytes: [UInt8], _ l: Layout) -> [UInt8] {
        var a = bytes
        let size = l.size
        let n = l.count
        if l.bigEndian {
            for e in 0..<n { a[(e * size)..<(e * size + size)].reverse() }
            if l.dtype == .c64 || l.dtype == .c128 {  // complex: swap each half, not the whole
                let h = size / 2
                for e in 0..<n {
                    let s = e * size
                    a[s..<(s + size)].reverse()
                    a[s..<(s + h)].reverse()
                    a[(s + h)..<(s + size)].reverse()
                }
            }
        }
        if l.header.fortranOrder && l.header.shape.count > 1 {
            a = fortranToC(a, shape: l.header.shape, elementSize: size)
        }
        return a
    }

    static func tensor(_ bytes: TensorBytes, name: String, path: String) throws -> TensorEntry {
        let l = try bytes.headerView.withUnsafeBytes { b in try layout(b, total: b.count, name: name, path: path) }
        var data: TensorBytes
        data =
            try bytes.window(offset: l.header.dataOffset, count: l.nbytes)
            ?? .owned(bytes.withUnsafeBytes { Array($0[l.header.dataOffset...]) })
        if l.needsReorder { data = .owned(reorder(try data.withUnsafeBytes { Array($0) }, l)) }
        return TensorEntry(
            name: name, dtype: l.dtype, shape: l.header.shape, bytes: data,
            outputAxis: l.header.shape.count >= 2 ? 0 : nil)
    }

    /// A deflated member: its header is read now (from `head`, the first inflated bytes), its data
    /// is inflated on each use.
    static func deflatedTensor(_ head: [UInt8], member m: ZipArchive.Member, zip: ZipArchive, path: String) throws
        -> TensorEntry
    {
        let name = String(m.name.dropLast(4))
        let l = try head.withUnsafeBytes { try layout($0, total: m.size, name: name, path: path) }
        let data = DeferredBytes(count: l.nbytes, path: path, what: "member '\(m.name)'") {
            let body = try zip.inflate(m, skip: l.header.dataOffset)
            return l.needsReorder ? reorder(body, l) : body
        }
        return TensorEntry(
            name: name, dtype: l.dtype, shape: l.header.shape, bytes: .deferred(data),
            outputAxis: l.header.shape.count >= 2 ? 0 : nil)
    }

    static func fortranToC(_ a: [UInt8], shape: [Int], elementSize: Int) -> [UInt8] {
        let n = shape.reduce(1, *)
        var out = [UInt8](repeating: 0, count: a.count)
        var fStrides = [Int](repeating: 1, count: shape.count)
        for k in 1..<shape.count { fStrides[k] = fStrides[k - 1] * shape[k - 1] }
        var idx = [Int](repeating: 0, count: shape.count)
        for c in 0..<n {
            let f = zip(idx, fStrides).reduce(0) { $0 + $1.0 * $1.1 }
            for b in 0..<elementSize { out[c * elementSize + b] = a[f * elementSize + b] }
            var k = shape.count - 1
            while k >= 0 {
                idx[k] += 1
                if idx[k] < shape[k] { break }
                idx[k] = 0
                k -= 1
            }
        }
        return out
    }

    /// A 0-d `<U` array's text (qconvert's metadata members).
    static func unicodeScalar(_ bytes: TensorBytes, name: String, path: String) throws -> String {
        try bytes.withUnsafeBytes { b in
            let h = try Npy.parseHeader(b, name: name, path: path)
            guard h.descr.hasPrefix("<U"), h.shape.isEmpty else {
                throw QConvertError.violation(path: path, NpyRule.notText(member: name, reason: "not a string"))
            }
            let data = UnsafeRawBufferPointer(rebasing: b[h.dataOffset...])
            var s = ""
            for k in 0..<(data.count / 4) {
                let v = data.loadUnaligned(fromByteOffset: 4 * k, as: UInt32.self).littleEndian
                if v == 0 { break }
                guard let u = Unicode.Scalar(v) else {
                    throw QConvertError.violation(path: path, NpyRule.notText(member: name, reason: "not valid text"))
                }
                s.unicodeScalars.append(u)
            }
            return s
        }
    }
}

/// Writes stored, deterministic .npz archives that `numpy.load(allow_pickle=False)` reads.
public struct NpzWriter: FormatWriter {
    public init() {}
    public var name: String { "npz" }
    public var fileExtensions: [String] { [".npz"] }

    public func open(path: String, tensors: [OutputTensor], source: Checkpoint, options: WriterOptions) throws
        -> CheckpointSink
    {
        var seen = Set<String>()
        for t in tensors where !seen.insert(t.name).inserted {
            throw QConvertError.usage(message: "output would hold two arrays named '\(t.name)'")
        }
        // Member names come from tensor names, which the input chose: none may climb out of the folder an
        // archive is extracted to, be absolute, hold NUL, or pass the zip format's 65,535-byte limit.
        for t in tensors {
            let member = t.name + ".npy"
            guard ZipArchive.isSafeName(member), member.utf8.count <= 65_535 else {
                let shown = t.name.count > 200 ? String(t.name.prefix(200)) + "…" : t.name
                throw QConvertError.badInput(
                    path: source.path,
                    message:
                        "a tensor name cannot be an .npz member name (unsafe to extract, or longer than a zip allows): '\(shown)'"
                )
            }
        }
        let headers = tensors.map { Npy.headerBytes(descr: Npy.descr($0.dtype), shape: $0.shape) }
        // What numpy cannot hold natively is stored as raw integers; remember the real type.
        var exotic: [(String, String)] = []
        for (k, t) in tensors.enumerated() where [.bf16, .f8e4m3, .f8e5m2].contains(t.dtype) {
            exotic.append((tensors[k].name, t.dtype.rawValue))
        }
        for t in tensors {
            if case .values(let pi) = t.role, let s = options.plans[pi].decision.scheme, s.target.isPacked4 {
                exotic.append((t.name, s.target.rawValue))
            }
        }
        let zip = try ZipWriter(
            path: path, members: zip(tensors, headers).map { ($0.name + ".npy", $1.count + $0.byteCount, 1) })
        return NpzSink(zip: zip, tensors: tensors, headers: headers, exotic: exotic)
    }
}

final class NpzSink: CheckpointSink {
    let zip: ZipWriter
    let tensors: [OutputTensor]
    let headers: [[UInt8]]
    let exotic: [(String, String)]

    init(zip: ZipWriter, tensors: [OutputTensor], headers: [[UInt8]], exotic: [(String, String)]) {
        self.zip = zip
        self.tensors = tensors
        self.headers = headers
        self.exotic = exotic
    }

    func put(_ index: Int, _ bytes: UnsafeRawBufferPointer) throws {
        try zip.write(index, headers[index])
        try zip.write(index, bytes, at: headers[index].count)
    }

    static func unicodeArray(_ s: String) -> [UInt8] {
        let scalars = Array(s.unicodeScalars)
        var out = Npy.headerBytes(descr: "<U\(max(scalars.count, 1))", shape: [])
        for u in scalars { withUnsafeBytes(of: u.value.littleEndian) { out += $0 } }
        if scalars.isEmpty { out += [0, 0, 0, 0] }
        return out
    }

    func commit(
        metadata: [(key: String, value: String)], document: MetadataDocument?, perShard: [String: MetadataDocument]
    ) throws {
        do {
            var extra: [(String, [UInt8])] = []
            if let doc = document {
                extra.append((NpzReader.metadataMember, NpzSink.unicodeArray(doc.encoded)))
            }
            if !exotic.isEmpty {
                let obj = JSONValue.object(exotic.map { ($0.0, .string($0.1)) })
                extra.append((NpzReader.dtypesMember, NpzSink.unicodeArray(obj.compact)))
            }
            try zip.finish(appending: extra)
        } catch {
            zip.abort()
            throw error
        }
    }

    func abort() { zip.abort() }
}
