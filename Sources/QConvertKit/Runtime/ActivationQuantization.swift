import Foundation

/// The policy's `activations` section: how activations are quantized when statistics are given.
public struct ActivationPolicy: Sendable, Equatable {
    public var dtype: TargetType = .uint8
    public var mapping: Mapping = .affine
    public var calibration: CalibrationName = .max
    public var percentile: Double = 99.99
    public var ops: Set<String> = ActivationCalibrator.defaultOps
    public init() {}
}

/// One activation's quantization: per tensor, QuantizeLinear + DequantizeLinear on its edge into the ops.
public struct ActivationParameters: Sendable, Equatable {
    public var name: String
    public var target: TargetType
    public var beta: Float
    public var alpha: Float
    public var scale: Float
    public var zeroPoint: Int32
    public var method: String
    /// Why the parameters differ from the policy's (an int8 activation into a Conv written as uint8).
    public var note: String?
}

public enum ActivationQuantization {
    /// Parameters of every non-constant tensor of `stats`, by the policy's method, with the same range
    /// code as weights: entropy and mse choose their threshold on the histogram (the weights' histogram
    /// search), percentile takes the bin where the cumulative count reaches p, max the observed range.
    public static func parameters(_ stats: ActivationStats, policy: ActivationPolicy) throws -> [ActivationParameters] {
        var scheme = QuantScheme(target: policy.dtype, mapping: policy.mapping, granularity: .tensor)
        var settings = PolicySettings()
        settings.bins = stats.bins
        settings.percentile = policy.percentile
        guard let calibration = Calibration(name: policy.calibration.rawValue, settings: settings) else {
            throw QConvertError.internal(message: "calibration \(policy.calibration.rawValue) is not registered")
        }
        scheme.calibration = calibration
        let (qmin, qmax) = scheme.integerRange
        let levels = (Int(qmax) - Int(qmin) + 1) / 2
        // one tensor per core: entropy and mse search every threshold of a 2048-bin histogram
        let items = stats.tensors.sorted(by: { $0.key < $1.key }).filter { !$0.value.constant }
        let results = Box([ActivationParameters?](repeating: nil, count: items.count))
        let lock = NSLock()
        let frozen = scheme
        DispatchQueue.concurrentPerform(iterations: items.count) { k in
            let p = one(
                items[k].key, items[k].value, scheme: frozen, levels: levels, qmax: qmax, bins: stats.bins,
                policy: policy)
            lock.lock()
            results.value[k] = p
            lock.unlock()
        }
        return results.value.compactMap { $0 }
    }

    /// The parameters for the activations of `source`'s graph. Under int8, an activation a Conv-like op
    /// takes, or one that multiplies a weight, is written as uint8 (affine, over the same calibrated
    /// range): onnxruntime on x86 fuses a QDQ Conv into QLinearConv only for uint8 inputs (with int8 a CNN
    /// ran slower than float: 9.2 against 6.4 ms; 4.0 with uint8), and its MatMulIntegerToFloat with int8
    /// inputs takes a slow path (MiniLM-L3 in 44 ms against float's 16 and 6.5 with uint8). Activation ×
    /// activation products keep int8 (QLinearMatMul runs it at full speed).
    public static func parameters(_ stats: ActivationStats, policy: ActivationPolicy, source: Checkpoint) throws
        -> [ActivationParameters]
    {
        var params = try parameters(stats, policy: policy)
        guard policy.dtype == .int8, let model = source.container as? OnnxModel,
            let g = model.model.pointee.graph
        else { return params }
        var weights = Set<String>()
        for i in 0..<g.pointee.n_initializer { weights.insert(Proto.string(g.pointee.initializer[i]?.pointee.name)) }
        var integer = Set<String>()  // inputs of Conv-like ops, activations multiplying a weight
        for i in 0..<g.pointee.n_node {
            guard let n = g.pointee.node[i] else { continue }
            let op = Proto.string(n.pointee.op_type)
            guard policy.ops.contains(op) else { continue }
            let inputs = OnnxForms.inputs(n)
            if op == "MatMul" || op == "Gemm" {
                if inputs.count > 1, weights.contains(inputs[1]) { integer.insert(inputs[0]) }
            } else {
                integer.formUnion(inputs)
            }
        }
        let moved = params.filter { integer.contains($0.name) }.map(\.name)
        guard !moved.isEmpty else { return params }
        var sub = stats
        sub.tensors = stats.tensors.filter { moved.contains($0.key) }
        var unsigned = policy
        unsigned.dtype = .uint8
        unsigned.mapping = .affine
        let redone = Dictionary(
            uniqueKeysWithValues: try parameters(sub, policy: unsigned).map { ($0.name, $0) })
        for k in params.indices {
            guard var r = redone[params[k].name] else { continue }
            r.note =
                "uint8 (affine) instead of int8: onnxruntime on x86 runs its integer Conv and weight products fast only for uint8 inputs (int8 ran slower than float)"
            params[k] = r
        }
        return params
    }

    static func one(
        _ name: String, _ t: ActivationStats.Tensor, scheme: QuantScheme, levels: Int, qmax: Int32, bins: Int,
        policy: ActivationPolicy
    ) -> ActivationParameters {
        do {
            var (beta, alpha) = (t.min, t.max)
            if policy.mapping == .scale { (beta, alpha) = (-t.amax, t.amax) }
            let amax = t.histogramMax
            switch scheme.calibration.method {
            case let h as any HistogramThresholdCalibration:
                // entropy by the C kernel, every candidate evaluated (the reference below is 2.5x slower)
                let entropy = (h as? EntropyCalibration).flatMap { e in
                    CalibrationScratch.entropyCandidate(histogram: t.histogram, levels: e.levels ?? levels)
                }
                let i = entropy ?? h.candidate(t.histogram, levels: levels, qmaxSymmetric: Int(qmax))
                (beta, alpha) = Calibrator.threshold(
                    i, bins: bins, amax: amax, lo: t.min, hi: t.max, mapping: policy.mapping)
            case is PercentileCalibration:
                let total = t.histogram.reduce(0, +) + t.zeros
                var cum = t.zeros
                var edge = t.histogram.count
                for (i, c) in t.histogram.enumerated() {
                    cum += c
                    if cum >= total * policy.percentile / 100 {
                        edge = i + 1
                        break
                    }
                }
                (beta, alpha) = Calibrator.threshold(
                    edge, bins: bins, amax: amax, lo: t.min, hi: t.max, mapping: policy.mapping)
            default:
                break  // max: the observed range
            }
            let (s, z) = Quantizer.parameters(beta: beta, alpha: alpha, scheme: scheme)
            return ActivationParameters(
                name: name, target: policy.dtype, beta: beta, alpha: alpha, scale: s, zeroPoint: z,
                method: policy.calibration.rawValue)
        }
    }
}
