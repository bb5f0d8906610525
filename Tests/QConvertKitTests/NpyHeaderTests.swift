import Foundation
import Testing

@testable import QConvertKit

/// The .npy header parser on its own (pytest covers it through numpy, which needs the Python stack).
@Suite struct NpyHeaderTests {
    func parse(_ b: [UInt8]) throws -> Npy.Header {
        try b.withUnsafeBytes { try Npy.parseHeader($0, name: "m.npy", path: "t.npz") }
    }

    /// A version-1 header around `dict` (no padding rules: the parser does not need them).
    func v1(_ dict: String, major: UInt8 = 1) -> [UInt8] {
        let text = Array(dict.utf8)
        var out: [UInt8] = [0x93] + Array("NUMPY".utf8) + [major, 0]
        if major == 1 {
            out += [UInt8(text.count & 0xFF), UInt8(text.count >> 8)]
        } else {
            out += [UInt8(text.count & 0xFF), UInt8(text.count >> 8 & 0xFF), 0, 0]
        }
        return out + text
    }

    @Test func writtenHeadersParseBack() throws {
        for (descr, shape) in [("<f4", [3, 4]), ("<f2", []), ("|u1", [0]), ("<i8", [1, 1, 7])] {
            let h = try parse(Npy.headerBytes(descr: descr, shape: shape))
            #expect(h.descr == descr && h.shape == shape && !h.fortranOrder)
        }
        let h = try parse(v1("{'shape': (2, 3), 'fortran_order': True, 'descr': '<f8'}", major: 3))
        #expect(h.shape == [2, 3] && h.fortranOrder && h.dataOffset == 12 + 56)
    }

    static let malformed: [(String, String)] = [
        ("{'descr': '<f4', 'fortran_order': False}", "exactly descr"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'x': 1}", "exactly descr"),
        ("{'descr': '<f4', 'fortran_order': 0, 'shape': (3,)}", "fortran_order"),
        ("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,)}", "structured"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,)}", "member"),
        ("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (3,)}", "cannot read"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (3,", "cannot read"),
        ("not a dict", "cannot read")
    ]

    @Test(arguments: malformed) func malformedHeadersAreRefusedNamingTheMember(_ c: (String, String)) {
        do {
            _ = try parse(v1(c.0))
            Issue.record("accepted \(c.0)")
        } catch {
            #expect("\(error)".contains("member 'm.npy'") && "\(error)".contains(c.1), "\(error)")
            #expect((error as? QConvertError)?.violation is NpyRule, "\(error)")
        }
    }

    @Test func truncationAndVersionsAreRefused() {
        var b = v1("{'descr': '<f4', 'fortran_order': False, 'shape': (3,)}")
        #expect(throws: QConvertError.self) { try parse(Array(b.prefix(20))) }  // header cut short
        #expect(throws: QConvertError.self) { try parse(Array(b.prefix(8))) }  // before the length
        b[6] = 4
        #expect(throws: QConvertError.violation(path: "t.npz", NpyRule.unsupportedVersion(member: "m.npy", major: 4))) {
            try parse(b)
        }
        b[0] = 0x92
        #expect(throws: QConvertError.self) { try parse(b) }  // bad magic
        var huge = v1("{}", major: 2)
        huge[10] = 0x10  // a 1 MiB header length
        #expect(throws: QConvertError.self) { try parse(huge) }
    }
}
