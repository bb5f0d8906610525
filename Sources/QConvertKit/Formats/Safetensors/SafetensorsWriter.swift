import Foundation

/// Writes safetensors files the reference library reads: header first (computed from the
/// declared tensors), tensor data streamed in as it is produced, metadata filled in at the end.
public struct SafetensorsWriter: FormatWriter {
    public init() {}
    public var name: String { "safetensors" }
    public var fileExtensions: [String] { [".safetensors"] }

    public func open(path: String, tensors declared: [OutputTensor], source: Checkpoint, options: WriterOptions)
        throws -> CheckpointSink
    {
        var tensors = declared
        var layout: CompressedTensors.Layout? = nil
        if options.layout == .compressedTensors {
            let l = try CompressedTensors.layout(
                declared: declared, plans: options.plans, modelDType: CompressedTensors.scaleDType(source))
            tensors = l.tensors
            layout = l
        }
        var seen = Set<String>()
        for t in tensors where !seen.insert(t.name).inserted {
            throw QConvertError.usage(message: "output would hold two tensors named '\(t.name)'")
        }
        for t in tensors where t.dtype.safetensorsName == nil {
            throw QConvertError.usage(message: "tensor '\(t.name)': safetensors has no \(t.dtype.rawValue) dtype")
        }
        let isFile = path.hasSuffix(".safetensors")
        var plan: [(file: String, members: [Int])] = []
        if isFile {
            if options.maxShardSize != nil {
                throw QConvertError.usage(
                    message: "\(path): --max-shard-size writes a folder of shards; give a folder as the output")
            }
            plan = [(path, Array(tensors.indices))]
        } else {
            if let max = options.maxShardSize {
                var groups: [[Int]] = [[]]
                var size = 0
                for (i, t) in tensors.enumerated() {
                    if !groups[groups.count - 1].isEmpty && size + t.byteCount > max {
                        groups.append([])
                        size = 0
                    }
                    groups[groups.count - 1].append(i)
                    size += t.byteCount
                }
                let n = groups.count
                plan = groups.enumerated().map { k, g in
                    (n == 1 ? "model.safetensors" : String(format: "model-%05d-of-%05d.safetensors", k + 1, n), g)
                }
            } else if tensors.contains(where: { $0.shard != nil }) {
                var order: [String] = []
                var members: [String: [Int]] = [:]
                for (i, t) in tensors.enumerated() {
                    let s = t.shard ?? "model.safetensors"
                    if members[s] == nil { order.append(s) }
                    members[s, default: []].append(i)
                }
                plan = order.sorted().map { ($0, members[$0]!) }
            } else {
                plan = [("model.safetensors", Array(tensors.indices))]
            }
        }
        // A folder is built whole beside its final name and swapped in on commit.
        let folder = isFile ? nil : try FolderOutput(path: path)
        if let folder { plan = plan.map { (folder.stagingPath + "/" + $0.file, $0.members) } }
        do {
            let sink = try SafetensorsSink(
                folder: folder, plan: plan, tensors: tensors, metadataHint: options.metadataSizeHint)
            if let hf = source.hfModel, folder != nil {
                // a model folder in, a model folder out: its other files travel with the weights
                sink.folderFiles = try hf.companions().map { .copy(from: hf.folder + "/" + $0, to: $0) }
                // config.json describes the layout written: a compressed-tensors input read as floats and
                // written in another layout loses its quantization_config
                let describe = options.layout == .compressedTensors
                if describe || !source.dequantizedOnRead.isEmpty,
                    let config = CompressedTensors.config(plans: describe ? options.plans : [], source: source)
                {
                    sink.folderFiles.removeAll { $0.name == "config.json" }
                    sink.folderFiles.append(.contents(name: "config.json", Array((config.pretty() + "\n").utf8)))
                }
            }
            if let layout { return try CompressedTensorsSink(inner: sink, layout: layout) }
            return sink
        } catch {
            folder?.abort()
            throw error
        }
    }
}

final class SafetensorsSink: CheckpointSink {
    struct ShardFile {
        var path: String
        var file: AtomicFile
        /// Output-tensor indices in the header's (reference writer) order.
        var order: [Int]
        var begins: [Int: Int]
        var dataLength: Int
        var reserved: Int
    }

