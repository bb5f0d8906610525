import Foundation
import Testing

@testable import QConvertKit

/// The compressed-tensors packing on its own (pytest checks it through compressed-tensors itself).
@Suite struct CompressedTensorsTests {
    /// Zero points packed along the output channels read back as written, for widths whose values
    /// straddle 32-bit words (3 bits) and for 4 and 8 bits, signed and unsigned codes.
    @Test(arguments: [(3, true), (4, true), (4, false), (8, true), (8, false)])
    func zeroPointsRoundTrip(bits: Int, signed: Bool) {
        let rows = 37
        let groups = 3
        let half = 1 << (bits - 1)
        let offset = signed ? 0 : half
        var codes: [UInt8] = []
        var want: [Int32] = []
        for i in 0..<(rows * groups) {
            let v = (i * 7 + 3) % (1 << bits) - half  // every signed value in range
            want.append(Int32(v))
            let stored = signed ? UInt8(truncatingIfNeeded: v) : UInt8(v + offset)
            codes.append(bits < 8 && signed ? stored & UInt8((1 << bits) - 1) : stored)
        }
        let packed = codes.withUnsafeBytes {
            CompressedTensors.apply(
                .packZeroPoints(rows: rows, groups: groups, bits: bits, offset: offset, signed: signed), $0)!
        }
        #expect(packed.count == (rows * bits + 31) / 32 * groups * 4)
        let back = packed.withUnsafeBytes {
            CompressedTensorsReader.unpackColumns($0, rows: rows, columns: groups, bits: bits)
        }
        #expect(back == want)
    }

    /// An odd row of packed int4 values keeps its padding nibble 0 after the offset flip, as
    /// compressed-tensors pads with zeros.
    @Test func oddRowsPadWithZero() {
        let q: [UInt8] = [0xFF, 0x00, 0x01, 0x07, 0x08]  // -1, 0, 1, 7, -8 as two's complement codes
        let packed = Packing.pack(q.map { $0 & 0x0F }, shape: [1, 5], bits: 4)
        let out = packed.withUnsafeBytes {
            CompressedTensors.apply(.packRows(rows: 1, cols: 5, bits: 4, packed4: true, signed: true), $0)!
        }
        // offset binary: 7, 8, 9, 15, 0 → nibbles low first; the sixth nibble is padding
        #expect(out == [0x87, 0xF9, 0x00, 0x00])
    }

    /// Layer numbers are generalised only where every layer of that name has the same scheme.
    @Test func targetsGeneraliseLayerNumbers() {
        let modules = [
            "model.layers.0.mlp.up_proj": "g0", "model.layers.1.mlp.up_proj": "g0",
            "model.layers.0.self_attn.q_proj": "g0", "model.layers.1.self_attn.q_proj": "g1"
        ]
        let t = CompressedTensors.targets(
            for: ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj", "model.layers.0.self_attn.q_proj"],
            among: modules)
        #expect(
            t == [
                "re:(.*\\.)?model\\.layers\\.\\d+\\.mlp\\.up_proj$",
                "re:(.*\\.)?model\\.layers\\.0\\.self_attn\\.q_proj$"
            ])
        for pattern in t {
            let re = try! NSRegularExpression(pattern: String(pattern.dropFirst(3)))
            let name = "model.layers.12.mlp.up_proj"
            let hit = re.firstMatch(in: name, options: [.anchored], range: NSRange(name.startIndex..., in: name))
            #expect((hit != nil) == pattern.contains("up_proj"))
        }
    }

    /// The reader selects modules with the targets the writer makes (prefix match, as Python's re.match).
    @Test func readerSelectsWhatTheWriterTargets() throws {
        let target = CompressedTensors.pattern("model.layers.0.mlp.up_proj", general: true)
        let config = try JSONParser.parse(
            """
            {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
              "a": {"targets": ["\(target.replacingOccurrences(of: "\\", with: "\\\\"))"], "weights": {"num_bits": 4}},
              "b": {"targets": ["Linear"], "weights": {"num_bits": 8}}}}}
            """)
        let groups = try #require(try CompressedTensorsReader.groups(config, path: "config.json"))
        #expect(CompressedTensorsReader.selects(groups[0], "model.layers.17.mlp.up_proj"))
        #expect(CompressedTensorsReader.selects(groups[0], "base.model.layers.3.mlp.up_proj"))
        #expect(!CompressedTensorsReader.selects(groups[0], "model.layers.3.mlp.up_proj_2"))
        #expect(!CompressedTensorsReader.selects(groups[0], "model.layers.3.mlp.down_proj"))
        #expect(CompressedTensorsReader.selects(groups[1], "anything.at_all"))
    }
}
