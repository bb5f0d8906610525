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
        tempPath = dir + "/." + url.lastPathComponent + ".qconvert-\(AtomicFile.host)-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).tmp"
        fd = try TempFileRegistry.shared.create(tempPath, finalPath: path)
    }

    nonisolated(unsafe) private static var swept = Set<String>()
    private static let sweptLock = NSLock()

    /// This machine's name as it appears in temporary names (letters, digits, '.', '_' only).
    static let host: String = {
        var buf = [CChar](repeating: 0, count: 256)
        let name = gethostname(&buf, buf.count - 1) == 0
            ? String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) : "host"
        let kept = String(name.unicodeScalars.filter { $0.isASCII && (CharacterSet.alphanumerics.contains($0) || $0 == "." || $0 == "_") })
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
                  fields.dropLast(2).joined(separator: "-") == host else { continue }
            if pid == getpid() { continue }
            if kill(pid, 0) == 0 || errno != ESRCH { continue }   // alive (or not ours to probe)
            unlink(dir + "/" + name)
        }
    }

    deinit { if fd >= 0 { close(fd); unlink(tempPath); TempFileRegistry.shared.remove(tempPath) } }

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
            let n = buf.withUnsafeMutableBytes { Glibc.pread(fd, $0.baseAddress! + done, count - done, off_t(offset + done)) }
            if n < 0 { if errno == EINTR { continue }; throw QConvertError.write(path: finalPath, message: String(cString: strerror(errno))) }
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

/// Temporary files in flight, so that an interrupted process can remove them.
public final class TempFileRegistry: @unchecked Sendable {
    public static let shared = TempFileRegistry()
    private let lock = NSLock()
    private var paths = Set<String>()
    private var closed = false

    /// Creates and registers a temporary file under the lock, so that an interrupt's cleanup
    /// either sees it or happens before it exists (then creating it is refused).
    func create(_ p: String, finalPath: String) throws -> Int32 {
        lock.lock(); defer { lock.unlock() }
        if closed { throw QConvertError.write(path: finalPath, message: "interrupted") }
        let fd = open(p, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw QConvertError.write(path: finalPath, message: String(cString: strerror(errno))) }
        paths.insert(p)
        qk_guard_add_temp(p)
        return fd
    }
    func remove(_ p: String) {
        lock.lock()
        paths.remove(p)
        qk_guard_remove_temp(p)
        lock.unlock()
    }

    /// Makes a SIGBUS from a truncated input end in one line and exit 3, removing temporaries.
    public static func installTruncationGuard() { qk_guard_install() }

    /// Removes every temporary file still registered (called on SIGINT/SIGTERM).
    public func removeAll() {
        lock.lock(); let ps = paths; paths.removeAll(); closed = true; lock.unlock()
        for p in ps {
            unlink(p)
            qk_guard_remove_temp(p)
        }
    }
}
