import Foundation
import Testing

@testable import QConvertKit

/// Every entry of onnxruntime's function table that qconvert declares is called here against the
/// library the test setup installs (the onnxruntime wheel in .venv): a wrong index crashes or fails.
@Suite(.serialized) struct OnnxRuntimeTests {
    typealias PB = ProtobufBytes

    /// A model computing y = x · W: x float [batch, 3] (batch free), W [3, 2] = [[1, 2], [3, 4], [5, 6]].
    static func model() -> [UInt8] {
        let w: [Float] = [1, 2, 3, 4, 5, 6]
        let raw = w.withUnsafeBytes { Array($0) }
        // TensorProto: dims (1) 3 and 2, data_type (2) float, name (8), raw_data (9)
        let tensor: [UInt8] = [0x08, 3, 0x08, 2, 0x10, 1] + PB.text(8, "W") + PB.ld(9, raw)
        func valueInfo(_ name: String, dims: [Int?]) -> [UInt8] {
            var shape: [UInt8] = []
            for d in dims { shape += PB.ld(1, d.map { [0x08] + PB.varint($0) } ?? PB.text(2, "batch")) }
            let tensorType: [UInt8] = [0x08, 1] + (dims.isEmpty ? [] : PB.ld(2, shape))
            return PB.text(1, name) + PB.ld(2, PB.ld(1, tensorType))
        }
        let node = PB.text(1, "x") + PB.text(1, "W") + PB.text(2, "y") + PB.text(4, "MatMul")
        let graph =
            PB.ld(1, node) + PB.text(2, "g") + PB.ld(5, tensor)
            + PB.ld(11, valueInfo("x", dims: [nil, 3])) + PB.ld(12, valueInfo("y", dims: []))
        // ir_version (1) 8, opset_import (8) { version (2) 17 }, graph (7)
        return [0x08, 8] + PB.ld(8, [0x10, 17]) + PB.ld(7, graph)
    }

    func runtime() throws -> OnnxRuntime {
        // the test setup installs onnxruntime in .venv; its absence is a failure, not a skip
        try OnnxRuntime.load()
    }

    @Test func statusEntries() throws {
        let rt = try runtime()
        let (code, message) = rt.statusRoundTrip(code: 2, message: "qconvert test")
        #expect(code == 2)
        #expect(message == "qconvert test")
        #expect(rt.version.hasPrefix("1."))
    }

    @Test func sessionEntries() throws {
        let rt = try runtime()
        let s = try rt.session(model: Self.model(), name: "test.onnx")
        #expect(s.inputs == [OrtValueInfo(name: "x", elementType: 1, shape: [-1, 3])])
        #expect(s.outputNames == ["y"])
        let x: [Float] = [1, 0, 0, 0, 1, 1]
        var got: [Float] = []
        var shape: [Int64] = []
        try s.run(
            [.init(name: "x", elementType: 1, shape: [2, 3], bytes: x.withUnsafeBytes { Array($0) })], outputs: ["y"]
        ) { k, sh, values in
            #expect(k == 0)
            shape = sh
            got = Array(values)
        }
        #expect(shape == [2, 2])
        #expect(got == [1, 2, 8, 10])
    }

    /// y for x = [[1, 0, 0], [0, 1, 1]] from a session of `path`.
    func product(_ rt: OnnxRuntime, path: String) throws -> [Float] {
        let s = try rt.session(path: path, name: path)
        let x: [Float] = [1, 0, 0, 0, 1, 1]
        var got: [Float] = []
        try s.run(
            [.init(name: "x", elementType: 1, shape: [2, 3], bytes: x.withUnsafeBytes { Array($0) })], outputs: ["y"]
        ) { _, _, values in got = Array(values) }
        return got
    }

    /// calibrate's copy of a model: W moves to the data file at an aligned offset, the graph gains the
    /// tail, and onnxruntime computes the same product from it; a source whose W is already external data
    /// (beside it) is copied the same way.
    @Test func runnableCopyMovesWeightsToAMappedDataFile() throws {
        let rt = try runtime()
        let dir = NSTemporaryDirectory() + "/qconvert-runnable-\(getpid())"
        try? FileManager.default.removeItem(atPath: dir)
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let source = dir + "/m.onnx"
        try Data(Self.model()).write(to: URL(fileURLWithPath: source))
        #expect(try product(rt, path: source) == [1, 2, 8, 10])
        let copy = dir + "/copy.onnx"
        try RunnableCopy.write(MappedFile(path: source), sourcePath: source, model: copy, tail: [], threshold: 16)
        let data = try Data(contentsOf: URL(fileURLWithPath: copy + ".data"))
        let w: [Float] = [1, 2, 3, 4, 5, 6]
        #expect(data == Data(w.withUnsafeBytes { Array($0) }))
        let text = try Data(contentsOf: URL(fileURLWithPath: copy))
        #expect(text.range(of: data) == nil)  // the weight's bytes are only in the data file
        #expect(try product(rt, path: copy) == [1, 2, 8, 10])

        // the copy as a source: its external W is copied again, into the next data file
        let again = dir + "/again.onnx"
        try RunnableCopy.write(MappedFile(path: copy), sourcePath: copy, model: again, tail: [], threshold: 16)
        #expect(try Data(contentsOf: URL(fileURLWithPath: again + ".data")) == data)
        #expect(try product(rt, path: again) == [1, 2, 8, 10])

        // an external location leaving the model's folder is refused, naming the tensor
        var hostile = Self.model()
        let entries = PB.ld(13, PB.text(1, "location") + PB.text(2, "../x.bin")) + [0x70, 1]
        let tensor: [UInt8] = [0x08, 3, 0x08, 2, 0x10, 1] + PB.text(8, "W") + entries
        hostile = [0x08, 8] + PB.ld(8, [0x10, 17]) + PB.ld(7, PB.ld(5, tensor))
        try Data(hostile).write(to: URL(fileURLWithPath: dir + "/h.onnx"))
        #expect(throws: QConvertError.self) {
            try RunnableCopy.write(
                MappedFile(path: dir + "/h.onnx"), sourcePath: dir + "/h.onnx", model: dir + "/h2.onnx", tail: [])
        }
        #expect(!FileManager.default.fileExists(atPath: dir + "/h2.onnx"))
    }

    @Test func errorsCarryOnnxruntimesMessage() throws {
        let rt = try runtime()
        #expect(throws: QConvertError.self) { try rt.session(model: [0x08, 8, 0x3A, 0x05, 1, 2], name: "bad.onnx") }
        let s = try rt.session(model: Self.model(), name: "test.onnx")
        do {
            try s.run(
                [.init(name: "x", elementType: 1, shape: [2, 4], bytes: [UInt8](repeating: 0, count: 32))],
                outputs: ["y"]
            ) {
                _, _, _ in
            }
            Issue.record("a wrong shape ran")
        } catch QConvertError.badInput(let path, let message) {
            #expect(path == "test.onnx")
            #expect(message.hasPrefix("onnxruntime: "))
        }
    }

    @Test func aMissingLibraryIsOneLineSayingHowToInstall() {
        do {
            _ = try OnnxRuntime.load(explicit: "/nonexistent/libonnxruntime.so")
            Issue.record("loaded a missing library")
        } catch QConvertError.usage(let m) {
            #expect(m.contains("pip install onnxruntime"))
            #expect(!m.contains("\n"))
        } catch {
            Issue.record("\(error)")
        }
    }
}
