import Foundation

/// The axis setting of a policy: the output-channel axis the format knows, or a fixed one.
public enum AxisSetting: Sendable, Equatable, Hashable {
    case auto
    case fixed(Int)
}

/// How an ONNX output holds a quantized MatMul/Gemm weight (see OnnxForms.swift).
public enum OnnxForm: String, Sendable, CaseIterable {
    /// MatMulNBits where the weight fits, DequantizeLinear elsewhere: never slower than float in onnxruntime.
    case auto
    /// DequantizeLinear on the weight: portable to any ONNX runtime.
    case qdq
    /// onnxruntime's com.microsoft.MatMulNBits (integer kernels, weights stay packed).
    case matmulnbits
    /// DynamicQuantizeLinear on activations + MatMulInteger (onnxruntime's quantize_dynamic pattern).
    case dynamic
}

/// A calibration method by its registered name (`Calibration.registry`); the parameters are separate
/// policy keys.
public struct CalibrationName: RawRepresentable, CaseIterable, Sendable, Hashable {
    public let rawValue: String
    public init?(rawValue: String) {
        guard Calibration.registry.contains(where: { $0.name == rawValue }) else { return nil }
        self.rawValue = rawValue
    }
    public static var allCases: [CalibrationName] {
        Calibration.registry.compactMap { CalibrationName(rawValue: $0.name) }
    }
    public static let max = CalibrationName(rawValue: MaxCalibration.name)!
}

/// entropy and mse: coarse-to-fine over the thresholds, or every threshold.
public enum CalibrationSearch: String, Sendable, CaseIterable { case fast, exhaustive }

/// ONNX: what to do when the model's opset cannot express a scheme with DequantizeLinear.
public enum OnnxFallback: String, Sendable, CaseIterable {
    /// Dequantize with Cast and Mul instead.
    case decompose
    case refuse
}

/// How quantized tensors are laid out in a safetensors output.
public enum OutputLayout: String, Sendable, CaseIterable {
    /// qconvert's own: `NAME` holds the values, `NAME_scale` and `NAME_zero_point` the parameters, the
    /// metadata document says how to read them. Only qconvert reads it as quantized.
    case qconvert
    /// The layout transformers and vLLM load as quantized (`quantization_config` in config.json).
    case compressedTensors = "compressed-tensors"
}

/// Symmetric (scale) integer mappings: ±(2^(b−1)−1), or the full range −2^(b−1) … 2^(b−1)−1.
public enum SymmetricRange: String, Sendable, CaseIterable { case restricted, full }

/// Settings a policy's `defaults` or a rule may give. A rule sets only the keys it names.
public struct PolicySettings: Sendable, Equatable {
    public var dtype: TargetType?
    public var mapping: Mapping?
    public var granularity: Granularity?
    public var axis: AxisSetting?
    public var groupSize: Int?
    public var calibration: CalibrationName?
    public var percentile: Double?
    public var bins: Int?
    public var levels: Int?
    public var search: CalibrationSearch?
    public var minElements: Int?
    public var minRank: Int?
    public var saturate: Bool?
    public var onnxFallback: OnnxFallback?
    public var symmetricRange: SymmetricRange?
    /// ONNX: the form of quantized MatMul/Gemm weights.
    public var onnxForm: OnnxForm?
    /// ONNX MatMulNBits: accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute).
    public var accuracyLevel: Int?

    public init() {}

    /// `other`'s keys win where it has them.
    public func overlaid(with other: PolicySettings) -> PolicySettings {
        var r = self
        if let v = other.dtype { r.dtype = v }
        if let v = other.mapping { r.mapping = v }
        if let v = other.granularity { r.granularity = v }
        if let v = other.axis { r.axis = v }
        if let v = other.groupSize { r.groupSize = v }
        if let v = other.calibration { r.calibration = v }
        if let v = other.percentile { r.percentile = v }
        if let v = other.bins { r.bins = v }
        if let v = other.levels { r.levels = v }
        if let v = other.search { r.search = v }
        if let v = other.minElements { r.minElements = v }
        if let v = other.minRank { r.minRank = v }
        if let v = other.saturate { r.saturate = v }
        if let v = other.onnxFallback { r.onnxFallback = v }
        if let v = other.onnxForm { r.onnxForm = v }
        if let v = other.symmetricRange { r.symmetricRange = v }
        if let v = other.accuracyLevel { r.accuracyLevel = v }
        return r
    }

    /// The `int8` preset's values: what every key not given falls back to.
    public static let builtIn: PolicySettings = {
        var s = PolicySettings()
        s.dtype = .int8
        s.mapping = .scale
        s.granularity = .channel
        s.axis = .auto
        s.groupSize = 128
        s.calibration = .max
        s.percentile = 99.99
        s.bins = 2048
        s.levels = nil
        s.search = .fast
        s.minElements = 1024
        s.minRank = 2
        s.saturate = false
        s.onnxFallback = .decompose
        s.onnxForm = .auto
        s.accuracyLevel = 4
        s.symmetricRange = .restricted
        return s
    }()
}

