import Foundation

/// Reads single-file and sharded safetensors checkpoints.
public struct SafetensorsReader: FormatReader {
    public init() {}
    public var name: String { "safetensors" }
    public var fileExtensions: [String] { [".safetensors", ".safetensors.index.json"] }

    public func sniff(_ prefix: [UInt8], fileSize: Int) -> Bool {
        // 8-byte little-endian header length, then a JSON object.
        guard prefix.count >= 9 else { return false }
        var n: UInt64 = 0
        for i in (0..<8).reversed() { n = n << 8 | UInt64(prefix[i]) }
        guard n >= 2, n <= UInt64(SafetensorsHeader.maxHeaderLength), Int(n) + 8 <= fileSize else { return false }
        var i = 8
        while i < prefix.count, [0x20, 0x09, 0x0A, 0x0D].contains(prefix[i]) { i += 1 }
        return i < prefix.count && prefix[i] == UInt8(ascii: "{")
    }

    public func recognizesFolder(_ path: String) -> Bool {
        let items = (try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []
        return items.contains { $0.hasSuffix(".safetensors") || $0.hasSuffix(".safetensors.index.json") }
    }

    public func read(path: String) throws -> Checkpoint {
        var isDir: ObjCBool = false
        _ = FileManager.default.fileExists(atPath: path, isDirectory: &isDir)
        if isDir.boolValue {
            let items = ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).sorted()
            if let idx = items.first(where: { $0.hasSuffix(".safetensors.index.json") }) {
                return try readIndexed(indexPath: path + "/" + idx, userPath: path)
            }
            let shards = items.filter { $0.hasSuffix(".safetensors") && !$0.hasPrefix(".") }
            guard !shards.isEmpty else {
                throw QConvertError.badInput(path: path, message: "no .safetensors files in the folder")
            }
            return try readShards(folder: path, shardNames: shards, weightMap: nil, userPath: path)
        }
        if path.hasSuffix(".index.json") { return try readIndexed(indexPath: path, userPath: path) }
        let f = try MappedFile(path: path)
        let (entries, meta) = try readFile(f, shard: nil)
        return try checkpoint(path: path, files: [f], entries: entries, metadata: meta, shardNames: nil)
    }

    func readFile(_ f: MappedFile, shard: String?) throws -> ([TensorEntry], [(key: String, value: String)]) {
        let header = try SafetensorsHeader.parse(f.bytes(at: 0, count: f.size), path: f.path)
        let dataStart = 8 + header.headerLength
        let entries = header.tensors.map { t in
            // safetensors checkpoints follow PyTorch's layout: Linear, Conv and Embedding
            // weights keep their output channels (rows) on axis 0.
            TensorEntry(
                name: t.name, dtype: t.dtype, shape: t.shape,
                bytes: .mapped(f, offset: dataStart + t.begin, count: t.end - t.begin),
                outputAxis: t.shape.count >= 2 ? 0 : nil, shard: shard)
        }
        f.release(offset: 0, count: dataStart)
        return (entries, header.metadata)
    }

    func readIndexed(indexPath: String, userPath: String) throws -> Checkpoint {
        guard let data = FileManager.default.contents(atPath: indexPath) else {
            throw QConvertError.io(path: indexPath, message: "cannot read the index")
        }
        let root: JSONValue
        do { root = try data.withUnsafeBytes { try JSONParser.parse($0) } } catch {
            throw QConvertError.badInput(path: indexPath, message: "index is not valid JSON: \(error)")
        }
        guard let wm = root["weight_map"]?.objectValue else {
            throw QConvertError.badInput(path: indexPath, message: "index has no 'weight_map' object")
        }
        var map: [String: String] = [:]
        var shardOrder: [String] = []
        var shardSet = Set<String>()
        for (k, v) in wm {
            guard let s = v.stringValue else {
                throw QConvertError.badInput(path: indexPath, message: "weight_map entry '\(k)' is not a file name")
            }
            guard !s.contains("/"), !s.contains("\\"), s != "..", !s.isEmpty else {
                throw QConvertError.badInput(
                    path: indexPath,
                    message: "weight_map entry '\(k)' names '\(s)', which is not a file beside the index")
            }
            map[k] = s
            if shardSet.insert(s).inserted { shardOrder.append(s) }
        }
        let folder = URL(fileURLWithPath: indexPath).deletingLastPathComponent().path
        return try readShards(folder: folder, shardNames: shardOrder.sorted(), weightMap: map, userPath: userPath)
    }

    func readShards(folder: String, shardNames: [String], weightMap: [String: String]?, userPath: String) throws
        -> Checkpoint
    {
        var files: [MappedFile] = []
        var entries: [TensorEntry] = []
        var metadata: [(key: String, value: String)] = []
        var seen: [String: String] = [:]
        for s in shardNames {
            let f = try MappedFile(path: folder + "/" + s)
            files.append(f)
            let (e, m) = try readFile(f, shard: s)
            for t in e {
                if let other = seen[t.name] {
                    throw QConvertError.badInput(
                        path: userPath, message: "tensor '\(t.name)' appears in both \(other) and \(s)")
                }
                seen[t.name] = s
                if let wm = weightMap, wm[t.name] != s {
                    throw QConvertError.badInput(
                        path: userPath,
                        message: "tensor '\(t.name)' is in \(s) but the index maps it to \(wm[t.name] ?? "nothing")")
                }
            }
            entries += e
            if metadata.isEmpty { metadata = m }
        }
        if let wm = weightMap {
            for (k, s) in wm.sorted(by: { $0.key < $1.key }) where seen[k] == nil {
                throw QConvertError.badInput(
                    path: userPath, message: "index lists tensor '\(k)' in \(s) but that file does not hold it")
            }
        }
        return try checkpoint(
            path: userPath, files: files, entries: entries, metadata: metadata, shardNames: shardNames)
    }

    /// The checkpoint, read as the float model it stands for when it is in the compressed-tensors layout.
    func checkpoint(
        path: String, files: [MappedFile], entries: [TensorEntry], metadata: [(key: String, value: String)],
        shardNames: [String]?
    ) throws -> Checkpoint {
        let hf = try HFModelFolder.detect(input: path)
        var entries = entries
        var dequantized: [String] = []
        if let hf, let groups = try CompressedTensorsReader.groups(hf.config, path: hf.folder + "/config.json") {
            (entries, dequantized) = try CompressedTensorsReader.decode(
                entries, groups: groups, config: hf.config, path: path)
        }
        return Checkpoint(
            format: name, path: path, files: files, entries: entries, metadata: metadata, shardNames: shardNames,
            hfModel: hf, dequantizedOnRead: dequantized)
    }
}
