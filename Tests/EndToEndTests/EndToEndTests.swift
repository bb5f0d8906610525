import Foundation
import Testing

@testable import QConvertKit

/// Runs the built `qconvert` binary and captures what it prints.
struct Run {
    var status: Int32
    var signaled: Bool
    var stdout: String
    var stderr: String
}

enum Tool {
    static let binary: String = {
        if let p = ProcessInfo.processInfo.environment["QCONVERT"], FileManager.default.isExecutableFile(atPath: p) {
            return p
        }
        var dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<4 {
            let c = dir.appendingPathComponent("qconvert").path
            if FileManager.default.isExecutableFile(atPath: c) { return c }
            dir = dir.deletingLastPathComponent()
        }
        return FileManager.default.currentDirectoryPath + "/.build/debug/qconvert"
    }()

    static let repo: String = {
        var dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        while !FileManager.default.fileExists(atPath: dir.appendingPathComponent("Package.swift").path) {
            dir = dir.deletingLastPathComponent()
        }
        return dir.path
    }()

    @discardableResult
    static func run(_ args: [String], cwd: String? = nil) throws -> Run {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: binary)
        p.arguments = args
        if let cwd { p.currentDirectoryURL = URL(fileURLWithPath: cwd) }
        let out = Pipe()
        let err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        let e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return Run(
            status: p.terminationStatus, signaled: p.terminationReason == .uncaughtSignal,
            stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
    }

    static func tempDir() -> String {
        let d = NSTemporaryDirectory() + "qconvert-e2e-\(UUID().uuidString)"
        try! FileManager.default.createDirectory(atPath: d, withIntermediateDirectories: true)
        return d
    }
}

/// Writes a safetensors file the way the reference writer does (tensors in the given order).
func writeSafetensors(
    _ path: String, _ tensors: [(String, String, [Int], [UInt8])], metadata: [String: String] = ["format": "pt"]
) {
    var header = "{"
    if !metadata.isEmpty {
        header +=
            "\"__metadata__\":{"
            + metadata.sorted { $0.key < $1.key }.map { "\"\($0.key)\":\"\($0.value)\"" }.joined(separator: ",") + "}"
    }
    var data = [UInt8]()
    for (name, dtype, shape, bytes) in tensors {
        if header.count > 1 { header += "," }
        header +=
            "\"\(name)\":{\"dtype\":\"\(dtype)\",\"shape\":[\(shape.map(String.init).joined(separator: ","))],\"data_offsets\":[\(data.count),\(data.count + bytes.count)]}"
        data += bytes
    }
    header += "}"
    let file = safetensorsFile(header, data)
    _ = FileManager.default.createFile(atPath: path, contents: Data(file))
}

func safetensorsFile(_ header: String, _ data: [UInt8]) -> [UInt8] {
    var h = Array(header.utf8)
    while h.count % 8 != 0 { h.append(0x20) }
    var out = [UInt8]()
    withUnsafeBytes(of: UInt64(h.count).littleEndian) { out += $0 }
    return out + h + data
}

func floatBytes(_ x: [Float]) -> [UInt8] { x.withUnsafeBytes { Array($0) } }

func randomFloats(_ n: Int, seed: UInt64) -> [Float] {
    var s = seed
    return (0..<n).map { _ in
        s = s &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
        return Float(Int64(bitPattern: s >> 11) % 20001 - 10000) / 5000
    }
}

func contents(_ p: String) -> [UInt8] { [UInt8](FileManager.default.contents(atPath: p) ?? Data()) }

@Suite(.serialized) struct EndToEnd {
    let sample = Tool.repo + "/Samples/tiny-transformer.safetensors"
    let policy = Tool.repo + "/Samples/policy.cfg"

    @Test func convertsTheSampleWithThePolicy() throws {
        let d = Tool.tempDir()
        let r = try Tool.run([sample, "-o", d + "/out.safetensors", "--policy", policy, "--report", d + "/r.json"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("13 quantized, 1 cast, 8 kept"))
        #expect(r.stdout.contains("worst tensor"))
        let report = try JSONParser.parse(String(decoding: contents(d + "/r.json"), as: UTF8.self))
        #expect(report["totals"]?["quantized"] == .number("13"))
        let out = try Converter.open(d + "/out.safetensors")
        #expect(
            out.entries.contains {
                $0.name == "layers.0.mlp.up_proj.weight" && $0.dtype == .u8 && $0.shape == [256, 32]
            })
        #expect(out.entries.contains { $0.name == "layers.0.mlp.up_proj.weight_scale" && $0.shape == [256, 1] })
        #expect(out.entries.contains { $0.name == "embed_tokens.weight" && $0.dtype == .f16 })
        #expect(out.metadata.contains { $0.key == "format" && $0.value == "pt" })
        #expect(out.metadata.contains { $0.key == MetadataDocument.key })
        let ins = try Tool.run(["inspect", d + "/out.safetensors"])
        #expect(ins.status == 0)
        #expect(ins.stdout.contains("quantization metadata"))
    }