    let folder: FolderOutput?
    let tensors: [OutputTensor]
    var shards: [ShardFile] = []
    /// Files written into the output folder beside the weights (a model folder's other files).
    var folderFiles: [FolderFile] = []
    /// Output tensor index → (shard, absolute file offset).
    var location: [(shard: Int, offset: Int)]

    init(folder: FolderOutput?, plan: [(file: String, members: [Int])], tensors: [OutputTensor], metadataHint: Int)
        throws
    {
        self.folder = folder
        self.tensors = tensors
        location = Array(repeating: (0, 0), count: tensors.count)
        do {
            for (si, p) in plan.enumerated() {
                // The reference writer's order: dtype by decreasing alignment, then name.
                let order = p.members.sorted {
                    let a = tensors[$0]
                    let b = tensors[$1]
                    if a.dtype.safetensorsAlignmentRank != b.dtype.safetensorsAlignmentRank {
                        return a.dtype.safetensorsAlignmentRank > b.dtype.safetensorsAlignmentRank
                    }
                    return Array(a.name.utf8).lexicographicallyPrecedes(Array(b.name.utf8))
                }
                var begins: [Int: Int] = [:]
                var off = 0
                for i in order {
                    begins[i] = off
                    off += tensors[i].byteCount
                }
                let share =
                    plan.count > 0 ? metadataHint * max(p.members.count, 1) / max(tensors.count, 1) : metadataHint
                let provisional = SafetensorsSink.headerJSON(
                    order: order, begins: begins, tensors: tensors,
                    metadata: [("qconvert", String(repeating: " ", count: share + 256))])
                let reserved = (provisional.utf8.count + 7) / 8 * 8
                let file = try AtomicFile(path: p.file)
                try file.truncate(8 + reserved + off)
                for i in order { location[i] = (si, 8 + reserved + begins[i]!) }
                shards.append(
                    ShardFile(
                        path: p.file, file: file, order: order, begins: begins, dataLength: off, reserved: reserved))
            }
        } catch {
            for s in shards { s.file.abort() }
            throw error
        }
    }

    static func headerJSON(
        order: [Int], begins: [Int: Int], tensors: [OutputTensor], metadata: [(key: String, value: String)]
    ) -> String {
        var out = "{"
        var first = true  // (String.count walks the whole string: asking it per tensor was quadratic)
        if !metadata.isEmpty {
            first = false
            out += "\"__metadata__\":{"
            for (k, (key, value)) in metadata.enumerated() {
                if k > 0 { out += "," }
                JSONValue.writeString(key, &out)
                out += ":"
                JSONValue.writeString(value, &out)
            }
            out += "}"
        }
        for i in order {
            let t = tensors[i]
            if !first { out += "," }
            first = false
            JSONValue.writeString(t.name, &out)
            let b = begins[i]!
            out +=
                ":{\"dtype\":\"\(t.dtype.safetensorsName!)\",\"shape\":[\(t.shape.map(String.init).joined(separator: ","))],\"data_offsets\":[\(b),\(b + t.byteCount)]}"
        }
        return out + "}"
    }

    func put(_ index: Int, _ bytes: UnsafeRawBufferPointer) throws {
        guard bytes.count == tensors[index].byteCount else {
            throw QConvertError.internal(
                message:
                    "tensor \(tensors[index].name): \(bytes.count) bytes for a declared \(tensors[index].byteCount)")
        }
        let loc = location[index]
        try shards[loc.shard].file.pwrite(bytes, at: loc.offset)
    }

