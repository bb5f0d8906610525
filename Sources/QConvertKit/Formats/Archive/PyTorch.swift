import Foundation

/// The object tree of a torch.save archive, kept so that a .pt output reproduces its structure.
final class PTTree: CheckpointContainer, @unchecked Sendable {
    let root: PickleValue
    init(root: PickleValue) { self.root = root }
}

/// Reads PyTorch `torch.save` zip archives (.pt, .pth, .bin) through the restricted pickle machine.
public struct PyTorchReader: FormatReader {
    public init() {}
    public var name: String { "pytorch" }
    public var fileExtensions: [String] { [".pt", ".pth", ".bin", ".ckpt", ".bin.index.json"] }

    static let legacyMagic: [UInt8] = [
        0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19
    ]

    /// A zip whose first member sits in a folder (`archive/data.pkl`), or a legacy torch.save file.
    public func sniff(_ prefix: [UInt8], fileSize: Int) -> Bool {
        if prefix.starts(with: PyTorchReader.legacyMagic) { return true }
        guard prefix.count >= 30, prefix[0] == 0x50, prefix[1] == 0x4B, prefix[2] == 3, prefix[3] == 4 else {
            return false
        }
        let nl = Int(prefix[26]) | Int(prefix[27]) << 8
        let name = String(decoding: prefix[30..<min(prefix.count, 30 + nl)], as: UTF8.self)
        return name.contains("/") && !name.hasSuffix(".npy")
    }

