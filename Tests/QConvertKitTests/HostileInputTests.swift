import Foundation
import Testing

@testable import QConvertKit

/// Inputs found by the fuzz targets (make fuzz) that crashed a reader; each must now be refused
/// with an error. The bytes are written out here so that the tests need no corpus.
@Suite struct HostileInputTests {
    func unpickle(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { raw in
            var u = Unpickler(raw) { $0 }
            _ = try u.load()
        }
    }

    /// BINBYTES8 / BINUNICODE8 / BINBYTES / BINSTRING lengths past the end (BINBYTES8's used to trap
    /// converting a 64-bit length to Int).
    @Test func lengthFieldsPastTheEndAreErrors() {
        let huge: [UInt8] = [0x01, 0x00, 0x4b, 0x9d, 0x9d, 0x9d, 0x9d, 0x9d]
        for op: UInt8 in [0x8e, 0x8d, 0x96] {
            #expect(throws: (any Error).self) { try unpickle([0x80, 0x04, op] + huge + [0x2e]) }
        }
        for op in [UInt8(ascii: "B"), UInt8(ascii: "T"), UInt8(ascii: "X")] {
            #expect(throws: (any Error).self) { try unpickle([0x80, 0x02, op, 0xff, 0xff, 0xff, 0xff, 0x2e]) }
        }
    }
}