    @Test func outputIsDeterministicWhateverJobs() throws {
        let d = Tool.tempDir()
        for (i, j) in ["1", "2", "4"].enumerated() {
            let r = try Tool.run([sample, "-o", d + "/o\(i).safetensors", "--policy", policy, "--jobs", j, "-q"])
            #expect(r.status == 0, "\(r.stderr)")
        }
        let a = contents(d + "/o0.safetensors")
        #expect(!a.isEmpty)
        #expect(a == contents(d + "/o1.safetensors"))
        #expect(a == contents(d + "/o2.safetensors"))
    }

    @Test func failureLeavesExistingOutputUntouched() throws {
        let d = Tool.tempDir()
        let out = d + "/out.safetensors"
        _ = FileManager.default.createFile(atPath: out, contents: Data("previous".utf8))
        writeSafetensors(
            d + "/nan.safetensors", [("w", "F32", [32, 64], floatBytes(randomFloats(2047, seed: 1) + [.nan]))])
        let r = try Tool.run([d + "/nan.safetensors", "-o", out])
        #expect(r.status == 3)
        #expect(r.stderr.contains("tensor 'w'"))
        #expect(r.stderr.contains("NaN"))
        #expect(contents(out) == Array("previous".utf8))
        #expect(
            try FileManager.default.contentsOfDirectory(atPath: d).sorted() == ["nan.safetensors", "out.safetensors"])
    }

    @Test func malformedInputsFailCleanly() throws {
        let d = Tool.tempDir()
        var corpus: [(String, [UInt8])] = [
            ("empty", []),
            ("short", [1, 2, 3]),
            ("header-past-end", [0xFF, 0, 0, 0, 0, 0, 0, 0] + Array("{}".utf8)),
            ("huge-header", [0, 0xE2, 0x06, 0x06, 0, 0, 0, 0] + Array("{}      ".utf8)),
            ("bad-json", safetensorsFile("{\"a\":{", [])),
            (
                "duplicate",
                safetensorsFile(
                    #"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                    [0, 0])
            ),
            ("hole", safetensorsFile(#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#, [0, 0])),
            (
                "overlap",
                safetensorsFile(
                    #"{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#,
                    [0, 0])
            ),
            ("trailing", safetensorsFile(#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#, [0, 0])),
            ("bad-dtype", safetensorsFile(#"{"a":{"dtype":"Q8","shape":[1],"data_offsets":[0,1]}}"#, [0])),
            (
                "size-mismatch",
                safetensorsFile(
                    #"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, [UInt8](repeating: 0, count: 8))
            ),
            ("negative-dim", safetensorsFile(#"{"a":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#, [0])),
            (
                "overflow-dims",
                safetensorsFile(
                    #"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,4]}}"#, [0, 0, 0, 0])
            )
        ]
        // Truncations of a valid file at many points.
        let good = contents(sample)
        for cut in [9, 100, 2000, good.count / 2, good.count - 1] {
            corpus.append(("truncated-\(cut)", Array(good[0..<cut])))
        }
        for (name, bytes) in corpus {
            let inPath = d + "/\(name).safetensors"
            _ = FileManager.default.createFile(atPath: inPath, contents: Data(bytes))
            let outPath = d + "/out-\(name).safetensors"
            let r = try Tool.run([inPath, "-o", outPath])
            #expect(!r.signaled, "\(name) crashed")
            #expect(r.status == 3, "\(name): exit \(r.status) \(r.stderr)")
            let lines = r.stderr.split(separator: "\n")
            #expect(lines.count == 1, "\(name): \(r.stderr)")
            #expect(r.stderr.contains(inPath), "\(name): \(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: outPath), "\(name) left an output")
        }
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: d).filter { $0.hasPrefix(".") }
        #expect(leftovers.isEmpty)
    }

    @Test func policyErrorsAndUsage() throws {
        let d = Tool.tempDir()
        _ = FileManager.default.createFile(
            atPath: d + "/p.cfg",
            contents: Data("defaults:\n  dtype: int8\nrules:\n  - match: \"*\"\n    granularty: group\n".utf8))
        let r = try Tool.run([sample, "-o", d + "/o.safetensors", "--policy", d + "/p.cfg"])
        #expect(r.status == 2)
        #expect(r.stderr.contains("p.cfg:5:5: unknown key 'granularty'"), "\(r.stderr)")
        #expect(!FileManager.default.fileExists(atPath: d + "/o.safetensors"))
        let strict = try Tool.run([
            sample, "-o", d + "/o.safetensors", "--set", "dtype=int8", "--strict", "--policy",
            Tool.repo + "/Samples/policies/fp8-select.yaml"
        ])
        #expect(strict.status == 0, "\(strict.stderr)")
        let usage = try Tool.run([sample])
        #expect(usage.status == 64)
        let both = try Tool.run([sample, "-o", d + "/x.safetensors", "--preset", "int8", "--policy", d + "/p.cfg"])
        #expect(both.status == 64)
        let missing = try Tool.run([d + "/nope.safetensors", "-o", d + "/x.safetensors"])
        #expect(missing.status == 3)
        #expect(missing.stderr.contains("nope.safetensors"))
        let badSet = try Tool.run([sample, "-o", d + "/x.safetensors", "--set", "calibration=magic"])
        #expect(badSet.status == 2)
        #expect(badSet.stderr.contains("bad calibration 'magic'"))
    }

    @Test func planShowsDecisionsAndTotals() throws {
        let r = try Tool.run(["plan", sample, "--policy", policy])
        #expect(r.status == 0)
        #expect(r.stdout.contains("layers.0.mlp.up_proj.weight"))
        #expect(r.stdout.contains("rule 4 (layers.*.mlp.*)"))
        #expect(r.stdout.contains("group(64)"))
        #expect(r.stdout.contains("22 tensors"))
        let dry = try Tool.run([sample, "--dry-run", "--preset", "w4g128"])
        #expect(dry.status == 0)
        #expect(dry.stdout.contains("int4"))
        let json = try Tool.run(["plan", sample, "--json"])
        let doc = try JSONParser.parse(json.stdout)
        #expect(doc["tensors"]?.arrayValue?.count == 22)
    }

    @Test func dequantizeRestoresFloats() throws {
        let d = Tool.tempDir()
        let x = randomFloats(64 * 96, seed: 5)
        writeSafetensors(
            d + "/in.safetensors",
            [("w", "F32", [64, 96], floatBytes(x)), ("b", "F32", [64], floatBytes(Array(x[0..<64])))])
        for preset in ["int8", "uint8", "w4g128"] {
            let q = try Tool.run([d + "/in.safetensors", "-o", d + "/q.safetensors", "--preset", preset, "-q"])
            #expect(q.status == 0, "\(q.stderr)")
            let r = try Tool.run(["dequantize", d + "/q.safetensors", "-o", d + "/back.safetensors"])
            #expect(r.status == 0, "\(r.stderr)")
            let back = try Converter.open(d + "/back.safetensors")
            #expect(back.entries.map(\.name).sorted() == ["b", "w"])
            let w = back.entries.first { $0.name == "w" }!
            #expect(w.dtype == .f32 && w.shape == [64, 96])
            let values = try w.bytes.withUnsafeBytes { FloatDecoding.toFloat32($0, dtype: .f32, count: 64 * 96) }
            let maxErr = zip(x, values).map { abs($0 - $1) }.max()!
            #expect(maxErr < (preset == "w4g128" ? 0.35 : 0.02), "\(preset): \(maxErr)")
            #expect(maxErr > 0)
            let b = back.entries.first { $0.name == "b" }!
            #expect(try b.bytes.withUnsafeBytes { Array($0) } == floatBytes(Array(x[0..<64])))
        }
    }

    @Test func shardedInShardedOut() throws {
        let d = Tool.tempDir()
        let shardDir = d + "/model"
        try FileManager.default.createDirectory(atPath: shardDir, withIntermediateDirectories: true)
        writeSafetensors(
            shardDir + "/model-00001-of-00002.safetensors",
            [("a.weight", "F32", [32, 64], floatBytes(randomFloats(2048, seed: 1)))])
        writeSafetensors(
            shardDir + "/model-00002-of-00002.safetensors",
            [
                ("b.weight", "F32", [64, 32], floatBytes(randomFloats(2048, seed: 2))),
                ("b.bias", "F32", [64], floatBytes(randomFloats(64, seed: 3)))
            ])
        let index =
            #"{"metadata":{"total_size":16640},"weight_map":{"a.weight":"model-00001-of-00002.safetensors","b.bias":"model-00002-of-00002.safetensors","b.weight":"model-00002-of-00002.safetensors"}}"#
        _ = FileManager.default.createFile(
            atPath: shardDir + "/model.safetensors.index.json", contents: Data(index.utf8))
        let r = try Tool.run([shardDir + "/model.safetensors.index.json", "-o", d + "/out"])
        #expect(r.status == 0, "\(r.stderr)")
        let files = try FileManager.default.contentsOfDirectory(atPath: d + "/out").sorted()
        #expect(
            files == [
                "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"
            ])
        let out = try Converter.open(d + "/out")
        #expect(out.entries.count == 5)
        #expect(out.entries.first { $0.name == "a.weight_scale" }?.shard == "model-00001-of-00002.safetensors")
        let idx = try JSONParser.parse(
            String(decoding: contents(d + "/out/model.safetensors.index.json"), as: UTF8.self))
        #expect(idx["weight_map"]?["b.weight_scale"]?.stringValue == "model-00002-of-00002.safetensors")
        #expect(idx["metadata"]?["total_size"] == .number(String(out.entries.reduce(0) { $0 + $1.bytes.count })))
        // a new shard plan
        let r2 = try Tool.run([shardDir, "-o", d + "/resharded", "--max-shard-size", "3kB"])
        #expect(r2.status == 0, "\(r2.stderr)")
        let f2 = try FileManager.default.contentsOfDirectory(atPath: d + "/resharded").filter {
            $0.hasSuffix(".safetensors")
        }
        #expect(f2.count >= 2)
        #expect(try Converter.open(d + "/resharded").entries.count == 5)
    }

    @Test func keepPresetIsBitExact() throws {
        let d = Tool.tempDir()
        let r = try Tool.run([sample, "-o", d + "/k.safetensors", "--preset", "keep"])
        #expect(r.status == 0)
        let a = try Converter.open(sample)
        let b = try Converter.open(d + "/k.safetensors")
        for e in a.entries {
            let o = b.entries.first { $0.name == e.name }!
            #expect(o.dtype == e.dtype && o.shape == e.shape)
            #expect(try o.bytes.withUnsafeBytes { Array($0) } == e.bytes.withUnsafeBytes { Array($0) })
        }
    }
}

@Suite struct LongCalibrations {
    /// A slow calibration reports progress while it runs, not only when the tensor is done, and `plan`
    /// names the slow tensor before any work.
    @Test func progressMovesDuringACalibrationAndPlanWarns() throws {
        let d = Tool.tempDir()
        let input = d + "/big.safetensors"
        writeSafetensors(input, [("w", "F32", [768, 1024], floatBytes(randomFloats(768 * 1024, seed: 4)))])
        let policy = try PolicyLoader.parse(
            text: "defaults:\n  calibration: entropy\n  search: exhaustive\n", source: "slow.yaml")
        let seen = Box2([ConvertProgress]())
        _ = try Converter.convert(
            input: input, output: d + "/out.safetensors", options: ConvertOptions(policy: policy, jobs: 2)
        ) {
            seen.value.append($0)
        }
        let total = seen.value.last!.bytesTotal
        let partial = seen.value.filter { $0.tensorsDone == 0 && $0.bytesDone > 0 && $0.bytesDone < total }.map(
            \.bytesDone)
        #expect(partial.count >= 2, "\(seen.value.map(\.bytesDone))")
        #expect(partial == partial.sorted())
        // plan reads no tensor data: a larger tensor costs nothing here.
        let large = d + "/large.safetensors"
        writeSafetensors(large, [("w", "F32", [4096, 1024], [UInt8](repeating: 0, count: 4096 * 1024 * 4))])
        let plan = try Tool.run(["plan", large, "--set", "calibration=entropy", "--set", "search=exhaustive"])
        #expect(plan.status == 0)
        #expect(plan.stdout.contains("slow calibration: about"), "\(plan.stdout)")
        #expect(plan.stdout.contains("calibration: about"))
        let fast = try Tool.run(["plan", large, "--set", "calibration=entropy"])
        #expect(!fast.stdout.contains("slow calibration"), "\(fast.stdout)")
    }
}

final class Box2<T>: @unchecked Sendable {
    var value: T
    init(_ v: T) { value = v }
}