    public func recognizesFolder(_ path: String) -> Bool {
        ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).contains {
            $0.hasSuffix(".bin.index.json") || $0 == "pytorch_model.bin"
        }
    }

    /// Reads the file, the index or the folder; a Hugging Face model folder (config.json beside the
    /// weights) is marked as one, so that a folder output becomes a model folder.
    public func read(path: String) throws -> Checkpoint {
        let ck = try readWeights(path: path)
        guard let hf = try HFModelFolder.detect(input: path) else { return ck }
        return Checkpoint(
            format: ck.format, path: ck.path, files: ck.files, entries: ck.entries, metadata: ck.metadata,
            shardNames: ck.shardNames, container: ck.container, hfModel: hf)
    }

    func readWeights(path: String) throws -> Checkpoint {
        func bad(_ m: String) -> QConvertError { .badInput(path: path, message: m) }
        var isDir: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDir), isDir.boolValue,
            !recognizesFolderIndex(path), FileManager.default.fileExists(atPath: path + "/pytorch_model.bin")
        {
            let ck = try readWeights(path: path + "/pytorch_model.bin")
            return Checkpoint(
                format: ck.format, path: path, files: ck.files, entries: ck.entries, metadata: ck.metadata,
                container: ck.container)
        }
        if path.hasSuffix(".index.json") || isDir.boolValue {
            return try readIndexed(path)
        }
        if let head = try? FormatRegistry.readPrefix(path, count: 16), head.starts(with: PyTorchReader.legacyMagic) {
            return try readLegacy(path: path)
        }
        let zip = try ZipArchive(path: path)
        guard let first = zip.members.first, let slash = first.name.firstIndex(of: "/") else {
            throw bad("not a torch.save archive (no 'archive/' folder)")
        }
        let prefix = String(first.name[..<slash])
        if zip.member(named: prefix + "/constants.pkl") != nil
            || zip.members.contains(where: { $0.name.hasPrefix(prefix + "/code/") })
        {
            throw bad(
                "this is a TorchScript archive (torch.jit.save: code/ and constants.pkl), not a checkpoint; save the state_dict with torch.save instead"
            )
        }
        if let bo = zip.member(named: prefix + "/byteorder") {
            let text = String(decoding: try zip.bytes(bo).withUnsafeBytes { Array($0) }, as: UTF8.self)
            guard text.hasPrefix("little") else {
                throw bad("byteorder '\(text)' is not supported (only little-endian)")
            }
        }
        guard let pkl = zip.member(named: prefix + "/data.pkl") else {
            throw bad("no \(prefix)/data.pkl in the archive")
        }
        let pklBytes = try zip.bytes(pkl)
        var storageBytes: [String: TensorBytes] = [:]
        let root: PickleValue
        do {
            root = try pklBytes.withUnsafeBytes { raw -> PickleValue in
                var u = Unpickler(raw) { pid in
                    let st = try PyTorchReader.storage(pid)
                    guard let rec = zip.member(named: "\(prefix)/data/\(st.key)") else {
                        throw PickleRule.storage("storage '\(st.key)' has no record \(prefix)/data/\(st.key)")
                    }
                    let elsize = max(st.dtype.bits / 8, 1)
                    guard case (let need, false) = st.numel.multipliedReportingOverflow(by: elsize), need == rec.size
                    else {
                        throw PickleRule.storage(
                            "storage '\(st.key)' declares \(st.numel) elements of \(st.dtype.rawValue) but its record holds \(rec.size) bytes"
                        )
                    }
                    if storageBytes[st.key] == nil {
                        storageBytes[st.key] = try zip.bytes(rec, deferCRC: true)
                    }
                    return .storage(st)
                }
                return try u.load()
            }
        } catch let f as PickleRule {
            throw QConvertError.violation(path: path, PickleRule.inMember("\(prefix)/data.pkl", f))
        }
        var metadata: [(key: String, value: String)] = []
        if let m = zip.member(named: "\(prefix)/\(MetadataDocument.key).json") {
            metadata.append(
                (MetadataDocument.key, String(decoding: try zip.bytes(m).withUnsafeBytes { Array($0) }, as: UTF8.self)))
        }
        let ck = try checkpoint(root: root, storageBytes: storageBytes, file: zip.file, metadata: metadata, path: path)
        return ck
    }

    func recognizesFolderIndex(_ path: String) -> Bool {
        ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).contains {
            $0.hasSuffix(".bin.index.json")
        }
    }

    /// Sharded checkpoints: `pytorch_model.bin.index.json` (or its folder) naming the shard of each tensor.
    func readIndexed(_ path: String) throws -> Checkpoint {
        var index = path
        if !path.hasSuffix(".index.json") {
            let items = ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted()
            guard let i = items.first(where: { $0.hasSuffix(".bin.index.json") }) else {
                throw QConvertError.badInput(path: path, message: "folder holds no pytorch_model.bin.index.json")
            }
            index = path + "/" + i
        }
        guard let data = FileManager.default.contents(atPath: index) else {
            throw QConvertError.io(path: index, message: "cannot read the index")
        }
        let root: JSONValue
        do { root = try data.withUnsafeBytes { try JSONParser.parse($0) } } catch {
            throw QConvertError.badInput(path: index, message: "index is not valid JSON: \(error)")
        }
        guard let wm = root["weight_map"]?.objectValue else {
            throw QConvertError.badInput(path: index, message: "index has no 'weight_map' object")
        }
        var shards: [String] = []
        var shardSet = Set<String>()
        var want: [String: String] = [:]
        for (k, v) in wm {
            guard let s = v.stringValue, ZipArchive.isSafeName(s), !s.contains("/") else {
                throw QConvertError.badInput(
                    path: index, message: "weight_map entry '\(k)' does not name a file beside the index")
            }
            // A shard that is itself an index (this one, or another) would be read recursively.
            guard !s.lowercased().hasSuffix(".json") else {
                throw QConvertError.badInput(
                    path: index, message: "weight_map entry '\(k)' names '\(s)', an index, not a shard")
            }
            want[k] = s
            if shardSet.insert(s).inserted { shards.append(s) }
        }
        let folder = URL(fileURLWithPath: index).deletingLastPathComponent().path
        var files: [MappedFile] = []
        var entries: [TensorEntry] = []
        var seen = Set<String>()
        for s in shards.sorted() {
            let part = try readWeights(path: folder + "/" + s)
            files += part.files
            for var e in part.entries {
                guard seen.insert(e.name).inserted else {
                    throw QConvertError.badInput(path: index, message: "tensor '\(e.name)' appears in two shards")
                }
                e.shard = s
                entries.append(e)
            }
        }
        for (k, s) in want.sorted(by: { $0.key < $1.key }) where !seen.contains(k) {
            throw QConvertError.badInput(
                path: index, message: "index lists tensor '\(k)' in \(s) but that file does not hold it")
        }
        return Checkpoint(format: name, path: path, files: files, entries: entries, shardNames: shards.sorted())
    }

    /// A persistent id ('storage', class, key, location, numel[, None]) as a storage.
    static func storage(_ pid: PickleValue) throws -> PTStorage {
        guard case .tuple(let t) = pid, t.count >= 5, case .string("storage") = t[0],
            case .global(let m, let cls) = t[1], case .string(let key) = t[2], case .int(let numel) = t[4], numel >= 0
        else {
            throw PickleRule.storage("unsupported persistent id")
        }
        let untyped = (m == "torch.storage" || m == "torch") && (cls == "UntypedStorage" || cls == "TypedStorage")
        guard let dtype = untyped ? DType.u8 : TorchTypes.storages[cls] else {
            throw PickleRule.storage("storage class '\(m).\(cls)' is not supported")
        }
        return PTStorage(key: key, dtype: dtype, numel: numel)
    }

    /// Legacy (pre-zip) torch.save: five pickles (magic, protocol, sys_info, the object, the storage
    /// keys), then each storage as an int64 element count and its raw bytes, in key-list order.
    func readLegacy(path: String) throws -> Checkpoint {
        func bad(_ m: String) -> QConvertError { .badInput(path: path, message: "legacy torch.save file: \(m)") }
        let f = try MappedFile(path: path)
        var storages: [String: PTStorage] = [:]
        var root: PickleValue = .none
        var keys: [String] = []
        var pos = 0
        do {
            let raw = f.bytes(at: 0, count: f.size)
            func next(_ load: @escaping (PickleValue) throws -> PickleValue) throws -> PickleValue {
                var u = Unpickler(UnsafeRawBufferPointer(rebasing: raw[pos...]), persistentLoad: load)
                let v = try u.load()
                pos += u.pos
                return v
            }
            let noPid: (PickleValue) throws -> PickleValue = { _ in throw PickleRule.storage("unexpected persistent id")
            }
            guard case .bigInt(let magic) = try next(noPid),
                magic == [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]
            else {
                throw bad("bad magic number")
            }
            guard case .int(let proto) = try next(noPid), proto == 1001 else {
                throw bad("unsupported protocol version")
            }
            guard case .dict(let info) = try next(noPid) else { throw bad("bad sys_info") }
            for (k, v) in info.items {
                if case .string("little_endian") = k, case .bool(false) = v {
                    throw bad("big-endian files are not supported")
                }
            }
            root = try next { pid in
                let st = try PyTorchReader.storage(pid)
                if let seen = storages[st.key], seen.dtype != st.dtype {
                    throw PickleRule.storage("storage '\(st.key)' used with two types")
                }
                if let seen = storages[st.key], seen.numel >= st.numel { return .storage(seen) }
                storages[st.key] = st
                return .storage(st)
            }
            guard case .list(let keyList) = try next(noPid) else { throw bad("missing storage key list") }
            keys = try keyList.items.map {
                guard case .string(let s) = $0 else { throw bad("storage key is not a string") }
                return s
            }
        } catch let u as PickleRule {
            throw QConvertError.violation(path: path, PickleRule.inMember("legacy torch.save file", u))
        }
        var storageBytes: [String: TensorBytes] = [:]
        for key in keys {
            guard let st = storages[key] else { throw bad("storage '\(key)' is listed but never used") }
            guard pos + 8 <= f.size else { throw bad("storage '\(key)' runs past the end of the file") }
            let numel = Int(Int64(littleEndian: f.bytes(at: pos, count: 8).loadUnaligned(as: Int64.self)))
            let elsize = max(st.dtype.bits / 8, 1)
            guard numel >= 0, case (let n, false) = numel.multipliedReportingOverflow(by: elsize), numel >= st.numel,
                n <= f.size - pos - 8
            else { throw bad("storage '\(key)' runs past the end of the file") }
            storageBytes[key] = .mapped(f, offset: pos + 8, count: n)
            pos += 8 + n
        }
        for (key, _) in storages where storageBytes[key] == nil { throw bad("storage '\(key)' has no data") }
        return try checkpoint(root: root, storageBytes: storageBytes, file: f, metadata: [], path: path)
    }

    func checkpoint(
        root: PickleValue, storageBytes: [String: TensorBytes], file: MappedFile,
        metadata: [(key: String, value: String)], path: String
    ) throws -> Checkpoint {
        func bad(_ m: String) -> QConvertError { .badInput(path: path, message: m) }
        let tree = PTTree(root: root)
        var entries: [TensorEntry] = []
        var seen: [String: Int] = [:]
        var names = Set<String>()
        // Values shared through the pickle's memo are walked once per place they appear: a few hundred
        // bytes can describe a tree of 2^60 places. Past `maxPlaces` the file is refused.
        var places = 0
        let maxPlaces = 1 << 22
        func walk(_ v: PickleValue, _ keyPath: String, _ depth: Int) throws {
            guard depth < 200 else { throw bad("object nesting deeper than 200 levels") }
            places += 1
            guard places <= maxPlaces else {
                throw bad("the pickle's values expand to more than \(maxPlaces) places (shared references repeated)")
            }
            switch v {
            case .tensor(let t):
                let id = "\(t.storage.key)|\(t.offset)|\(t.shape)|\(t.stride)|\(t.dtype.rawValue)"
                if let e = seen[id] {
                    t.entry = e
                } else {
                    var name = keyPath.isEmpty ? "tensor" : keyPath
                    var k = 2
                    while names.contains(name) {
                        name = "\(keyPath)#\(k)"
                        k += 1
                    }
                    names.insert(name)
                    let bytes = try PyTorchReader.tensorBytes(
                        t, storage: storageBytes[t.storage.key]!, name: name, path: path)
                    t.entry = entries.count
                    seen[id] = entries.count
                    entries.append(
                        TensorEntry(
                            name: name, dtype: t.dtype, shape: t.shape, bytes: bytes,
                            outputAxis: t.shape.count >= 2 ? 0 : nil))
                }
            case .dict(let d):
                for (k, item) in d.items {
                    let ks: String
                    switch k {
                    case .string(let s): ks = s
                    case .int(let i): ks = String(i)
                    default: ks = "?"
                    }
                    try walk(item, keyPath.isEmpty ? ks : keyPath + "." + ks, depth + 1)
                }
            case .list(let l):
                for (i, item) in l.items.enumerated() {
                    try walk(item, keyPath.isEmpty ? "\(i)" : "\(keyPath).\(i)", depth + 1)
                }
            case .tuple(let items):
                for (i, item) in items.enumerated() {
                    try walk(item, keyPath.isEmpty ? "\(i)" : "\(keyPath).\(i)", depth + 1)
                }
            default: break
            }
        }
        try walk(root, "", 0)
        return Checkpoint(
            format: name, path: path, files: [file], entries: entries, metadata: metadata, container: tree)
    }

    /// A tensor's bytes, contiguous: in place when the view is, gathered when it is strided.
    static func maxMaterialized(storageBytes: Int) -> Int {
        let (scaled, o) = storageBytes.multipliedReportingOverflow(by: 64)
        return o ? Int.max : scaled + 256 << 20
    }

    static func tensorBytes(_ t: PTTensor, storage: TensorBytes, name: String, path: String) throws -> TensorBytes {
        func bad(_ m: String) -> QConvertError { .badInput(path: path, message: "tensor '\(name)': \(m)") }
        let elsize = max(t.dtype.bits / 8, 1)
        guard t.shape.count == t.stride.count, t.shape.allSatisfy({ $0 >= 0 }), t.stride.allSatisfy({ $0 >= 0 }),
            t.offset >= 0
        else {
            throw bad("negative size, stride or offset")
        }
        guard let n = Shape(t.shape).checkedElementCount else { throw bad("shape overflows") }
        let capacity = storage.count / elsize
        if n > 0 {
            var last = t.offset
            for (s, st) in zip(t.shape, t.stride) {
                let (p, o1) = (s - 1).multipliedReportingOverflow(by: st)
                let (q, o2) = last.addingReportingOverflow(p)
                guard !o1, !o2 else { throw bad("view extent overflows") }
                last = q
            }
            guard last < capacity else { throw bad("view reaches element \(last) of a storage holding \(capacity)") }
        }
        let (byteCount, overflow) = n.multipliedReportingOverflow(by: elsize)
        guard !overflow else { throw bad("byte count of shape \(t.shape) overflows") }
        var contiguous = [Int](repeating: 1, count: t.shape.count)
        for k in stride(from: t.shape.count - 2, through: 0, by: -1) {
            contiguous[k] = contiguous[k + 1] * t.shape[k + 1]
        }
        let isContiguous =
            n <= 1 || zip(zip(t.shape, t.stride), contiguous).allSatisfy { $0.0.0 == 1 || $0.0.1 == $0.1 }
        if isContiguous {
            if let w = storage.window(offset: t.offset * elsize, count: byteCount) { return w }
            return .owned(
                try storage.withUnsafeBytes { Array($0[(t.offset * elsize)..<(t.offset * elsize + byteCount)]) })
        }
        // A strided view is gathered into memory; one that repeats elements (stride 0) can describe far
        // more bytes than its storage holds. Past 64 times the storage plus 256 MB it is refused.
        guard byteCount <= PyTorchReader.maxMaterialized(storageBytes: storage.count) else {
            throw bad(
                "a view of \(byteCount) bytes over a storage of \(storage.count) bytes is more than qconvert gathers (64 × the storage + 256 MB)"
            )
        }
        var out = [UInt8](repeating: 0, count: byteCount)
        try storage.withUnsafeBytes { src in
            var idx = [Int](repeating: 0, count: t.shape.count)
            for e in 0..<n {
                let s = t.offset + zip(idx, t.stride).reduce(0) { $0 + $1.0 * $1.1 }
                for b in 0..<elsize { out[e * elsize + b] = src[s * elsize + b] }
                var k = t.shape.count - 1
                while k >= 0 {
                    idx[k] += 1
                    if idx[k] < t.shape[k] { break }
                    idx[k] = 0
                    k -= 1
                }
            }
        }
        return .owned(out)
    }
}

