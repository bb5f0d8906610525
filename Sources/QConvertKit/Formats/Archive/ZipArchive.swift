import CZip
import Foundation

/// A zip archive opened for reading. libzip validates it (consistency of the central directory
/// with the local headers, encryption, CRCs on inflate); the member table parsed here gives each
/// stored member's data offset, so that stored tensor data is used in place from the mapping.
public final class ZipArchive: @unchecked Sendable {
    public struct Member: Sendable {
        public var name: String
        public var index: Int
        public var method: UInt16
        public var compressedSize: Int
        public var size: Int
        public var crc: UInt32
        public var dataOffset: Int
    }

    public let path: String
    public let file: MappedFile
    public private(set) var members: [Member] = []
    private let handle: OpaquePointer
    /// libzip's archive handle serves one reader at a time.
    private let lock = NSLock()

    /// Limits against zip bombs.
    public static let maxTotalSize = 1 << 40
    public static let maxRatio = 1000

    public init(path: String) throws {
        self.path = path
        file = try MappedFile(path: path)
        func bad(_ r: ZipRule) -> QConvertError { .violation(path: path, r) }
        var err: Int32 = 0
        guard let za = zip_open(path, ZIP_RDONLY | ZIP_CHECKCONS, &err) else {
            var ze = zip_error_t()
            zip_error_init_with_code(&ze, err)
            let m = String(cString: zip_error_strerror(&ze))
            zip_error_fini(&ze)
            throw bad(.notZip(reason: m.lowercased()))
        }
        handle = za
        do {
            members = try ZipArchive.parseDirectory(file, path: path)
            let n = Int(zip_get_num_entries(za, 0))
            guard n == members.count else { throw bad(.memberCount(directory: members.count, libzip: Int(n))) }
            var seen = Set<String>()
            var total = 0
            for (i, m) in members.enumerated() {
                var st = zip_stat_t()
                zip_stat_init(&st)
                guard zip_stat_index(za, zip_uint64_t(i), 0, &st) == 0 else {
                    throw bad(.unreadableMember(index: Int(i)))
                }
                guard st.encryption_method == ZIP_EM_NONE else { throw bad(.encrypted(member: m.name)) }
                guard m.method == 0 || m.method == 8 else {
                    throw bad(.unsupportedMethod(member: m.name, method: Int(m.method)))
                }
                guard ZipArchive.isSafeName(m.name) else { throw bad(.unsafeName(member: m.name)) }
                guard seen.insert(m.name).inserted else { throw bad(.repeatedName(member: m.name)) }
                if m.method == 8, m.size > 1 << 20, m.size / max(m.compressedSize, 1) > ZipArchive.maxRatio {
                    throw bad(
                        .zipBomb(member: m.name, ratio: m.size / max(m.compressedSize, 1), limit: ZipArchive.maxRatio))
                }
                total += m.size
                guard total <= ZipArchive.maxTotalSize else {
                    throw bad(.totalTooLarge(limitGiB: ZipArchive.maxTotalSize >> 30))
                }
                members[i].index = i
            }
            let ranges = members.map { ($0.dataOffset, $0.dataOffset + $0.compressedSize) }.sorted { $0.0 < $1.0 }
            for k in 1..<max(ranges.count, 1) where ranges[k].0 < ranges[k - 1].1 {
                throw bad(.overlappingData)
            }
        }
        // (on a throw after this point deinit runs and discards the handle)
    }

    deinit { zip_discard(handle) }

    public func member(named name: String) -> Member? { members.first { $0.name == name } }

    static func isSafeName(_ n: String) -> Bool {
        guard !n.isEmpty, !n.hasPrefix("/"), !n.contains("\\"), !n.contains("\0") else { return false }
        if n.count >= 2, n.dropFirst().first == ":" { return false }
        return !n.split(separator: "/", omittingEmptySubsequences: false).contains("..")
    }

    /// The member's bytes: stored members in place, deflated ones inflated by libzip (which checks
    /// their CRC). A stored member's CRC is checked here unless `deferCRC`, in which case it is checked
    /// the first time its bytes are used (`TensorBytes.verified`).
    public func bytes(_ m: Member, deferCRC: Bool = false) throws -> TensorBytes {
        if m.method == 0 {
            guard m.compressedSize == m.size else {
                throw QConvertError.violation(path: path, ZipRule.storedSizesDisagree(member: m.name))
            }
            if !deferCRC {
                try verifyCRC(m)
                return .mapped(file, offset: m.dataOffset, count: m.size)
            }
            return .verified(file, offset: m.dataOffset, count: m.size, check: IntegrityCheck { try self.verifyCRC(m) })
        }
        return .owned(try inflate(m))
    }

    /// The most bytes one deflated member may inflate to: 32× the archive's size + 128 MiB, so that
    /// two members in flight stay within the memory bound of 64× the input + 256 MiB.
    public var inflateLimit: Int { 32 * file.size + (128 << 20) }

