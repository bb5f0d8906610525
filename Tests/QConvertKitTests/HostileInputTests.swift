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
            // the rule as data: a length that runs past the end, with the length read
            #expect(throws: PickleRule.pastEnd(what: "a length", bytes: 0x9d9d_9d9d_9d4b_0001)) {
                try unpickle([0x80, 0x04, op] + huge + [0x2e])
            }
        }
        for op in [UInt8(ascii: "B"), UInt8(ascii: "T"), UInt8(ascii: "X")] {
            #expect(throws: (any Error).self) { try unpickle([0x80, 0x02, op, 0xff, 0xff, 0xff, 0xff, 0x2e]) }
        }
    }

    @Test func disallowedOpcodesAndGlobalsAreNamed() {
        // INST builds arbitrary objects
        #expect(throws: PickleRule.opcodeNotAllowed(0x69, at: 2)) { try unpickle([0x80, 0x02, 0x69, 0x2e]) }
        let global: [UInt8] = [0x80, 0x02, 0x63] + Array("os\nsystem\n".utf8) + [0x2e]
        #expect(throws: PickleRule.globalNotAllowed(module: "os", name: "system")) { try unpickle(global) }
        #expect(throws: PickleRule.unsupportedProtocol(9)) { try unpickle([0x80, 0x09, 0x2e]) }
    }
}
