import Foundation
import Testing

@testable import QConvertKit

/// The ONNX writer edits a copy of the model it was read as: one reading converts to any number of
/// outputs (it used to free the reader's payloads, so a second conversion was refused, and batch read
/// every ONNX input again for each variant).
@Suite struct OnnxReadOnceTests {
    func varint(_ v: Int) -> [UInt8] { ProtobufBytes.varint(v) }
    func ld(_ field: Int, _ payload: [UInt8]) -> [UInt8] { ProtobufBytes.ld(field, payload) }
    func text(_ field: Int, _ s: String) -> [UInt8] { ProtobufBytes.text(field, s) }

    /// y = x · w with w a 64×64 float initializer, opset 13.
    func model() -> [UInt8] {
        var raw: [UInt8] = []
        for k in 0..<(64 * 64) { withUnsafeBytes(of: Float(sin(Double(k))).bitPattern.littleEndian) { raw += $0 } }
        let tensor =
            varint(1 << 3) + varint(64) + varint(1 << 3) + varint(64) + varint(2 << 3) + varint(1) + text(8, "w")
            + ld(9, raw)
        let node = text(1, "x") + text(1, "w") + text(2, "y") + text(3, "mm") + text(4, "MatMul")
        let graph = ld(1, node) + text(2, "g") + ld(5, tensor) + ld(11, text(1, "x")) + ld(12, text(1, "y"))
        return varint(1 << 3) + varint(8) + ld(8, text(1, "") + varint(2 << 3) + varint(13)) + ld(7, graph)
    }

    @Test func oneReadingConvertsTwice() throws {
        let dir = NSTemporaryDirectory() + "qconvert-onnx-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try Data(model()).write(to: URL(fileURLWithPath: dir + "/m.onnx"))
        let before = try Data(contentsOf: URL(fileURLWithPath: dir + "/m.onnx"))
        let ck = try Converter.open(dir + "/m.onnx")
        let policy = try PolicyLoader.applyOverrides(PolicyLoader.preset(.int8), ["onnx_form=qdq"])
        var options = ConvertOptions(policy: policy)
        let a = try Converter.convert(ck, output: dir + "/a.onnx", options: options)
        let b = try Converter.convert(ck, output: dir + "/b.onnx", options: options)
        #expect(a.quantizedCount == 1 && b.quantizedCount == 1)
        let da = try Data(contentsOf: URL(fileURLWithPath: dir + "/a.onnx"))
        #expect(da == (try Data(contentsOf: URL(fileURLWithPath: dir + "/b.onnx"))))
        // the reading still holds the float weights, unchanged
        let w = try ck.entries[0].bytes.withUnsafeBytes { FloatDecoding.toFloat32($0, dtype: .f32, count: 64 * 64) }
        #expect(w[1] == Float(sin(1.0)))
        #expect(before == (try Data(contentsOf: URL(fileURLWithPath: dir + "/m.onnx"))))
        // a conversion that consumes the reading releases its memory; the reading is then refused
        options.consumeInput = true
        _ = try Converter.convert(ck, output: dir + "/c.onnx", options: options)
        #expect(da == (try Data(contentsOf: URL(fileURLWithPath: dir + "/c.onnx"))))
        #expect(ck.consumed)
        #expect(throws: QConvertError.self) { try Converter.convert(ck, output: dir + "/d.onnx", options: options) }
    }
}