    /// Inflates a deflated member (all of it, or its first `prefix` bytes), dropping its first `skip`
    /// bytes from the result. The buffer grows with
    /// the data actually inflated, never with the size the archive declares, and a member declared
    /// larger than `inflateLimit` is refused before any work. libzip checks the CRC at the end.
    public func inflate(_ m: Member, prefix: Int? = nil, skip: Int = 0) throws -> [UInt8] {
        func bad(_ r: ZipRule) -> QConvertError { .violation(path: path, r) }
        guard m.size <= inflateLimit else {
            throw bad(.inflateLimit(member: m.name, declared: m.size, limit: inflateLimit))
        }
        let want = Swift.min(prefix ?? m.size, m.size)
        lock.lock()
        defer { lock.unlock() }
        guard let zf = zip_fopen_index(handle, zip_uint64_t(m.index), 0) else {
            throw bad(.cannotOpen(member: m.name, reason: String(cString: zip_strerror(handle))))
        }
        defer { zip_fclose(zf) }
        var out = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: Swift.max(1, Swift.min(want, 1 << 20)))
        var done = 0
        while done < want {
            let ask = Swift.min(chunk.count, want - done)
            let n = Int(chunk.withUnsafeMutableBytes { zip_fread(zf, $0.baseAddress!, zip_uint64_t(ask)) })
            if n < 0 {
                throw bad(.cannotInflate(member: m.name, reason: String(cString: zip_file_strerror(zf)).lowercased()))
            }
            if n == 0 { break }
            let drop = Swift.max(0, Swift.min(n, skip - done))
            if drop < n { out.append(contentsOf: chunk[drop..<n]) }
            done += n
        }
        guard done == want else { throw bad(.inflatedSize(member: m.name, got: done, declared: m.size)) }
        if prefix == nil {
            var extra: UInt8 = 0
            if zip_fread(zf, &extra, 1) != 0 { throw bad(.inflatesPastSize(member: m.name)) }
        }
        return out
    }

    /// Checks a stored member's CRC in 16 MB windows, releasing each window's pages after use.
    public func verifyCRC(_ m: Member) throws {
        var crc: uLong = 0
        var off = 0
        while off < m.size {
            let n = Swift.min(16 << 20, m.size - off)
            let b = file.bytes(at: m.dataOffset + off, count: n)
            crc = crc32_z(crc, b.baseAddress!.assumingMemoryBound(to: UInt8.self), n)
            file.release(offset: m.dataOffset + off, count: n)
            off += n
        }
        guard UInt32(crc) == m.crc else {
            throw QConvertError.violation(
                path: path, ZipRule.crcMismatch(member: m.name, stored: m.crc, computed: UInt32(crc)))
        }
    }

    // MARK: - central directory

    static func parseDirectory(_ f: MappedFile, path: String) throws -> [Member] {
        func bad(_ r: ZipRule) -> QConvertError { .violation(path: path, r) }
        let b = f.bytes(at: 0, count: f.size)
        func u16(_ o: Int) -> Int { Int(b[o]) | Int(b[o + 1]) << 8 }
        func u32(_ o: Int) -> Int { u16(o) | u16(o + 2) << 16 }
        func u64(_ o: Int) -> Int { u32(o) | u32(o + 4) << 32 }
        guard f.size >= 22 else { throw bad(.tooSmall) }
        var eocd = -1
        var o = f.size - 22
        let lowest = max(0, f.size - 22 - 65535)
        while o >= lowest {
            if u32(o) == 0x0605_4b50 {
                eocd = o
                break
            }
            o -= 1
        }
        guard eocd >= 0 else { throw bad(.noEndRecord) }
        var count = u16(eocd + 10)
        var cdSize = u32(eocd + 12)
        var cdOffset = u32(eocd + 16)
        if eocd >= 20, u32(eocd - 20) == 0x0706_4b50 {
            let z = u64(eocd - 20 + 8)
            guard z + 56 <= f.size, z >= 0, u32(z) == 0x0606_4b50 else { throw bad(.badZip64End) }
            count = u64(z + 32)
            cdSize = u64(z + 40)
            cdOffset = u64(z + 48)
        }
        guard cdOffset >= 0, cdSize >= 0, cdOffset + cdSize <= f.size else { throw bad(.directoryOutside) }
        var members: [Member] = []
        var p = cdOffset
        for _ in 0..<count {
            guard p + 46 <= cdOffset + cdSize, u32(p) == 0x0201_4b50 else { throw bad(.corruptDirectory) }
            let flags = u16(p + 8)
            let method = u16(p + 10)
            let crc = UInt32(u32(p + 16))
            var csize = u32(p + 20)
            var usize = u32(p + 24)
            let nl = u16(p + 28)
            let el = u16(p + 30)
            let cl = u16(p + 32)
            var local = u32(p + 42)
            guard p + 46 + nl + el + cl <= f.size else { throw bad(.corruptDirectory) }
            let name = String(decoding: UnsafeRawBufferPointer(rebasing: b[(p + 46)..<(p + 46 + nl)]), as: UTF8.self)
            if flags & 1 != 0 { throw bad(.encrypted(member: name)) }
            // zip64 extra field: the 0xFFFFFFFF fields, in order usize, csize, offset
            var e = p + 46 + nl
            let eEnd = e + el
            while e + 4 <= eEnd {
                let id = u16(e)
                let len = u16(e + 2)
                if id == 1 {
                    var q = e + 4
                    if usize == 0xFFFF_FFFF, q + 8 <= e + 4 + len {
                        usize = u64(q)
                        q += 8
                    }
                    if csize == 0xFFFF_FFFF, q + 8 <= e + 4 + len {
                        csize = u64(q)
                        q += 8
                    }
                    if local == 0xFFFF_FFFF, q + 8 <= e + 4 + len {
                        local = u64(q)
                        q += 8
                    }
                }
                e += 4 + len
            }
            guard local >= 0, local + 30 <= f.size, u32(local) == 0x0403_4b50 else {
                throw bad(.badLocalHeader(member: name))
            }
            let data = local + 30 + u16(local + 26) + u16(local + 28)
            guard csize >= 0, usize >= 0, data <= f.size, csize <= f.size - data else {
                throw bad(.dataPastEnd(member: name))
            }
            members.append(
                Member(
                    name: name, index: members.count, method: UInt16(method), compressedSize: csize, size: usize,
                    crc: crc, dataOffset: data
                ))
            p += 46 + nl + el + cl
        }
        return members
    }
}

