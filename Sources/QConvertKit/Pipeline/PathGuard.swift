import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// Keeps a run from writing over what it reads: paths are compared by device and inode (so
/// `model.safetensors`, `./model.safetensors`, an absolute path, a `..` spelling, a symbolic or a hard
/// link all name the same file), never by spelling.
public enum PathGuard {
    /// A file's identity: device and inode, following symbolic links; nil when it does not exist.
    public struct Identity: Hashable, Sendable {
        public let device: UInt64
        public let inode: UInt64
    }

    public static func identity(_ path: String) -> Identity? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return Identity(device: UInt64(st.st_dev), inode: UInt64(st.st_ino))
    }

    static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    /// The identities of everything a checkpoint reads: its path (a file or a folder), every file it
    /// mapped (shards, external data) and the folders that hold them.
    public static func inputIdentities(_ ckpt: Checkpoint) -> Set<Identity> {
        var paths = [ckpt.path] + ckpt.files.map(\.path)
        paths += ckpt.files.map { URL(fileURLWithPath: $0.path).deletingLastPathComponent().path }
        return Set(paths.compactMap(identity))
    }

    /// The files a conversion to `output` may replace: the output itself, the ONNX external-data file
    /// beside it, and when the output is an existing folder, the files in it.
    public static func outputPaths(_ output: String) -> [String] {
        var paths = [output, output + ".data"]
        if isDirectory(output), let items = try? FileManager.default.contentsOfDirectory(atPath: output) {
            paths += items.map { output + "/" + $0 }
        }
        return paths
    }

    /// Refuses (before anything is written) an output that would replace a file or folder the input
    /// is read from.
    public static func checkOutput(_ output: String, input ckpt: Checkpoint) throws {
        let inputs = inputIdentities(ckpt)
        for p in outputPaths(output) {
            guard let id = identity(p), inputs.contains(id) else { continue }
            let what = p == output ? "is the input" : "would overwrite \(p), which the input reads"
            throw QConvertError.usage(
                message: "\(output): the output \(what); choose another output path (no file was changed)")
        }
    }

    /// Refuses (before anything is run) an output that is one of `inputs` (files, or folders and the files
    /// in them), by identity.
    public static func checkOutput(_ output: String, inputPaths: [String]) throws {
        var paths = inputPaths
        for p in inputPaths where isDirectory(p) {
            paths += ((try? FileManager.default.contentsOfDirectory(atPath: p)) ?? []).map { p + "/" + $0 }
        }
        let inputs = Set(paths.compactMap(identity))
        for p in outputPaths(output) {
            guard let id = identity(p), inputs.contains(id) else { continue }
            throw QConvertError.usage(
                message:
                    "\(output): the output would overwrite \(p), which the run reads; choose another output path (no file was changed)"
            )
        }
    }

    /// Refuses a report path that names the input (or, for a folder input, a file in it) or the output,
    /// or whose folder does not exist.
    public static func checkReport(_ report: String, input: String, output: String?) throws {
        var others = [input, output].compactMap { $0 }
        if isDirectory(input), let items = try? FileManager.default.contentsOfDirectory(atPath: input) {
            others += items.map { input + "/" + $0 }
        }
        if let t = identity(report), let other = others.first(where: { identity($0) == t }) {
            throw QConvertError.usage(
                message: "\(report): the report would overwrite \(other); choose another report path")
        }
        if let o = output,
            URL(fileURLWithPath: report).standardizedFileURL == URL(fileURLWithPath: o).standardizedFileURL
        {
            throw QConvertError.usage(message: "\(report): the report and the output are the same path")
        }
        let folder = URL(fileURLWithPath: report).deletingLastPathComponent().path
        guard isDirectory(folder) else {
            throw QConvertError.write(
                path: report, message: "its folder \(folder) does not exist (nothing was converted)")
        }
        if isDirectory(report) {
            throw QConvertError.write(path: report, message: "is a folder (nothing was converted)")
        }
    }

    /// Whether `inner` is `outer` or lies inside it (by identity of `outer` and each ancestor of `inner`).
    public static func isInside(_ inner: String, _ outer: String) -> Bool {
        guard let o = identity(outer) else { return false }
        var url = URL(fileURLWithPath: inner).standardizedFileURL
        while true {
            if let id = identity(url.path), id == o { return true }
            let parent = url.deletingLastPathComponent()
            if parent.path == url.path { return false }
            url = parent
        }
    }
}
