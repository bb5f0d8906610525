import Foundation

/// A Hugging Face model folder: `config.json` beside the weights. Its other files (tokenizer,
/// generation config, chat template, README, sentence-transformers modules) belong to the model and
/// travel with it into a folder output unchanged.
public struct HFModelFolder: Sendable {
    /// The folder holding config.json.
    public let folder: String
    /// config.json, parsed (an object).
    public let config: JSONValue
    /// True when the input named the folder itself (not one weight file inside it).
    public let namedAsFolder: Bool

    /// Files the converter writes anew, never copied: the weights and their index.
    static func isWeightFile(_ relative: String) -> Bool {
        guard !relative.contains("/") else { return false }
        return relative.hasSuffix(".safetensors") || relative.hasSuffix(".safetensors.index.json")
            || (relative.hasPrefix("pytorch_model")
                && (relative.hasSuffix(".bin") || relative.hasSuffix(".bin.index.json")))
    }

    /// Bounds on what a folder may hold before it is refused as not a model folder.
    static let maxCompanions = 10_000
    static let maxConfigBytes = 16 << 20

    /// The model folder an input path belongs to: the path itself when it is a folder with config.json,
    /// or the folder of a weight file with config.json beside it; nil otherwise. A folder's config.json
    /// that cannot be read is an error; one beside a single file only means the file is read on its own.
    public static func detect(input path: String) throws -> HFModelFolder? {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else { return nil }
        let folder = isDir.boolValue ? path : URL(fileURLWithPath: path).deletingLastPathComponent().path
        let configPath = folder + "/config.json"
        guard FileManager.default.fileExists(atPath: configPath) else { return nil }
        do {
            let attributes = try? FileManager.default.attributesOfItem(atPath: configPath)
            if let size = attributes?[.size] as? Int, size > maxConfigBytes {
                throw QConvertError.badInput(path: configPath, message: "config.json is larger than 16 MB")
            }
            guard let data = FileManager.default.contents(atPath: configPath) else {
                throw QConvertError.io(path: configPath, message: "cannot read config.json")
            }
            let config: JSONValue
            do { config = try data.withUnsafeBytes { try JSONParser.parse($0) } } catch {
                throw QConvertError.badInput(path: configPath, message: "config.json is not valid JSON: \(error)")
            }
            guard config.objectValue != nil else {
                throw QConvertError.badInput(path: configPath, message: "config.json is not a JSON object")
            }
            return HFModelFolder(folder: folder, config: config, namedAsFolder: isDir.boolValue)
        } catch  where !isDir.boolValue {
            return nil
        }
    }

    /// Paths relative to the folder of every file that is not a weight file, sorted: what a folder output
    /// copies. Walked only then (a single file beside a config.json may sit in a large folder).
    public func companions() throws -> [String] {
        var companions: [String] = []
        if let walker = FileManager.default.enumerator(atPath: folder) {
            while let rel = walker.nextObject() as? String {
                let last = (rel as NSString).lastPathComponent
                var d: ObjCBool = false
                guard FileManager.default.fileExists(atPath: folder + "/" + rel, isDirectory: &d) else { continue }
                if last.hasPrefix(".") && (d.boolValue || last.hasSuffix(".tmp")) {
                    walker.skipDescendants()  // hidden folders (.git, .cache) and temporaries; .gitattributes travels
                    continue
                }
                guard !d.boolValue, !Self.isWeightFile(rel) else { continue }
                companions.append(rel)
                if companions.count > Self.maxCompanions {
                    throw QConvertError.badInput(
                        path: folder, message: "holds more than \(Self.maxCompanions) files; not a model folder")
                }
            }
        }
        return companions.sorted()
    }

    /// The model's float type from config.json (`torch_dtype`, or `dtype` as transformers 5 writes it).
    public var modelDType: DType? {
        let name = config["torch_dtype"]?.stringValue ?? config["dtype"]?.stringValue
        switch name {
        case "float32": return .f32
        case "float16": return .f16
        case "bfloat16": return .bf16
        default: return nil
        }
    }

    /// Whether the model ties its output projection to the input embedding.
    public var tiesWordEmbeddings: Bool {
        if case .bool(let b) = config["tie_word_embeddings"] ?? .null { return b }
        return false
    }
}
