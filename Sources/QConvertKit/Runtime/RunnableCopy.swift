import Foundation

/// Protobuf fields read straight from a model's wire bytes, for the few things calibration needs
/// without unpacking the weights (bounds were checked by `OnnxWireCheck` first).
struct WireFields {
    let bytes: UnsafeRawBufferPointer
    let path: String

    struct Field {
        var number: UInt64
        var wire: Int
        /// From the field's key to the end of its payload: the bytes that copy it verbatim.
        var whole: Range<Int>
        /// A length-delimited field's payload.
        var payload: Range<Int>
        /// A varint field's value.
        var value: UInt64
    }

    func varint(_ p: inout Int, _ end: Int) throws -> UInt64 {
        var v: UInt64 = 0
        var shift: UInt64 = 0
        while p < end, shift < 64 {
            let byte = bytes[p]
            p += 1
            v |= UInt64(byte & 0x7F) << shift
            if byte < 0x80 { return v }
            shift += 7
        }
        throw QConvertError.badInput(path: path, message: "a truncated varint")
    }

    /// Each field in `range`, in order.
    func each(_ range: Range<Int>, _ body: (Field) throws -> Void) throws {
        var p = range.lowerBound
        let end = range.upperBound
        while p < end {
            let start = p
            let key = try varint(&p, end)
            let wire = Int(key & 7)
            var f = Field(number: key >> 3, wire: wire, whole: start..<start, payload: p..<p, value: 0)
            switch wire {
            case 0: f.value = try varint(&p, end)
            case 1, 5:
                let n = wire == 1 ? 8 : 4
                guard n <= end - p else { throw QConvertError.badInput(path: path, message: "a truncated field") }
                p += n
            case 2:
                let n = try varint(&p, end)
                guard n <= UInt64(end - p) else {
                    throw QConvertError.badInput(path: path, message: "a length beyond its message")
                }
                f.payload = p..<(p + Int(n))
                p += Int(n)
            default: throw QConvertError.badInput(path: path, message: "wire type \(wire)")
            }
            f.whole = start..<p
            try body(f)
        }
    }

    func text(_ r: Range<Int>) -> String {
        String(decoding: UnsafeRawBufferPointer(rebasing: bytes[r]), as: UTF8.self)
    }
}

/// The copy of a model that `calibrate` gives onnxruntime: the same graph, with every large initializer's
/// bytes moved to a data file beside it at page-aligned offsets, which onnxruntime maps instead of
/// reading (a model of inline weights costs it two copies while the session is made: 124 MB of peak RSS
/// for MiniLM-L3's 69 MB, 35 MB mapped). Initializers already in external data are copied into the
/// same data file, so models of any size run from one temporary folder.
enum RunnableCopy {
    /// Initializers of fewer bytes stay inline; moved ones start at multiples of the page size.
    static let moveThreshold = 1024
    static let alignment = 4096

    /// A part of the output: bytes of the source model, or new bytes.
    enum Piece {
        case source(Range<Int>)
        case bytes([UInt8])

        var count: Int {
            switch self {
            case .source(let r): r.count
            case .bytes(let b): b.count
            }
        }
    }

