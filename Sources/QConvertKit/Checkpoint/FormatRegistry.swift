import Foundation

/// The format plugins, and how a path is matched to one: content first, then extension.
public enum FormatRegistry {
    public static let readers: [FormatReader] = [SafetensorsReader(), OnnxReader(), NpzReader(), PyTorchReader()]
    public static let writers: [FormatWriter] = [SafetensorsWriter(), OnnxWriter(), NpzWriter(), PyTorchWriter()]


    /// The reader for an input path: by magic bytes, then by extension.
    public static func reader(for path: String) throws -> FormatReader {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw QConvertError.io(path: path, message: "no such file or folder")
        }
        if isDir.boolValue {
            if let r = readers.first(where: { $0.recognizesFolder(path) }) { return r }
            throw QConvertError.badInput(path: path, message: "folder holds no checkpoint qconvert can read (no *.safetensors or *.index.json)")
        }
        let prefix = try readPrefix(path, count: 64)
        let size = (try? FileManager.default.attributesOfItem(atPath: path)[.size] as? Int) ?? 0
        if let r = readers.first(where: { $0.sniff(prefix, fileSize: size) }) { return r }
        let lower = path.lowercased()
        if let r = readers.first(where: { $0.fileExtensions.contains { lower.hasSuffix($0) } }) { return r }
        throw QConvertError.badInput(path: path, message: "unknown checkpoint format (supported: \(readers.map(\.name).joined(separator: ", ")))")
    }

    /// The writer for an output path: `format` if given, else by extension; a path
    /// without a known extension is a folder of shards in the input's format.
    public static func writer(for path: String, format: String?, inputFormat: String) throws -> FormatWriter {
        if let f = format {
            guard let w = writers.first(where: { $0.name == f }) else {
                throw QConvertError.usage(message: "unknown output format '\(f)' (supported: \(writers.map(\.name).joined(separator: ", ")))")
            }
            return w
        }
        let lower = path.lowercased()
        if let w = writers.first(where: { $0.fileExtensions.contains { lower.hasSuffix($0) } }) { return w }
        if let w = writers.first(where: { $0.name == inputFormat }) { return w }
        throw QConvertError.usage(message: "\(path): cannot tell the output format from the extension; use --format")
    }

    static func readPrefix(_ path: String, count: Int) throws -> [UInt8] {
        guard let h = FileHandle(forReadingAtPath: path) else {
            throw QConvertError.io(path: path, message: "cannot open")
        }
        defer { try? h.close() }
        return [UInt8]((try? h.read(upToCount: count)) ?? Data())
    }
}
