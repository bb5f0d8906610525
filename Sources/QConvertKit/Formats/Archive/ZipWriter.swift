import CZip
import Foundation

/// Writes a stored (uncompressed) zip whose layout is fixed before any data is written: member data
/// goes straight to its offset (aligned where asked, with the 0x4246 padding extra field), headers and
/// the central directory follow once CRCs are known. Timestamps are fixed, so output is deterministic.
final class ZipWriter {
    struct Entry {
        var name: String
        var size: Int
        var headerOffset = 0
        var dataOffset = 0
        var crc: UInt32 = 0
        var zip64 = false
        var pad = 0
        var aligned = false
    }

    let file: AtomicFile
    private(set) var entries: [Entry]
    private(set) var endOfData = 0

    /// `members`: name, size, alignment (1 = none) in archive order.
    init(path: String, members: [(name: String, size: Int, align: Int)]) throws {
        file = try AtomicFile(path: path)
        entries = []
        var off = 0
        for m in members {
            var e = Entry(name: m.name, size: m.size)
            e.headerOffset = off
            e.zip64 = m.size >= 0xFFFF_FFFF || off >= 0xFFFF_FFFF
            let fixed = 30 + m.name.utf8.count + (e.zip64 ? 20 : 0)
            if m.align > 1 {
                e.aligned = true
                let base = off + fixed + 4
                e.pad = (m.align - base % m.align) % m.align
                e.dataOffset = base + e.pad
            } else {
                e.dataOffset = off + fixed
            }
            off = e.dataOffset + m.size
            entries.append(e)
        }
        endOfData = off
    }

    /// Writes `bytes` at `offset` within member `k`'s data and folds them into its CRC (in order).
    func write(_ k: Int, _ bytes: UnsafeRawBufferPointer, at offset: Int = 0) throws {
        try file.pwrite(bytes, at: entries[k].dataOffset + offset)
        if bytes.count > 0 {
            entries[k].crc = UInt32(
                crc32_z(uLong(entries[k].crc), bytes.baseAddress!.assumingMemoryBound(to: UInt8.self), bytes.count))
        }
    }

    func write(_ k: Int, _ bytes: [UInt8], at offset: Int = 0) throws {
        try bytes.withUnsafeBytes { try write(k, $0, at: offset) }
    }

    /// Adds members whose content is known only at the end (metadata), then finishes.
    func finish(appending extra: [(String, [UInt8])]) throws {
        for (name, bytes) in extra {
            var e = Entry(name: name, size: bytes.count)
            e.headerOffset = endOfData
            e.zip64 = bytes.count >= 0xFFFF_FFFF || endOfData >= 0xFFFF_FFFF
            e.dataOffset = endOfData + 30 + name.utf8.count + (e.zip64 ? 20 : 0)
            entries.append(e)
            endOfData = e.dataOffset + bytes.count
            try write(entries.count - 1, bytes)
        }
        try finish()
    }

    func finish() throws {
        var le = LittleEndianBytes()
        for e in entries {
            var h = LittleEndianBytes()
            h.u32(0x0403_4b50)
            h.u16(e.zip64 ? 45 : 20)
            h.u16(0x0800)
            h.u16(0)
            h.u16(0)
            h.u16(0x0021)  // 1980-01-01 00:00
            h.u32(e.crc)
            h.u32(e.zip64 ? 0xFFFF_FFFF : UInt32(e.size))
            h.u32(e.zip64 ? 0xFFFF_FFFF : UInt32(e.size))
            let name = Array(e.name.utf8)
            h.u16(UInt16(name.count))
            h.u16(UInt16((e.zip64 ? 20 : 0) + (e.aligned ? 4 + e.pad : 0)))
            h.bytes(name)
            if e.zip64 {
                h.u16(1)
                h.u16(16)
                h.u64(UInt64(e.size))
                h.u64(UInt64(e.size))
            }
            if e.aligned {
                h.u16(0x4246)
                h.u16(UInt16(e.pad))
                h.bytes([UInt8](repeating: 0x5A, count: e.pad))
            }
            try file.pwrite(h.data, at: e.headerOffset)
        }
        let cdStart = endOfData
        for e in entries {
            let name = Array(e.name.utf8)
            let big = e.zip64 || e.headerOffset >= 0xFFFF_FFFF
            le.u32(0x0201_4b50)
            le.u16(big ? 45 : 20)
            le.u16(big ? 45 : 20)
            le.u16(0x0800)
            le.u16(0)
            le.u16(0)
            le.u16(0x0021)
            le.u32(e.crc)
            le.u32(big ? 0xFFFF_FFFF : UInt32(e.size))
            le.u32(big ? 0xFFFF_FFFF : UInt32(e.size))
            le.u16(UInt16(name.count))
            le.u16(big ? 28 : 0)
            le.u16(0)
            le.u16(0)
            le.u16(0)
            le.u32(0o644 << 16)
            le.u32(big ? 0xFFFF_FFFF : UInt32(e.headerOffset))
            le.bytes(name)
            if big {
                le.u16(1)
                le.u16(24)
                le.u64(UInt64(e.size))
                le.u64(UInt64(e.size))
                le.u64(UInt64(e.headerOffset))
            }
        }
        let cdSize = le.data.count
        let need64 = entries.count >= 0xFFFF || cdStart >= 0xFFFF_FFFF || cdSize >= 0xFFFF_FFFF
        if need64 {
            let z = cdStart + cdSize
            le.u32(0x0606_4b50)
            le.u64(44)
            le.u16(45)
            le.u16(45)
            le.u32(0)
            le.u32(0)
            le.u64(UInt64(entries.count))
            le.u64(UInt64(entries.count))
            le.u64(UInt64(cdSize))
            le.u64(UInt64(cdStart))
            le.u32(0x0706_4b50)
            le.u32(0)
            le.u64(UInt64(z))
            le.u32(1)
        }
        le.u32(0x0605_4b50)
        le.u16(0)
        le.u16(0)
        le.u16(need64 ? 0xFFFF : UInt16(entries.count))
        le.u16(need64 ? 0xFFFF : UInt16(entries.count))
        le.u32(need64 ? 0xFFFF_FFFF : UInt32(cdSize))
        le.u32(need64 ? 0xFFFF_FFFF : UInt32(cdStart))
        le.u16(0)
        try file.pwrite(le.data, at: cdStart)
        try file.commit()
    }

    func abort() { file.abort() }
}

struct LittleEndianBytes {
    var data: [UInt8] = []
    mutating func u16(_ v: UInt16) {
        data.append(UInt8(v & 0xFF))
        data.append(UInt8(v >> 8))
    }
    mutating func u32(_ v: UInt32) { for k in 0..<4 { data.append(UInt8((v >> (8 * UInt32(k))) & 0xFF)) } }
    mutating func u64(_ v: UInt64) { for k in 0..<8 { data.append(UInt8((v >> (8 * UInt64(k))) & 0xFF)) } }
    mutating func bytes(_ b: [UInt8]) { data += b }
}