/// Writes torch.save archives that `torch.load(weights_only=True)` reads (also with mmap=True):
/// a protocol-2 pickle, stored members, 64-byte aligned data, fixed timestamps.
public struct PyTorchWriter: FormatWriter {
    public init() {}
    public var name: String { "pytorch" }
    public var fileExtensions: [String] { [".pt", ".pth", ".bin", ".ckpt"] }

    public func open(path: String, tensors: [OutputTensor], source: Checkpoint, options: WriterOptions) throws
        -> CheckpointSink
    {
        var archive = URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent
        archive = String(archive.map { $0.isLetter || $0.isNumber || $0 == "_" || $0 == "-" || $0 == "." ? $0 : "_" })
        if archive.isEmpty { archive = "archive" }
        let zip = try ZipWriter(
            path: path, members: tensors.enumerated().map { ("\(archive)/data/\($0.offset)", $0.element.byteCount, 64) }
        )
        return PyTorchSink(zip: zip, archive: archive, tensors: tensors, source: source, options: options)
    }
}

final class PyTorchSink: CheckpointSink {
    let zip: ZipWriter
    let archive: String
    let tensors: [OutputTensor]
    let source: Checkpoint
    let options: WriterOptions

    init(zip: ZipWriter, archive: String, tensors: [OutputTensor], source: Checkpoint, options: WriterOptions) {
        self.zip = zip
        self.archive = archive
        self.tensors = tensors
        self.source = source
        self.options = options
    }

