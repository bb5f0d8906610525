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
        t.zeros += Double(t.histogram.withUnsafeMutableBufferPointer { bin(v, into: $0, upper: t.histogramMax) })
    }

    /// Counts |x| of `v` into `h`, equal bins over [0, upper] (the last includes its edge); leaves out
    /// values that are not data and exact zeros, whose number it returns.
    static func bin(_ v: UnsafeBufferPointer<Float>, into h: UnsafeMutableBufferPointer<Double>, upper: Float) -> Int {
        let scale = upper > 0 ? Float(h.count) / upper : 0
        let last = h.count - 1
        var zeros = 0
        for x in v {
            let a = abs(x)
            guard a < notData else { continue }
            if a == 0 {
                zeros += 1
                continue
            }
            h[Swift.min(Int(a * scale), last)] += 1
        }
        return zeros
    }

    /// The histogram of a one-pass calibration: `fine` bins per output bin over [0, range], where range
    /// starts at the first batch's max |x| and doubles (adjacent bins merged, no count split) whenever a
    /// batch exceeds it. At the end whole groups of fine bins make the `bins` output bins over
    /// [0, histogram_max], histogram_max less than (1 + 2 / fine) × max |x|.
    struct GrowingHistogram {
        let bins: Int
        let fine: Int
        var counts: [Double] = []
        var range: Float = 0

        init(bins: Int) {
            self.bins = bins
            fine = Swift.max(1, Swift.min(16, 65536 / bins))
        }

        /// Adds one batch to `t` (range, then histogram).
        mutating func observe(_ t: inout Tensor, _ v: UnsafeBufferPointer<Float>) {
            observeRange(&t, v)
            let amax = t.amax
            guard t.count > 0, amax > 0 else {
                t.zeros += Double(v.count(where: { $0 == 0 }))
                return
            }
            let n = bins * fine
            if counts.isEmpty {
                counts = [Double](repeating: 0, count: n)
                range = amax
            }
            if amax > range {
                counts.withUnsafeMutableBufferPointer { h in
                    while amax > range {
                        for i in 0..<n {  // in place: index i is written after 2i and 2i+1 are read
                            h[i] = (2 * i < n ? h[2 * i] : 0) + (2 * i + 1 < n ? h[2 * i + 1] : 0)
                        }
                        range *= 2
                    }
                }
            }
            t.zeros += Double(counts.withUnsafeMutableBufferPointer { bin(v, into: $0, upper: range) })
        }

        /// The output histogram and its upper edge, for a tensor whose max |x| is `amax`.
        func finish(_ t: inout Tensor) {
            guard !counts.isEmpty else {
                // zero throughout (or no data): an empty histogram over [0, 0], as the two-pass one writes
                if t.count > 0 {
                    t.histogram = [Double](repeating: 0, count: bins)
                    t.histogramMax = 0
                }
                return
            }
            let amax = Double(t.amax)
            let j = Swift.min(fine, Swift.max(1, Int((amax * Double(fine) / Double(range)).rounded(.up))))
            var out = [Double](repeating: 0, count: bins)
            for (i, c) in counts.enumerated() where c != 0 { out[Swift.min(i / j, bins - 1)] += c }
            t.histogram = out
            t.histogramMax = Float(Double(range) * Double(j) / Double(fine))
        }
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