/// A comparison on an integer property (`rank: ">= 3"`, `elements: "< 4096"`, `rank: 2`).
public struct IntComparison: Sendable, Equatable {
    public enum Op: String, Sendable {
        case eq = "=="
        case ne = "!="
        case lt = "<"
        case le = "<="
        case gt = ">"
        case ge = ">="
    }
    public var op: Op
    public var value: Int

    public func test(_ x: Int) -> Bool {
        switch op {
        case .eq: return x == value
        case .ne: return x != value
        case .lt: return x < value
        case .le: return x <= value
        case .gt: return x > value
        case .ge: return x >= value
        }
    }
}

/// A tensor-name pattern: a glob (`*`, `?`, `[...]`) or a regular expression (`re:`).
public struct NamePattern: Sendable {
    public let text: String
    let regex: LinearRegex

    public init?(_ text: String) {
        guard let p = try? NamePattern(parsing: text) else { return nil }
        self = p
    }

    /// Compiles the pattern; the error says what is wrong with it.
    public init(parsing text: String) throws {
        self.text = text
        let pattern: String
        if text.hasPrefix("re:") {
            pattern = "^(?:" + String(text.dropFirst(3)) + ")$"
        } else {
            pattern = NamePattern.globToRegex(text)
        }
        regex = try LinearRegex(pattern)
    }

    /// Whether the whole name matches; linear in the name's length (see `LinearRegex`).
    public func matches(_ name: String) -> Bool {
        regex.matches(name)
    }

    /// `*` matches any run of characters (dots included), `?` one character, `[...]` a class.
    static func globToRegex(_ g: String) -> String {
        var out = "^"
        var inClass = false
        for c in g {
            if inClass {
                if c == "]" {
                    inClass = false
                    out.append("]")
                } else if c == "\\" {
                    out.append("\\\\")
                } else {
                    out.append(c)
                }
                continue
            }
            switch c {
            case "*": out.append(".*")
            case "?": out.append(".")
            case "[":
                inClass = true
                out.append("[")
            case ".", "(", ")", "+", "|", "^", "$", "{", "}", "\\":
                out.append("\\")
                out.append(c)
            default: out.append(c)
            }
        }
        if inClass {  // an unclosed '[': the whole glob is literal text
            return "^"
                + g.unicodeScalars.map {
                    $0.properties.isAlphabetic || ("0"..."9").contains($0) ? String($0) : "\\" + String($0)
                }.joined()
                + "$"
        }
        return out + "$"
    }
}

/// One rule of a policy: selectors, and the settings it applies to the tensors it selects.
public struct PolicyRule: Sendable {
    public var match: NamePattern?
    public var sourceDTypes: [DType]?
    public var rank: IntComparison?
    public var elements: IntComparison?
    public var ops: [String]?
    public var settings: PolicySettings
    /// Where the rule starts in its file (1-based), for messages.
    public var line: Int
    public var column: Int

    /// A short human label: its match pattern or its position.
    public var label: String {
        if let m = match { return "rule \(m.text)" }
        return "rule at line \(line)"
    }
}

/// The facts a policy can select a tensor by.
public struct TensorFacts: Sendable {
    public var name: String
    public var dtype: DType
    public var shape: [Int]
    public var consumerOps: [String]
    public init(name: String, dtype: DType, shape: [Int], consumerOps: [String] = []) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.consumerOps = consumerOps
    }
}

/// A parsed policy: defaults plus ordered rules (first match wins).
public struct Policy: Sendable {
    /// Where it came from: a file path, `preset:NAME`, plus any `--set` overrides.
    public var source: String
    /// The exact text it was read from (hashed into the metadata), `--set` lines appended.
    public var text: String
    public var defaults: PolicySettings
    public var rules: [PolicyRule]
    /// The safetensors output layout; nil: compressed-tensors for a Hugging Face model folder written
    /// to a folder, qconvert's own otherwise.
    public var layout: OutputLayout?
    /// How activations are quantized when statistics are given (`--calibration`).
    public var activations = ActivationPolicy()

    /// The first rule that selects the tensor, if any.
    public func firstMatch(_ t: TensorFacts) -> (index: Int, rule: PolicyRule)? {
        for (i, r) in rules.enumerated() {
            if let m = r.match, !m.matches(t.name) { continue }
            if let d = r.sourceDTypes, !d.contains(t.dtype) { continue }
            if let c = r.rank, !c.test(t.shape.count) { continue }
            if let c = r.elements, !c.test(Shape(t.shape).elementCount) { continue }
            if let ops = r.ops, !ops.contains(where: { t.consumerOps.contains($0) }) { continue }
            return (i, r)
        }
        return nil
    }
}