    func put(_ index: Int, _ bytes: UnsafeRawBufferPointer) throws { try zip.write(index, bytes) }

    func abort() { zip.abort() }

    func commit(
        metadata: [(key: String, value: String)], document: MetadataDocument?, perShard: [String: MetadataDocument]
    ) throws {
        do {
            var p = Pickler { k in (String(k), self.tensors[k].dtype, Shape(self.tensors[k].shape).elementCount) }
            if let tree = source.container as? PTTree, !options.plans.isEmpty {
                // entry index → its output tensors
                var outputs: [Int: [Int]] = [:]
                let byPlan = OutputRole.outputsByPlan(tensors, planCount: options.plans.count)
                for (pi, plan) in options.plans.enumerated() { outputs[plan.entryIndex] = byPlan[pi] }
                let root = rebuild(tree.root, outputs: outputs, emitted: Box(Set<Int>()))
                p.value(root) { pk, t in
                    let o = t.entry < 0 ? -1 - t.entry : (outputs[t.entry]?.first ?? 0)
                    // integer tensors cannot require gradients (nor be trainable Parameters)
                    let isFloat = self.tensors[o].dtype.isFloatingPoint
                    pk.tensor(
                        o, shape: self.tensors[o].shape, parameter: t.isParameter && isFloat,
                        requiresGrad: t.requiresGrad && isFloat)
                }
            } else {
                let d = PickleDict()
                d.ordered = true
                for (k, t) in tensors.enumerated() {
                    let pt = PTTensor(
                        storage: PTStorage(key: String(k), dtype: t.dtype, numel: 0),
                        dtype: t.dtype, offset: 0, shape: t.shape, stride: [])
                    pt.entry = k
                    d.items.append((.string(t.name), .tensor(pt)))
                }
                p.value(.dict(d)) { pk, t in
                    pk.tensor(t.entry, shape: self.tensors[t.entry].shape, parameter: false, requiresGrad: false)
                }
            }
            var extra: [(String, [UInt8])] = [
                ("\(archive)/data.pkl", p.finish()),
                ("\(archive)/byteorder", Array("little".utf8)),
                ("\(archive)/version", Array("3\n".utf8))
            ]
            if let doc = document {
                extra.append(("\(archive)/\(MetadataDocument.key).json", Array(doc.encoded.utf8)))
            }
            try zip.finish(appending: extra)
        } catch {
            zip.abort()
            throw error
        }
    }

