import Foundation

/// What happens to one tensor.
public enum Decision: Sendable, Equatable {
    case keep(reason: String)
    case cast(QuantScheme)
    case quantize(QuantScheme)

    public var scheme: QuantScheme? {
        switch self {
        case .keep: return nil
        case .cast(let s), .quantize(let s): return s
        }
    }
}

/// The plan for one tensor: the decision, which rule made it, and the output tensors it yields.
public struct TensorPlan: Sendable {
    public var entryIndex: Int
    public var name: String
    public var dtype: DType
    public var shape: [Int]
    public var decision: Decision
    /// "defaults" or "rule N (pattern)", 1-based.
    public var rule: String
    /// True when the format did not say which axis holds the output channels.
    public var axisGuessed: Bool
    public var bytesBefore: Int
    public var bytesAfter: Int
    public var warnings: [String]
    public var valuesName: String
    public var scaleName: String?
    public var zeroPointName: String?
    public var paramShape: [Int]
    /// ONNX: "decompose" or "refuse" when the opset cannot express the scheme.
    public var onnxFallback: OnnxFallback = .decompose
    /// ONNX: the requested form of a quantized MatMul/Gemm weight, and MatMulNBits' accuracy_level.
    public var onnxForm: OnnxForm = .auto
    public var accuracyLevel: Int = 4
    /// ONNX: the form the writer chose and why (filled in by the ONNX writer's check, shown by plan).
    public var onnxFormChosen: String?
    /// Under static activation quantization: every activation this weight multiplies has a static pair,
    /// so a MatMul/Gemm weight can take the static integer form (QuantizeLinear + MatMulIntegerToFloat).
    public var activationsStatic = false
    /// Estimated seconds of one core that calibrating this tensor takes (0 for max).
    public var calibrationSeconds: Double = 0

    /// Bits per weight after conversion, parameters included.
    public var bitsPerWeight: Double {
        let n = Shape(shape).elementCount
        return n > 0 ? Double(bytesAfter * 8) / Double(n) : 0
    }
}

/// Turns a checkpoint and a policy into one plan per tensor. Reads no tensor data.
public enum Planner {
    public static func plan(_ ckpt: Checkpoint, policy: Policy, strict: Bool) throws -> [TensorPlan] {
        var used = Set(ckpt.entries.map(\.name))
        var ruleHits = [Int](repeating: 0, count: policy.rules.count)
        var plans: [TensorPlan] = []
        for (i, e) in ckpt.entries.enumerated() {
            let facts = TensorFacts(name: e.name, dtype: e.dtype, shape: e.shape, consumerOps: e.consumerOps)
            var settings = policy.defaults
            var ruleLabel = "defaults"
            if let (ri, r) = policy.firstMatch(facts) {
                settings = settings.overlaid(with: r.settings)
                ruleLabel = "rule \(ri + 1)" + (r.match.map { " (\($0.text))" } ?? "")
                ruleHits[ri] += 1
            }
            var p = try decide(e, settings: settings, rule: ruleLabel, entryIndex: i)
            if let t = p.decision.scheme?.target, t.isQuantization, !t.isBlock {
                p.scaleName = unique(e.name + "_scale", &used)
                if p.decision.scheme!.hasZeroPoint { p.zeroPointName = unique(e.name + "_zero_point", &used) }
            }
            plans.append(p)
        }
        // built-in presets carry rules for tensors only some formats have (ONNX Gather tables)
        if strict && !policy.source.hasPrefix("preset:") {
            for (ri, hits) in ruleHits.enumerated() where hits == 0 {
                let r = policy.rules[ri]
                throw QConvertError.policy(
                    path: policy.source, line: r.line, column: r.column,
                    message: "\(r.label) matches no tensor (--strict)")
            }
        }
        return plans
    }

    static func unique(_ base: String, _ used: inout Set<String>) -> String {
        var name = base
        var k = 1
        while used.contains(name) {
            name = "\(base)_\(k)"
            k += 1
        }
        used.insert(name)
        return name
    }

