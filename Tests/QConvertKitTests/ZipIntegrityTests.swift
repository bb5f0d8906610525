import Foundation
import Testing

@testable import QConvertKit

/// A stored zip member's CRC-32 is checked by whoever reads its bytes, not by callers that remember to.
@Suite struct ZipIntegrityTests {
    static func crc32(_ bytes: [UInt8]) -> UInt32 {
        var c: UInt32 = 0xFFFF_FFFF
        for b in bytes {
            c ^= UInt32(b)
            for _ in 0..<8 { c = (c >> 1) ^ (c & 1 == 1 ? 0xEDB8_8320 : 0) }
        }
        return ~c
    }

    static func le(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    static func le(_ v: UInt16) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

    /// An .npz holding one stored member `w.npy` (float32, 4 values); `crc` overrides the recorded CRC.
    static func npz(crc: UInt32? = nil) -> [UInt8] {
        var header = Array("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }".utf8)
        while (10 + header.count + 1) % 64 != 0 { header.append(0x20) }
        header.append(0x0A)
        var npy: [UInt8] = [0x93] + Array("NUMPY".utf8) + [1, 0] + le(UInt16(header.count)) + header
        for v: Float in [1, -2, 3.5, 0.25] { npy += le(v.bitPattern) }
        let name = Array("w.npy".utf8)
        let sum = crc ?? crc32(npy)
        let size = le(UInt32(npy.count))
        var out: [UInt8] =
            le(UInt32(0x0403_4B50)) + le(UInt16(20)) + le(UInt16(0)) + le(UInt16(0)) + le(UInt16(0)) + le(UInt16(0))
        out += le(sum) + size + size + le(UInt16(name.count)) + le(UInt16(0)) + name + npy
        let central = out.count
        out +=
            le(UInt32(0x0201_4B50)) + le(UInt16(20)) + le(UInt16(20)) + le(UInt16(0)) + le(UInt16(0)) + le(UInt16(0))
            + le(UInt16(0))
        out +=
            le(sum) + size + size + le(UInt16(name.count)) + le(UInt16(0)) + le(UInt16(0)) + le(UInt16(0))
            + le(UInt16(0))
        out += le(UInt32(0)) + le(UInt32(0)) + name
        let centralSize = out.count - central
        out += le(UInt32(0x0605_4B50)) + le(UInt16(0)) + le(UInt16(0)) + le(UInt16(1)) + le(UInt16(1))
        out += le(UInt32(centralSize)) + le(UInt32(central)) + le(UInt16(0))
        return out
    }

    func open(_ bytes: [UInt8]) throws -> Checkpoint {
        let path = NSTemporaryDirectory() + "qconvert-crc-\(UUID().uuidString).npz"
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        return try NpzReader().read(path: path)
    }

    @Test func goodMemberReads() throws {
        let ck = try open(Self.npz())
        let values = try ck.entries[0].bytes.withUnsafeBytes { FloatDecoding.toFloat32($0, dtype: .f32, count: 4) }
        #expect(values == [1, -2, 3.5, 0.25])
    }

    /// Opening stays cheap (no CRC pass over the data), but no reader of the bytes gets them unchecked.
    @Test func corruptMemberCannotBeRead() throws {
        let ck = try open(Self.npz(crc: 0x1234_5678))
        do {
            try ck.entries[0].bytes.withUnsafeBytes { _ in () }
            Issue.record("read a corrupt member")
        } catch let e as QConvertError {
            guard case ZipRule.crcMismatch(let member, let stored, _)? = e.violation as? ZipRule else {
                Issue.record("\(e)")
                return
            }
            #expect(member == "w.npy" && stored == 0x1234_5678)
        }
        #expect(throws: QConvertError.self) { try ck.verifyIntegrity() }
    }
}