    /// Writes `model` (with `tail` appended) and `model`.data from the model file `file`, whose external
    /// data is looked up beside `sourcePath`. Returns the external data files read (inputs of the run).
    @discardableResult
    static func write(
        _ file: MappedFile, sourcePath: String, model: String, tail: [UInt8], threshold: Int = moveThreshold
    ) throws -> [String] {
        typealias PB = ProtobufBytes
        let src = file.bytes(at: 0, count: file.size)
        let w = WireFields(bytes: src, path: sourcePath)
        let dataName = URL(fileURLWithPath: model).lastPathComponent + ".data"
        let dataOut = try AtomicFile(path: model + ".data")
        defer { dataOut.abort() }
        var dataSize = 0
        var externals: [String: MappedFile] = [:]
        let folder = URL(fileURLWithPath: sourcePath).deletingLastPathComponent().path

        /// Appends `bytes` to the data file at the next aligned offset; returns the entries pointing at it.
        func place(_ bytes: UnsafeRawBufferPointer) throws -> [UInt8] {
            let offset = (dataSize + alignment - 1) / alignment * alignment
            try dataOut.pwrite(bytes, at: offset)
            dataSize = offset + bytes.count
            func entry(_ k: String, _ v: String) -> [UInt8] { PB.ld(13, PB.text(1, k) + PB.text(2, v)) }
            return entry("location", dataName) + entry("offset", "\(offset)") + entry("length", "\(bytes.count)")
                + PB.varint(14 << 3) + PB.varint(1)  // data_location: EXTERNAL
        }

        /// The pieces of one initializer (TensorProto), its payload moved to the data file when large.
        func tensor(_ t: WireFields.Field) throws -> [Piece] {
            var keep: [Piece] = []
            var raw: Range<Int>?
            var external = false
            var entries: [(String, String)] = []
            var name = ""
            try w.each(t.payload) { f in
                switch (f.number, f.wire) {
                case (9, 2): raw = f.payload
                case (14, 0): external = f.value == 1
                case (13, 2):
                    var kv = ("", "")
                    try w.each(f.payload) { e in
                        if e.number == 1, e.wire == 2 { kv.0 = w.text(e.payload) }
                        if e.number == 2, e.wire == 2 { kv.1 = w.text(e.payload) }
                    }
                    entries.append(kv)
                    return
                default:
                    if f.number == 8, f.wire == 2 { name = w.text(f.payload) }
                }
                if f.number != 9 && f.number != 14 { keep.append(.source(f.whole)) }
            }
            var moved: [UInt8]
            if external {
                func bad(_ m: String) -> QConvertError {
                    .badInput(path: sourcePath, message: "tensor '\(name)': external data \(m)")
                }
                let values = Dictionary(entries, uniquingKeysWith: { a, _ in a })
                guard let loc = values["location"], !loc.isEmpty else { throw bad("has no location") }
                let resolved = try OnnxReader.resolveExternal(loc, folder: folder, bad: bad)
                let f: MappedFile
                if let cached = externals[resolved] {
                    f = cached
                } else {
                    f = try MappedFile(path: resolved)
                    externals[resolved] = f
                }
                guard let offset = Int(values["offset"] ?? "0"), offset >= 0, offset <= f.size else {
                    throw bad("has a bad offset")
                }
                guard let length = Int(values["length"] ?? "\(f.size - offset)"), length >= 0,
                    length <= f.size - offset
                else { throw bad("runs past the end of '\(loc)'") }
                moved = try place(f.bytes(at: offset, count: length))
                f.release(offset: offset, count: length)
            } else if let raw, raw.count >= threshold {
                moved = try place(UnsafeRawBufferPointer(rebasing: src[raw]))
                file.release(offset: raw.lowerBound, count: raw.count)
            } else {
                return [.source(t.whole)]
            }
            let size = keep.reduce(0) { $0 + $1.count } + moved.count
            return [.bytes(PB.varint(5 << 3 | 2) + PB.varint(size))] + keep + [.bytes(moved)]
        }

        var pieces: [Piece] = []
        try w.each(0..<src.count) { f in
            guard f.number == 7, f.wire == 2 else {  // ModelProto.graph
                pieces.append(.source(f.whole))
                return
            }
            var graph: [Piece] = []
            try w.each(f.payload) { g in
                if g.number == 5, g.wire == 2 {  // GraphProto.initializer
                    graph += try tensor(g)
                } else {
                    graph.append(.source(g.whole))
                }
            }
            pieces.append(.bytes(PB.varint(7 << 3 | 2) + PB.varint(graph.reduce(0) { $0 + $1.count })))
            pieces += graph
        }
        pieces.append(.bytes(tail))
        try dataOut.commit()

        // small pieces (a node each) are gathered into writes of up to 1 MB
        let out = try AtomicFile(path: model)
        defer { out.abort() }
        var at = 0
        var pending: [UInt8] = []
        func flush() throws {
            try out.pwrite(pending, at: at)
            at += pending.count
            pending.removeAll(keepingCapacity: true)
        }
        for p in pieces {
            switch p {
            case .bytes(let b): pending += b
            case .source(let r) where r.count < 1 << 16: pending += UnsafeRawBufferPointer(rebasing: src[r])
            case .source(let r):
                try flush()
                try out.pwrite(UnsafeRawBufferPointer(rebasing: src[r]), at: at)
                at += r.count
                file.release(offset: r.lowerBound, count: r.count)
            }
            if pending.count >= 1 << 20 { try flush() }
        }
        try flush()
        file.release(offset: 0, count: file.size)
        try out.commit()
        return externals.keys.sorted()
    }
}
