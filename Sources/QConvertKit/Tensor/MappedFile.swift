import CQKernels
import Foundation

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

/// A read-only memory map of a whole file. Pages can be released after use so
/// that peak memory follows the tensor being worked on, not the file.
public final class MappedFile: @unchecked Sendable {
    public let path: String
    public let size: Int
    public let base: UnsafeRawPointer?
    private let fd: Int32

    public init(path: String) throws {
        self.path = path
        // O_NONBLOCK: opening a FIFO or a device must not wait for a writer; anything but a regular
        // file is refused below.
        let fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else {
            throw QConvertError.io(path: path, message: "cannot open: \(String(cString: strerror(errno)))")
        }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            close(fd)
            throw QConvertError.io(path: path, message: "cannot stat: \(String(cString: strerror(errno)))")
        }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            close(fd)
            throw QConvertError.io(path: path, message: "is a directory")
        }
        if (st.st_mode & S_IFMT) != S_IFREG {
            close(fd)
            throw QConvertError.io(path: path, message: "is not a regular file (a FIFO, socket or device)")
        }
        self.fd = fd
        self.size = Int(st.st_size)
        if size == 0 {
            base = nil
        } else {
            let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
            guard let p, p != MAP_FAILED else {
                close(fd)
                throw QConvertError.io(path: path, message: "cannot map: \(String(cString: strerror(errno)))")
            }
            base = UnsafeRawPointer(p)
            qk_guard_add_mapping(base, size, path)
        }
    }

    deinit {
        if let base {
            qk_guard_remove_mapping(base)
            munmap(UnsafeMutableRawPointer(mutating: base), size)
        }
        close(fd)
    }

    /// A view of `count` bytes at `offset` (bounds are the caller's to check).
    public func bytes(at offset: Int, count: Int) -> UnsafeRawBufferPointer {
        guard let base, count > 0 else { return UnsafeRawBufferPointer(start: nil, count: 0) }
        return UnsafeRawBufferPointer(start: base + offset, count: count)
    }

    /// Reads bytes with pread (not through the mapping); returns the count read, or -1.
    public func read(into buf: UnsafeMutableRawBufferPointer, at offset: Int, count: Int) -> Int {
        var done = 0
        while done < count {
            let n = pread(fd, buf.baseAddress! + done, count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                return -1
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Drops the resident pages of a range (they are file-backed: re-reading
    /// faults them in again), so resident memory does not grow with the file.
    public func release(offset: Int, count: Int) {
        guard let base, count > 0 else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = offset / page * page
        let end = min(size, (offset + count + page - 1) / page * page)
        guard end > start else { return }
        _ = madvise(UnsafeMutableRawPointer(mutating: base + start), end - start, MADV_DONTNEED)
    }
}