    func commit(
        metadata: [(key: String, value: String)], document: MetadataDocument?, perShard: [String: MetadataDocument]
    ) throws {
        do {
            for k in shards.indices {
                let name = URL(fileURLWithPath: shards[k].path).lastPathComponent
                let meta = MetadataDocument.entries(metadata, perShard[name] ?? document)
                let s = shards[k]
                var json = SafetensorsSink.headerJSON(
                    order: s.order, begins: s.begins, tensors: tensors, metadata: meta)
                let need = json.utf8.count
                if need <= s.reserved {
                    json += String(repeating: " ", count: s.reserved - need)
                    var head = [UInt8](repeating: 0, count: 8)
                    withUnsafeBytes(of: UInt64(s.reserved).littleEndian) { head = Array($0) }
                    try s.file.pwrite(head + Array(json.utf8), at: 0)
                } else {
                    try relocate(k, json: json)
                }
            }
            if shards.count > 1, let folder {
                let index = indexJSON(metadata: MetadataDocument.entries(metadata, document))
                let f = try AtomicFile(path: folder.stagingPath + "/model.safetensors.index.json")
                do {
                    try f.pwrite(Array(index.utf8), at: 0)
                    try f.commit()
                } catch {
                    f.abort()
                    throw error
                }
            }
            for s in shards { try s.file.commit() }
            if let folder { try FolderFile.write(folderFiles, into: folder) }
            try folder?.commit()
        } catch {
            abort()
            throw error
        }
    }

    /// The header outgrew its reservation: write a new file with a larger header.
    func relocate(_ k: Int, json: String) throws {
        let s = shards[k]
        let padded = (json.utf8.count + 7) / 8 * 8
        let nf = try AtomicFile(path: s.path)
        do {
            var head = [UInt8](repeating: 0, count: 8)
            withUnsafeBytes(of: UInt64(padded).littleEndian) { head = Array($0) }
            try nf.pwrite(head + Array((json + String(repeating: " ", count: padded - json.utf8.count)).utf8), at: 0)
            var off = 0
            let chunk = 16 << 20
            while off < s.dataLength {
                let n = min(chunk, s.dataLength - off)
                let buf = try s.file.pread(count: n, at: 8 + s.reserved + off)
                try nf.pwrite(buf, at: 8 + padded + off)
                off += n
            }
        } catch {
            nf.abort()
            throw error
        }
        s.file.abort()
        shards[k].file = nf
    }

    func indexJSON(metadata: [(key: String, value: String)]) -> String {
        let total = tensors.reduce(0) { $0 + $1.byteCount }
        var fileOf: [(String, String)] = []
        for s in shards {
            let name = URL(fileURLWithPath: s.path).lastPathComponent
            for i in s.order { fileOf.append((tensors[i].name, name)) }
        }
        fileOf.sort { Array($0.0.utf8).lexicographicallyPrecedes(Array($1.0.utf8)) }
        var out = "{\n  \"metadata\": {\n    \"total_size\": \(total)"
        for (k, v) in metadata {
            out += ",\n    "
            JSONValue.writeString(k, &out)
            out += ": "
            JSONValue.writeString(v, &out)
        }
        out += "\n  },\n  \"weight_map\": {\n"
        out += fileOf.map { kv in
            var line = "    "
            JSONValue.writeString(kv.0, &line)
            line += ": "
            JSONValue.writeString(kv.1, &line)
            return line
        }.joined(separator: ",\n")
        return out + "\n  }\n}\n"
    }

    func abort() {
        for s in shards { s.file.abort() }
        folder?.abort()
    }
}

/// A file of an output folder other than the weights.
enum FolderFile {
    case copy(from: String, to: String)
    case contents(name: String, [UInt8])

    var name: String {
        switch self {
        case .copy(_, let to): return to
        case .contents(let name, _): return name
        }
    }

    /// Writes the files into the folder's staging copy (copies, never links: the input stays untouched
    /// whatever is done to the output later).
    static func write(_ files: [FolderFile], into folder: FolderOutput) throws {
        let fm = FileManager.default
        for f in files {
            let dst = folder.stagingPath + "/" + f.name
            let parent = URL(fileURLWithPath: dst).deletingLastPathComponent().path
            do {
                try fm.createDirectory(atPath: parent, withIntermediateDirectories: true)
                switch f {
                case .copy(let from, _): try fm.copyItem(atPath: from, toPath: dst)
                case .contents(_, let bytes):
                    guard fm.createFile(atPath: dst, contents: Data(bytes)) else {
                        throw QConvertError.write(path: folder.finalPath, message: "cannot write \(f.name)")
                    }
                }
            } catch let e as QConvertError {
                throw e
            } catch {
                throw QConvertError.write(
                    path: folder.finalPath,
                    message: "cannot copy \(f.name) into the output: \(error.localizedDescription)")
            }
        }
    }
}