    /// The source tree with each converted tensor's parameters inserted beside it (once, for tied tensors).
    func rebuild(_ v: PickleValue, outputs: [Int: [Int]], emitted: Box<Set<Int>>) -> PickleValue {
        switch v {
        case .dict(let d):
            let n = PickleDict()
            n.ordered = d.ordered
            n.state = d.state
            for (k, item) in d.items {
                n.items.append((k, rebuild(item, outputs: outputs, emitted: emitted)))
                if case .tensor(let t) = item, case .string(let key) = k, let outs = outputs[t.entry], outs.count > 1,
                    !emitted.value.contains(t.entry)
                {
                    emitted.value.insert(t.entry)
                    // The planner named the parameters (and made the names unique: a checkpoint may already
                    // hold a `w_scale`); here they sit beside the values under the same relative suffix.
                    let valuesName = tensors[outs[0]].name
                    for (fallback, o) in Swift.zip(["_scale", "_zero_point"], outs.dropFirst()) {
                        let full = tensors[o].name
                        let suffix = full.hasPrefix(valuesName) ? String(full.dropFirst(valuesName.count)) : fallback
                        let pt = PTTensor(
                            storage: t.storage, dtype: tensors[o].dtype, offset: 0, shape: tensors[o].shape, stride: [])
                        pt.entry = -1 - o
                        n.items.append((.string(key + suffix), .tensor(pt)))
                    }
                }
            }
            return .dict(n)
        case .list(let l):
            let n = PickleList()
            n.items = l.items.map { rebuild($0, outputs: outputs, emitted: emitted) }
            return .list(n)
        case .tuple(let items): return .tuple(items.map { rebuild($0, outputs: outputs, emitted: emitted) })
        case .tensor(let t):
            let nt = PTTensor(storage: t.storage, dtype: t.dtype, offset: 0, shape: t.shape, stride: [])
            nt.entry = t.entry
            nt.isParameter = t.isParameter && t.dtype.isFloatingPoint
            nt.requiresGrad = t.requiresGrad
            return .tensor(nt)
        default: return v
        }
    }
}
