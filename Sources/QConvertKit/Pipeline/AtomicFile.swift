import CQKernels
import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// An output file written under a temporary name in the target folder and
/// renamed into place on `commit`; `abort` (or a failure) leaves nothing behind
/// and never touches an existing file of the final name.
public final class AtomicFile {
    public let finalPath: String
    public let tempPath: String
    private var fd: Int32

    public init(path: String) throws {
        finalPath = path
        let url = URL(fileURLWithPath: path)
        let dir = url.deletingLastPathComponent().path
        AtomicFile.removeStaleTemporaries(in: dir)
        tempPath =
            dir + "/." + url.lastPathComponent
            + ".qconvert-\(AtomicFile.host)-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).tmp"
        fd = try TempFileRegistry.shared.create(tempPath, finalPath: path)
    }

    nonisolated(unsafe) private static var swept = Set<String>()
    private static let sweptLock = NSLock()

    /// This machine's name as it appears in temporary names (letters, digits, '.', '_' only).
    static let host: String = {
        var buf = [CChar](repeating: 0, count: 256)
        let name =
            gethostname(&buf, buf.count - 1) == 0
            ? String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : "host"
        let kept = String(
            name.unicodeScalars.filter {
                $0.isASCII && (CharacterSet.alphanumerics.contains($0) || $0 == "." || $0 == "_")
            })
        return kept.isEmpty ? "host" : String(kept.prefix(64))
    }()

    /// Removes the temporary outputs that processes killed without a chance to clean up (kill -9, a
    /// power cut) left in `dir`: those named for this machine whose process no longer runs. Temporaries
    /// of other machines sharing the folder (NFS, a Kubernetes volume) are never touched, since their
    /// process ids mean nothing here.
    static func removeStaleTemporaries(in dir: String) {
        // Once per folder and process: a folder output of many shards lists its folder once.
        sweptLock.lock()
        let first = swept.insert(dir).inserted
        sweptLock.unlock()
        guard first, let names = try? FileManager.default.contentsOfDirectory(atPath: dir) else { return }
        for name in names where name.hasPrefix(".") && name.hasSuffix(".tmp") {
            guard let r = name.range(of: ".qconvert-", options: .backwards) else { continue }
            let fields = name[r.upperBound...].dropLast(4).split(separator: "-")
            guard fields.count >= 3, let pid = Int32(fields[fields.count - 2]), pid > 0,
                fields.dropLast(2).joined(separator: "-") == host
            else { continue }
            if pid == getpid() { continue }
            if kill(pid, 0) == 0 || errno != ESRCH { continue }  // alive (or not ours to probe)
            if unlink(dir + "/" + name) != 0, errno == EISDIR {  // a folder output's staging folder
                try? FileManager.default.removeItem(atPath: dir + "/" + name)
            }
        }
    }

    deinit {
        if fd >= 0 {
            close(fd)
            unlink(tempPath)
            TempFileRegistry.shared.remove(tempPath)
        }
    }

    public func pwrite(_ bytes: UnsafeRawBufferPointer, at offset: Int) throws {
        var done = 0
        while done < bytes.count {
            let n = Glibc.pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw QConvertError.write(path: finalPath, message: String(cString: strerror(errno)))
            }
            done += n
        }
    }

    public func pwrite(_ bytes: [UInt8], at offset: Int) throws {
        try bytes.withUnsafeBytes { try pwrite($0, at: offset) }
    }

    public func pread(count: Int, at offset: Int) throws -> [UInt8] {
        var buf = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = buf.withUnsafeMutableBytes {
                Glibc.pread(fd, $0.baseAddress! + done, count - done, off_t(offset + done))
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw QConvertError.write(path: finalPath, message: String(cString: strerror(errno)))
            }
            if n == 0 { break }
            done += n
        }
        return buf
    }

    public func truncate(_ size: Int) throws {
        if ftruncate(fd, off_t(size)) != 0 {
            throw QConvertError.write(path: finalPath, message: String(cString: strerror(errno)))
        }
    }

    public func commit() throws {
        guard fd >= 0 else { return }
        if close(fd) != 0 {
            fd = -1
            unlink(tempPath)
            throw QConvertError.write(path: finalPath, message: String(cString: strerror(errno)))
        }
        fd = -1
        if rename(tempPath, finalPath) != 0 {
            let m = String(cString: strerror(errno))
            unlink(tempPath)
            TempFileRegistry.shared.remove(tempPath)
            throw QConvertError.write(path: finalPath, message: m)
        }
        TempFileRegistry.shared.remove(tempPath)
    }

    public func abort() {
        guard fd >= 0 else { return }
        close(fd)
        fd = -1
        unlink(tempPath)
        TempFileRegistry.shared.remove(tempPath)
    }
}

/// A folder output built whole in a staging folder beside it and swapped into place in one step
/// (rename, or an atomic exchange with the folder already there), so that a kill or a concurrent
/// run never leaves a mixture of old and new shards: the last complete conversion wins. Files of
/// the existing folder that are not weights or indexes (a README, a report) are carried over by
/// hard link; its old shards and index go with the old folder.
public final class FolderOutput {
    public let finalPath: String
    public let stagingPath: String
    private var open = true
    private var createdParents: [String] = []

