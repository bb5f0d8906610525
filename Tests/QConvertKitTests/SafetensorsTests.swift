import Foundation
import Testing

@testable import QConvertKit

/// Builds a safetensors file from a raw header text and data.
func safetensorsBytes(header: String, data: [UInt8], pad: Bool = true) -> [UInt8] {
    var h = Array(header.utf8)
    if pad { while (h.count % 8) != 0 { h.append(0x20) } }
    var out = [UInt8]()
    withUnsafeBytes(of: UInt64(h.count).littleEndian) { out += $0 }
    return out + h + data
}

func parseHeader(_ bytes: [UInt8]) throws -> SafetensorsHeader {
    try bytes.withUnsafeBytes { try SafetensorsHeader.parse($0, path: "x.safetensors") }
}

@Suite struct SafetensorsValidation {
    @Test func acceptsReferenceVector() throws {
        let h =
            #"{"__metadata__":{"format":"pt"},"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"h":{"dtype":"F16","shape":[1],"data_offsets":[24,26]},"b":{"dtype":"I8","shape":[2],"data_offsets":[26,28]}}"#
        let parsed = try parseHeader(safetensorsBytes(header: h, data: [UInt8](repeating: 0, count: 28)))
        #expect(parsed.tensors.map(\.name) == ["w", "h", "b"])
        #expect(parsed.metadata.map(\.key) == ["format"])
        #expect(try parseHeader(safetensorsBytes(header: "{}", data: [])).tensors.isEmpty)
        #expect(
            try parseHeader(
                safetensorsBytes(header: #"{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#, data: [0, 0, 0, 0])
            ).tensors
                .count == 1)
        #expect(try parseHeader(safetensorsBytes(header: #"{"__metadata__":null}"#, data: [])).metadata.isEmpty)
        // empty tensors may share an offset
        #expect(
            try parseHeader(
                safetensorsBytes(
                    header:
                        #"{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}"#,
                    data: [])
            ).tensors.count == 2)
    }

    /// (what, bytes, words of the message, the rule broken)
    static let cases: [(String, [UInt8], String, String)] = [
        ("too small", [1, 2, 3], "too small", "tooSmall"),
        ("header past end", [0xFF, 0, 0, 0, 0, 0, 0, 0, 0x7B], "runs past the end", "headerPastEnd"),
        ("header over 100 MB", [0, 0xE2, 0x06, 0x06, 0, 0, 0, 0] + Array("{}".utf8), "100 MB", "headerTooLong"),
        ("bad json", safetensorsBytes(header: "{\"a\":", data: []), "not valid JSON", "headerNotJSON"),
        (
            "nul padding", safetensorsBytes(header: "{}\0\0\0\0\0\0", data: [], pad: false), "not valid JSON",
            "headerNotJSON"
        ),
        (
            "not utf8",
            safetensorsBytes(header: "{}", data: []).enumerated().map { $0.offset == 9 ? 0xFF : $0.element }, "UTF-8",
            "headerNotUTF8"
        ),
        (
            "duplicate",
            safetensorsBytes(
                header:
                    #"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                data: [0, 0]), "duplicate key", "headerNotJSON"
        ),
        (
            "hole", safetensorsBytes(header: #"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#, data: [0, 0]),
            "hole", "hole"
        ),
        (
            "overlap",
            safetensorsBytes(
                header:
                    #"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                data: [0, 0]), "overlap", "overlap"
        ),
        (
            "trailing",
            safetensorsBytes(header: #"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, data: [0, 9]),
            "trailing",
            "trailingData"
        ),
        (
            "truncated data",
            safetensorsBytes(header: #"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#, data: [0, 9]),
            "truncated", "truncated"
        ),
        (
            "bad dtype", safetensorsBytes(header: #"{"a":{"dtype":"u8","shape":[1],"data_offsets":[0,1]}}"#, data: [0]),
            "unknown dtype 'u8'", "badDType"
        ),
        (
            "negative dim",
            safetensorsBytes(header: #"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#, data: [0]),
            "not a non-negative integer", "badDimension"
        ),
        (
            "float dim",
            safetensorsBytes(header: #"{"a":{"dtype":"U8","shape":[1.0],"data_offsets":[0,1]}}"#, data: [0]),
            "not a non-negative integer", "badDimension"
        ),
        (
            "size mismatch",
            safetensorsBytes(header: #"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, data: [0, 0, 0, 0]),
            "needs 8 bytes", "sizeMismatch"
        ),
        (
            "overflow",
            safetensorsBytes(
                header: #"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]}}"#,
                data: [0, 0, 0, 0]),
            "overflows", "shapeOverflows"
        ),
        (
            "end before begin",
            safetensorsBytes(
                header:
                    #"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[0],"data_offsets":[2,1]}}"#,
                data: [0, 0]), "end 1 is before begin 2", "endBeforeBegin"
        ),
        (
            "metadata not string", safetensorsBytes(header: #"{"__metadata__":{"a":1}}"#, data: []), "not a string",
            "metadataValueNotString"
        ),
        ("not an object", safetensorsBytes(header: "[1]", data: []), "not a JSON object", "headerNotObject"),
        (
            "missing offsets", safetensorsBytes(header: #"{"a":{"dtype":"U8","shape":[1]}}"#, data: [0]),
            "data_offsets", "badOffsets"
        )
    ]

    /// A rule's case name: the label of its payload, or (for the rules without one) found by value.
    static func ruleName(_ r: SafetensorsRule) -> String {
        if let label = Mirror(reflecting: r).children.first?.label { return label }
        let bare: [(SafetensorsRule, String)] = [
            (.notSafetensors, "notSafetensors"), (.headerNotUTF8, "headerNotUTF8"),
            (.headerNotObject, "headerNotObject"),
            (.metadataNotObject, "metadataNotObject")
        ]
        return bare.first { $0.0 == r }?.1 ?? "?"
    }

    @Test(arguments: cases)
    func rejectsMalformed(_ c: (String, [UInt8], String, String)) {
        do {
            _ = try parseHeader(c.1)
            Issue.record("\(c.0): accepted")
        } catch let e as QConvertError {
            #expect(e.description.contains(c.2), "\(c.0): \(e)")
            // the rule as data: which one, whatever the wording
            #expect(e.violation is SafetensorsRule, "\(c.0): \(e)")
            #expect((e.violation as? SafetensorsRule).map(Self.ruleName) == c.3, "\(c.0): \(e)")
            #expect(e.description.hasPrefix("x.safetensors: "))
            #expect(!e.description.contains("\n"))
        } catch {
            Issue.record("\(c.0): unexpected \(error)")
        }
    }

    @Test func jsonParserKeepsOrderAndExactIntegers() throws {
        let v = try JSONParser.parse(#"{"b":1,"a":[18446744073709551615, -0.5e3],"c":"\u00e9\ud83d\ude00"}"#)
        #expect(v.objectValue?.map(\.0) == ["b", "a", "c"])
        #expect(v["a"]?.arrayValue?[0] == .number("18446744073709551615"))
        #expect(v["c"]?.stringValue == "é😀")
        #expect(throws: JSONParser.ParseError.self) { try JSONParser.parse(#"{"a":1,"a":2}"#) }
        #expect(throws: JSONParser.ParseError.self) {
            try JSONParser.parse(String(repeating: "[", count: 100) + String(repeating: "]", count: 100))
        }
    }
}

@Suite struct SafetensorsRuleData {
    /// The data of a broken rule, not only its wording.
    @Test func rulesCarryTheirFigures() throws {
        let bytes = safetensorsBytes(
            header:
                #"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
            data: [0, 0])
        do {
            _ = try parseHeader(bytes)
            Issue.record("accepted an overlap")
        } catch let e as QConvertError {
            #expect(e.violation as? SafetensorsRule == .overlap(tensor: "b", begin: 1, previousEnd: 2))
            #expect(e.exitStatus == .badInput)
        }
        #expect(throws: QConvertError.violation(path: "x.safetensors", SafetensorsRule.tooSmall(fileSize: 3))) {
            try parseHeader([1, 2, 3])
        }
    }
}
