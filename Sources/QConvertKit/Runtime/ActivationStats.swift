import Foundation

/// Per-tensor statistics of a model's activations over sample inputs (`qconvert calibrate`), in the
/// layout of Schemas/calibration.schema.json: count, min, max and a histogram of |x| over [0, amax].
public struct ActivationStats: Sendable, Equatable {
    public static let formatTag = "qconvert.calibration/1"
    /// Values of at least this magnitude (and non-finite ones) are not data: attention masks' −3.4e38,
    /// padding sentinels. They are counted and left out of the range and the histogram.
    public static let notData: Float = 1e30

    public struct Tensor: Sendable, Equatable {
        public var count: Int = 0
        public var excluded: Int = 0
        public var min: Float = .infinity
        public var max: Float = -.infinity
        /// Histogram of |x| over [0, histogramMax], `bins` bins (the last bin includes its upper edge).
        public var histogram: [Double] = []
        public var histogramMax: Float = 0
        /// Exact zeros (masked positions, ReLU's negatives): represented exactly in any range, they are
        /// counted here and left out of the histogram, so that they do not pull entropy's and mse's
        /// threshold down (a softmax over padded tokens is mostly zeros).
        public var zeros: Double = 0

        /// Nothing to quantize: no data, or one value throughout (a constant or a mask).
        public var constant: Bool { count == 0 || min == max }
        public var amax: Float { Swift.max(abs(min), abs(max)) }
    }

    public var modelPath: String
    public var modelSHA256: String
    public var samples: Int
    public var bins: Int
    public var tensors: [String: Tensor]
    /// "sha256:hex" of the file the statistics were read from (recorded in the output's metadata).
    public var fileHash: String = ""

    /// Pass 1 over one batch of values.
    static func observeRange(_ t: inout Tensor, _ v: UnsafeBufferPointer<Float>) {
        var lo = t.min
        var hi = t.max
        var n = 0
        var skipped = 0
        for x in v {
            if !(abs(x) < notData) {  // also NaN
                skipped += 1
                continue
            }
            n += 1
            if x < lo { lo = x }
            if x > hi { hi = x }
        }
        t.min = lo
        t.max = hi
        t.count += n
        t.excluded += skipped
    }

    /// Pass 2: the histogram of |x| over [0, amax] of pass 1.
    static func observeHistogram(_ t: inout Tensor, _ v: UnsafeBufferPointer<Float>, bins: Int) {
        if t.histogram.isEmpty {
            t.histogram = [Double](repeating: 0, count: bins)
            t.histogramMax = t.amax
        }
        let amax = t.histogramMax
        let scale = amax > 0 ? Float(bins) / amax : 0
        var zeros = 0
        t.histogram.withUnsafeMutableBufferPointer { h in
            for x in v {
                let a = abs(x)
                guard a < notData else { continue }
                if a == 0 {
                    zeros += 1
                    continue
                }
                let i = Swift.min(Int(a * scale), bins - 1)
                h[i] += 1
            }
        }
        t.zeros += Double(zeros)
    }

    // MARK: - the statistics file

    public var json: String {
        var fields: [(String, JSONValue)] = []
        for (name, t) in tensors.sorted(by: { $0.key < $1.key }) {
            var kv: [(String, JSONValue)] = [
                ("count", .int(t.count)), ("excluded", .int(t.excluded)), ("constant", .bool(t.constant))
            ]
            if t.count > 0 {
                kv += [("min", .number(Double(t.min))), ("max", .number(Double(t.max)))]
                kv += [
                    ("zeros", .int(Int(t.zeros))),
                    ("histogram_max", .number(Double(t.histogramMax))),
                    ("histogram", .array(t.histogram.map { .int(Int($0)) }))
                ]
            }
            fields.append((name, .object(kv)))
        }
        let doc: JSONValue = .object([
            ("format", .string(Self.formatTag)),
            ("tool", .object([("name", .string("qconvert")), ("version", .string(QConvertVersion.string))])),
            ("model", .object([("path", .string(modelPath)), ("sha256", .string(modelSHA256))])),
            ("samples", .int(samples)),
            ("bins", .int(bins)),
            ("tensors", .object(fields))
        ])
        return doc.compact + "\n"
    }

    /// Reads a statistics file (this tool's, or another's written to the same schema).
    public static func read(path: String) throws -> ActivationStats {
        func bad(_ m: String) -> QConvertError { .badInput(path: path, message: m) }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw QConvertError.io(path: path, message: "cannot read the statistics file")
        }
        let root: JSONValue
        do { root = try data.withUnsafeBytes { try JSONParser.parse($0) } } catch {
            throw bad("not valid JSON: \(error)")
        }
        guard root["format"]?.stringValue == formatTag else { throw bad("not a \(formatTag) statistics file") }
        guard let bins = root["bins"]?.nonNegativeInt, bins >= 1, bins <= 1 << 20,
            let entries = root["tensors"]?.objectValue
        else { throw bad("needs 'bins' (1 to 1048576) and a 'tensors' object") }
        var tensors: [String: Tensor] = [:]
        for (name, v) in entries {
            var t = Tensor()
            guard let count = v["count"]?.nonNegativeInt else { throw bad("tensor '\(name)': no count") }
            t.count = count
            t.excluded = v["excluded"]?.nonNegativeInt ?? 0
            if count > 0 {
                guard let lo = v["min"]?.doubleValue, let hi = v["max"]?.doubleValue, lo.isFinite, hi.isFinite,
                    lo <= hi,
                    let hm = v["histogram_max"]?.doubleValue, hm >= 0, hm.isFinite,
                    let h = v["histogram"]?.arrayValue, h.count == bins
                else {
                    throw bad("tensor '\(name)': needs finite min ≤ max, histogram_max and \(bins) histogram counts")
                }
                t.min = Float(lo)
                t.max = Float(hi)
                t.histogramMax = Float(hm)
                t.zeros = v["zeros"]?.doubleValue ?? 0
                t.histogram = try h.map {
                    guard let c = $0.doubleValue, c >= 0, c.isFinite else { throw bad("tensor '\(name)': a bad count") }
                    return c
                }
            }
            tensors[name] = t
        }
        var stats = ActivationStats(
            modelPath: root["model"]?["path"]?.stringValue ?? "",
            modelSHA256: root["model"]?["sha256"]?.stringValue ?? "",
            samples: root["samples"]?.nonNegativeInt ?? 0, bins: bins, tensors: tensors)
        stats.fileHash = "sha256:" + ContentHash.sha256.digest(of: [UInt8](data))
        return stats
    }
}