    public init(path: String) throws {
        guard !path.isEmpty else { throw QConvertError.usage(message: "the output folder name is empty") }
        finalPath = path
        var isDir: ObjCBool = false
        if FileManager.default.fileExists(atPath: path, isDirectory: &isDir), !isDir.boolValue {
            throw QConvertError.usage(message: "\(path): exists and is not a folder (a folder output was asked for)")
        }
        let url = URL(fileURLWithPath: path).standardized
        let parent = url.deletingLastPathComponent().path
        // missing parents are created, and removed again if the conversion fails
        var missing: [String] = []
        var p = URL(fileURLWithPath: parent)
        while !FileManager.default.fileExists(atPath: p.path), p.path != "/" {
            missing.append(p.path)
            p = p.deletingLastPathComponent()
        }
        for m in missing.reversed() where mkdir(m, 0o755) != 0 && errno != EEXIST {
            let e = String(cString: strerror(errno))
            for made in missing where made != m { rmdir(made) }
            throw QConvertError.write(path: path, message: "cannot create folder \(m): \(e)")
        }
        createdParents = missing
        AtomicFile.removeStaleTemporaries(in: parent)
        stagingPath =
            parent + "/." + url.lastPathComponent
            + ".qconvert-\(AtomicFile.host)-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).tmp"
        try TempFileRegistry.shared.createFolder(stagingPath, finalPath: path)
    }

    deinit { abort() }

    /// Whether a file of an existing output folder belongs to the weights (replaced as a whole).
    static func isWeightFile(_ name: String) -> Bool {
        name.hasSuffix(".safetensors") || name.hasSuffix(".safetensors.index.json")
    }

    public func commit() throws {
        guard open else { return }
        let fm = FileManager.default
        // carry the other files of the folder being replaced over into the new one
        if let names = try? fm.contentsOfDirectory(atPath: finalPath) {
            for name in names where !FolderOutput.isWeightFile(name) && !(name.hasPrefix(".") && name.hasSuffix(".tmp"))
            {
                let dst = stagingPath + "/" + name
                if fm.fileExists(atPath: dst) { continue }
                if link(finalPath + "/" + name, dst) != 0 {
                    do { try fm.copyItem(atPath: finalPath + "/" + name, toPath: dst) } catch {
                        abort()
                        throw QConvertError.write(
                            path: finalPath,
                            message: "cannot carry '\(name)' over into the new folder: \(error.localizedDescription)")
                    }
                }
            }
        }
        // a new name (or an empty folder) takes a plain rename; an existing folder is exchanged
        if rename(stagingPath, finalPath) != 0 {
            let first = errno
            guard first == ENOTEMPTY || first == EEXIST, qk_rename_exchange(stagingPath, finalPath) == 0 else {
                let m = String(cString: strerror(first == ENOTEMPTY || first == EEXIST ? errno : first))
                abort()
                throw QConvertError.write(path: finalPath, message: m)
            }
            // the staging name now holds the replaced folder
            try? fm.removeItem(atPath: stagingPath)
        }
        open = false
        TempFileRegistry.shared.remove(stagingPath)
    }

    public func abort() {
        guard open else { return }
        open = false
        try? FileManager.default.removeItem(atPath: stagingPath)
        TempFileRegistry.shared.remove(stagingPath)
        for m in createdParents { rmdir(m) }  // innermost first; only empty ones go
    }
}

/// Temporary files in flight, so that an interrupted process can remove them.
public final class TempFileRegistry: @unchecked Sendable {
    public static let shared = TempFileRegistry()
    private let lock = NSLock()
    private var paths = Set<String>()
    private var folders = Set<String>()
    private var closed = false

    /// Creates and registers a temporary file under the lock, so that an interrupt's cleanup
    /// either sees it or happens before it exists (then creating it is refused).
    func create(_ p: String, finalPath: String) throws -> Int32 {
        lock.lock()
        defer { lock.unlock() }
        if closed { throw QConvertError.write(path: finalPath, message: "interrupted") }
        let fd = open(p, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw QConvertError.write(path: finalPath, message: String(cString: strerror(errno))) }
        paths.insert(p)
        qk_guard_add_temp(p)
        return fd
    }
    /// Creates and registers a staging folder (removed with its contents on an interrupt).
    func createFolder(_ p: String, finalPath: String) throws {
        lock.lock()
        defer { lock.unlock() }
        if closed { throw QConvertError.write(path: finalPath, message: "interrupted") }
        guard mkdir(p, 0o755) == 0 else {
            throw QConvertError.write(path: finalPath, message: String(cString: strerror(errno)))
        }
        folders.insert(p)
    }

    func remove(_ p: String) {
        lock.lock()
        paths.remove(p)
        folders.remove(p)
        qk_guard_remove_temp(p)
        lock.unlock()
    }

    /// Makes a SIGBUS from a truncated input end in one line and exit 3, removing temporaries.
    public static func installTruncationGuard() { qk_guard_install(ExitStatus.badInput.rawValue) }

    /// Has the kernel send SIGTERM to this process when its parent dies (a batch worker whose
    /// supervisor was killed must not run on alone); true if the parent is already gone.
    public static func dieWithParent() -> Bool { qk_die_with_parent(SIGTERM) == 1 }

    /// Removes every temporary file still registered (called on SIGINT/SIGTERM).
    public func removeAll() {
        lock.lock()
        let ps = paths
        let fs = folders
        paths.removeAll()
        folders.removeAll()
        closed = true
        lock.unlock()
        for p in ps {
            unlink(p)
            qk_guard_remove_temp(p)
        }
        for f in fs { try? FileManager.default.removeItem(atPath: f) }
    }
}
