import Foundation

/// The format plugins, and how a path is matched to one: content first, then extension.
public enum FormatRegistry {
    public static let readers: [FormatReader] = [
        SafetensorsReader(), OnnxReader(), NpzReader(), PyTorchReader(), GGUFReader()
    ]
    public static let writers: [FormatWriter] = [
        SafetensorsWriter(), OnnxWriter(), NpzWriter(), PyTorchWriter(), GGUFWriter()
    ]

    /// The reader for an input path: by magic bytes, then by extension.
    public static func reader(for path: String) throws -> FormatReader {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw QConvertError.io(path: path, message: "no such file or folder")
        }
        if isDir.boolValue {
            if let r = readers.first(where: { $0.recognizesFolder(path) }) { return r }
            throw QConvertError.badInput(
                path: path, message: "folder holds no checkpoint qconvert can read (no *.safetensors or *.index.json)")
        }
        let prefix = try readPrefix(path, count: 64)
        let size = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0
        if let r = readers.first(where: { $0.sniff(prefix, fileSize: size) }) { return r }
        let lower = path.lowercased()
        if let r = readers.first(where: { $0.fileExtensions.contains { lower.hasSuffix($0) } }) { return r }
        throw QConvertError.badInput(
            path: path, message: "unknown checkpoint format (supported: \(readers.map(\.name).joined(separator: ", ")))"
        )
    }

    /// The writer for an output path: `format` if given, else by extension; a path
    /// without a known extension is a folder of shards in the input's format.
    /// The writer for an output path: by `format` when given (it must agree with a known extension),
    /// else by the extension; a path without one (or ending in "/", or an existing folder) is a folder
    /// in the input's format. An extension no writer knows is refused rather than taken for a folder.
    public static func writer(for path: String, format: String?, source: Checkpoint) throws -> FormatWriter {
        try writer(for: path, format: format, inputFormat: folderFormat(of: source))
    }

    /// The format of a folder output written from `source`: a Hugging Face model folder becomes one in
    /// safetensors (what transformers and vLLM load, whatever its weights were), others keep theirs.
    public static func folderFormat(of source: Checkpoint) -> String {
        source.hfModel?.namedAsFolder == true ? "safetensors" : source.format
    }

    public static func writer(for path: String, format: String?, inputFormat: String) throws -> FormatWriter {
        if path == "-" || path.isEmpty {
            throw QConvertError.usage(
                message: "'\(path)': give an output path (writing to standard output is not supported)")
        }
        let lower = path.lowercased()
        let byExtension = writers.first(where: { $0.fileExtensions.contains { lower.hasSuffix($0) } })
        if let f = format {
            guard let w = writers.first(where: { $0.name == f }) else {
                throw QConvertError.usage(
                    message: "unknown output format '\(f)' (supported: \(writers.map(\.name).joined(separator: ", ")))")
            }
            if let e = byExtension, e.name != w.name {
                throw QConvertError.usage(
                    message: "\(path): --format \(f) does not match the extension, which means \(e.name)")
            }
            return w
        }
        if let w = byExtension { return w }
        var isDir: ObjCBool = false
        let folder =
            path.hasSuffix("/")
            || (FileManager.default.fileExists(atPath: path, isDirectory: &isDir) && isDir.boolValue)
        let name = URL(fileURLWithPath: path).lastPathComponent
        if !folder, let dot = name.lastIndex(of: "."), dot != name.startIndex {
            let known = Set(writers.flatMap(\.fileExtensions)).sorted().joined(separator: " ")
            throw QConvertError.usage(
                message:
                    "\(path): unknown output extension '\(name[dot...])' (known: \(known)); a folder output has none, or ends in /"
            )
        }
        if let w = writers.first(where: { $0.name == inputFormat }) { return w }
        throw QConvertError.usage(message: "\(path): cannot tell the output format from the extension; use --format")
    }

    static func readPrefix(_ path: String, count: Int) throws -> [UInt8] {
        // A FIFO or a device would block the read (or never end): only regular files are sniffed.
        if let attrs = try? FileManager.default.attributesOfItem(atPath: path),
            let type = attrs[.type] as? FileAttributeType, type != .typeRegular, type != .typeDirectory
        {
            throw QConvertError.io(path: path, message: "is not a regular file (a FIFO, socket or device)")
        }
        guard let h = FileHandle(forReadingAtPath: path) else {
            throw QConvertError.io(path: path, message: "cannot open")
        }
        defer { try? h.close() }
        return [UInt8]((try? h.read(upToCount: count)) ?? Data())
    }
}