    static func decide(_ e: TensorEntry, settings s: PolicySettings, rule: String, entryIndex: Int) throws -> TensorPlan
    {
        let n = e.elementCount
        let before = Shape(e.shape).checkedByteCount(e.dtype) ?? 0
        var plan = TensorPlan(
            entryIndex: entryIndex, name: e.name, dtype: e.dtype, shape: e.shape, decision: .keep(reason: ""),
            rule: rule, axisGuessed: false, bytesBefore: before, bytesAfter: before, warnings: [],
            valuesName: e.name, scaleName: nil, zeroPointName: nil, paramShape: [])
        let target = s.dtype ?? .int8
        plan.onnxFallback = s.onnxFallback ?? .decompose
        plan.onnxForm = s.onnxForm ?? .auto
        plan.accuracyLevel = s.accuracyLevel ?? 4
        func keep(_ why: String) -> TensorPlan {
            var p = plan
            p.decision = .keep(reason: why)
            return p
        }
        if target == .keep { return keep("policy: keep") }
        guard e.dtype.isFloatingPoint else { return keep("not floating point (\(e.dtype.rawValue))") }
        let minRank = s.minRank ?? 2
        let minElements = s.minElements ?? 1024
        if e.shape.count < minRank { return keep("rank \(e.shape.count) < min_rank \(minRank)") }
        if n < minElements { return keep("\(n) elements < min_elements \(minElements)") }
        if target.isCast {
            if (target == .fp16 && e.dtype == .f16) || (target == .bf16 && e.dtype == .bf16) {
                return keep("already \(target.rawValue)")
            }
            var scheme = QuantScheme(target: target)
            scheme.saturate = s.saturate ?? false
            plan.decision = .cast(scheme)
            plan.bytesAfter = n * 2
            return plan
        }
        if let block = target.traits.block {
            // llama.cpp's blocks run along the last axis (a weight's input features)
            guard let last = e.shape.last, e.shape.count >= 1, last % block.elements == 0 else {
                return keep("a row of \(e.shape.last ?? 0) is not whole \(target.rawValue) blocks of \(block.elements)")
            }
            let scheme = QuantScheme(
                target: target, mapping: target == .q4_1 ? .affine : .scale, granularity: .group, axis: 0,
                groupSize: block.elements)
            plan.decision = .quantize(scheme)
            plan.bytesAfter = n / block.elements * block.bytes
            return plan
        }
        var mapping = s.mapping ?? .scale
        if target.isFP8 && mapping == .affine {
            plan.warnings.append("fp8 has no zero point: using scale mapping")
            mapping = .scale
        }
        var granularity = s.granularity ?? .channel
        if e.shape.isEmpty && granularity != .tensor && granularity != .element { granularity = .tensor }
        let rank = e.shape.count
        var axis = 0
        switch s.axis ?? .auto {
        case .auto:
            if let a = e.outputAxis {
                axis = a
            } else {
                axis = 0
                plan.axisGuessed = rank > 1 && (granularity == .channel || granularity == .group)
            }
        case .fixed(let a):
            let r = a < 0 ? a + rank : a
            guard rank == 0 || (r >= 0 && r < rank) else {
                throw QConvertError.tensor(
                    name: e.name, message: "axis \(a) is outside its rank-\(rank) shape \(Shape(e.shape)) (\(rule))")
            }
            axis = rank == 0 ? 0 : r
        }
        // a name the policy accepted is registered
        let calibration = Calibration(name: (s.calibration ?? .max).rawValue, settings: s) ?? .max
        var scheme = QuantScheme(
            target: target, mapping: mapping, granularity: granularity, axis: axis,
            groupSize: s.groupSize ?? 128, calibration: calibration, saturate: s.saturate ?? false)
        scheme.fullSymmetricRange = s.symmetricRange == .full && mapping == .scale && target.isIntegerQuantization
        plan.warnings += calibration.method.warnings(target: target)
        if granularity == .element {
            plan.warnings.append("per-element parameters make this tensor larger than float32")
        }
        if plan.axisGuessed { plan.warnings.append("output-channel axis guessed as 0") }
        let layout = ParamLayout(shape: e.shape, granularity: granularity, axis: axis, groupSize: scheme.groupSize)
        plan.paramShape = layout.paramShape
        // With few parameter groups the exhaustive search costs little: use it (the metadata says so).
        if layout.paramCount <= CalibrationCost.exhaustiveUpTo {
            scheme.calibration = Calibration(scheme.calibration.method.exhaustive)
        }
        plan.calibrationSeconds = CalibrationCost.seconds(scheme, layout: layout)
        if plan.calibrationSeconds >= CalibrationCost.slow {
            plan.warnings.append(
                String(
                    format: "slow calibration: about %.0f s of one core (%@ %@)", plan.calibrationSeconds,
                    scheme.calibration.name, granularity.rawValue))
        }
        let stored = Shape(Quantizer.storedShape(e.shape, target: target)).checkedByteCount(target.storageDType) ?? 0
        plan.bytesAfter = stored + layout.paramCount * 4 + (scheme.hasZeroPoint ? layout.paramCount : 0)
        plan.decision = .quantize(scheme)
        return plan
    }
}
