import Foundation

/// Entry points for the fuzz targets (`Fuzz/`, `make fuzz`): each takes untrusted bytes the way a
/// reader does and must either succeed or throw, never crash, hang or allocate without bound.
public enum FuzzEntries {
    /// The targets, by name: what `qconvert-fuzz TARGET` runs.
    public static let targets: [String: @Sendable (UnsafeRawBufferPointer) -> Void] = [
        "safetensors": { readFile($0, ext: ".safetensors", format: "safetensors") },
        "safetensors-header": { b in _ = try? SafetensorsHeader.parse(b, path: "fuzz") },
        "pickle": { b in
            var u = Unpickler(b) { pid in pid }
            _ = try? u.load()
        },
        "zip": { b in
            withTempFile(b, ext: ".zip") { path in
                guard let z = try? ZipArchive(path: path) else { return }
                for m in z.members { _ = try? z.bytes(m).withUnsafeBytes { $0.count } }
            }
        },
        "npy": { b in _ = try? NpzReader.layout(b, total: b.count, name: "fuzz", path: "fuzz") },
        "npz": { readFile($0, ext: ".npz", format: "npz") },
        "pytorch": { readFile($0, ext: ".pt", format: "pytorch") },
        "gguf": { readFile($0, ext: ".gguf", format: "gguf") },
        // a model folder whose config.json says compressed-tensors (int4, groups of 32, affine): the
        // weights file is the hostile part
        "compressed-tensors": { b in
            let dir =
                (FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory())
                + "/qconvert-fuzz-ct-\(getpid())"
            try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let config = """
                {"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32", "quantization_config": {
                "quant_method": "compressed-tensors", "quantization_status": "compressed", "format": "pack-quantized",
                "config_groups": {"g": {"targets": ["re:.*a$"], "format": "pack-quantized", "weights": {"num_bits": 4,
                "type": "int", "symmetric": false, "strategy": "group", "group_size": 32}}, "h": {"targets": ["Linear"],
                "format": "naive-quantized", "weights": {"num_bits": 8, "type": "int", "symmetric": true,
                "strategy": "channel"}}}}}
                """
            guard FileManager.default.createFile(atPath: dir + "/config.json", contents: Data(config.utf8)),
                FileManager.default.createFile(atPath: dir + "/model.safetensors", contents: Data(b))
            else { return }
            touch(path: dir, format: "safetensors")
        },
        "onnx": { b in
            _ = try? OnnxWireCheck.check(b)
            readFile(b, ext: ".onnx", format: "onnx")
            // calibrate's own reading of the same bytes: the graph's outline, then the copy onnxruntime runs
            withTempFile(b, ext: ".onnx") { path in
                guard let f = try? MappedFile(path: path),
                    let outline = try? ActivationCalibrator.Outline(f.bytes(at: 0, count: f.size), path: path)
                else { return }
                _ = outline.targets(ActivationCalibrator.defaultOps)
                _ = try? RunnableCopy.write(f, sourcePath: path, model: path + ".copy.onnx", tail: [])
                unlink(path + ".copy.onnx")
                unlink(path + ".copy.onnx.data")
            }
        },
        "policy": { b in
            let text = String(decoding: b, as: UTF8.self)
            if let p = try? PolicyLoader.parse(text: text, source: "fuzz.yaml") {
                _ = try? PolicyLoader.applyOverrides(p, ["dtype=int4", "group_size=32"])
            }
        }
    ]

    /// Writes the bytes to a private temporary file (readers map files) and hands over its path.
    static func withTempFile(_ b: UnsafeRawBufferPointer, ext: String, _ body: (String) -> Void) {
        let dir = FileManager.default.fileExists(atPath: "/dev/shm") ? "/dev/shm" : NSTemporaryDirectory()
        let path = dir + "/qconvert-fuzz-\(getpid())" + ext
        guard let f = fopen(path, "wb") else { return }
        if b.count > 0 { fwrite(b.baseAddress, 1, b.count, f) }
        fclose(f)
        body(path)
        unlink(path)
    }

    /// Reads the file as `format` and touches every tensor's bytes, as a conversion would.
    static func readFile(_ b: UnsafeRawBufferPointer, ext: String, format: String) {
        withTempFile(b, ext: ext) { path in touch(path: path, format: format) }
    }

    /// Reads the file or folder as `format` and touches every tensor's bytes, as a conversion would.
    static func touch(path: String, format: String) {
        guard let reader = FormatRegistry.readers.first(where: { $0.name == format }),
            let ck = try? reader.read(path: path)
        else { return }
        for e in ck.entries {
            _ = try? e.bytes.withUnsafeBytes { raw -> Int in
                // decode floats like the quantizer does, bounded to keep each run short
                if e.dtype.isFloatingPoint, e.dtype.bits <= 32, raw.count >= e.elementCount * e.dtype.bits / 8 {
                    return FloatDecoding.toFloat32(raw, dtype: e.dtype, count: min(e.elementCount, 1 << 16)).count
                }
                return raw.count
            }
        }
        try? ck.verifyIntegrity()
    }
}