/// The rules of a zip archive (and qconvert's bounds on one) a file can break.
public enum ZipRule: FormatViolation, Equatable {
    case notZip(reason: String)
    case memberCount(directory: Int, libzip: Int)
    case unreadableMember(index: Int)
    case encrypted(member: String)
    case unsupportedMethod(member: String, method: Int)
    case unsafeName(member: String)
    case repeatedName(member: String)
    case zipBomb(member: String, ratio: Int, limit: Int)
    case totalTooLarge(limitGiB: Int)
    case overlappingData
    case storedSizesDisagree(member: String)
    case inflateLimit(member: String, declared: Int, limit: Int)
    case cannotOpen(member: String, reason: String)
    case cannotInflate(member: String, reason: String)
    case inflatedSize(member: String, got: Int, declared: Int)
    case inflatesPastSize(member: String)
    case crcMismatch(member: String, stored: UInt32, computed: UInt32)
    case tooSmall
    case noEndRecord
    case badZip64End
    case directoryOutside
    case corruptDirectory
    case badLocalHeader(member: String)
    case dataPastEnd(member: String)

    public var description: String {
        switch self {
        case .notZip(let why): "not a valid zip archive (\(why))"
        case .memberCount(let d, let l): "central directory lists \(d) members, libzip sees \(l)"
        case .unreadableMember(let i): "cannot read member \(i)"
        case .encrypted(let m): "member '\(m)' is encrypted"
        case .unsupportedMethod(let m, let k):
            "member '\(m)' uses compression method \(k) (only stored and deflate are read)"
        case .unsafeName(let m): "member name '\(m)' is not a safe relative path"
        case .repeatedName(let m): "member name '\(m)' appears twice"
        case .zipBomb(let m, let r, let limit):
            "member '\(m)' expands \(r)× (limit \(limit)×): refusing a likely zip bomb"
        case .totalTooLarge(let g): "members expand to more than \(g) GiB"
        case .overlappingData: "member data ranges overlap"
        case .storedSizesDisagree(let m): "member '\(m)': stored sizes disagree"
        case .inflateLimit(let m, let n, let limit):
            "member '\(m)': declares \(n) bytes inflated, more than the limit of 32× the archive's size + 128 MiB (\(limit) bytes)"
        case .cannotOpen(let m, let why): "member '\(m)': cannot open: \(why)"
        case .cannotInflate(let m, let why): "member '\(m)': cannot inflate (\(why))"
        case .inflatedSize(let m, let got, let n): "member '\(m)': inflates to \(got) bytes, expected \(n)"
        case .inflatesPastSize(let m): "member '\(m)': inflates past its declared size or fails its CRC"
        case .crcMismatch(let m, let stored, let data):
            "member '\(m)': CRC mismatch (stored \(String(stored, radix: 16)), data \(String(data, radix: 16)))"
        case .tooSmall: "too small to be a zip archive"
        case .noEndRecord: "no end of central directory record (truncated?)"
        case .badZip64End: "bad zip64 end of central directory"
        case .directoryOutside: "central directory lies outside the file"
        case .corruptDirectory: "corrupt central directory"
        case .badLocalHeader(let m): "member '\(m)': bad local header"
        case .dataPastEnd(let m): "member '\(m)': data runs past the end of the archive (truncated?)"
        }
    }
}
