import Foundation
import Yams

/// Reads policy files (YAML, any extension) and the built-in presets.
public enum PolicyLoader {
    public static var presetNames: [String] { Preset.allCases.map(\.rawValue) }

    public static func preset(_ name: String) throws -> Policy {
        guard let p = Preset(rawValue: name) else {
            throw QConvertError.usage(
                message: "unknown preset '\(name)'; choose one of \(presetNames.joined(separator: ", "))")
        }
        return try preset(p)
    }

    public static func preset(_ p: Preset) throws -> Policy { try parse(text: p.text, source: "preset:\(p.rawValue)") }

    public static func load(path: String) throws -> Policy {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw QConvertError.policy(path: path, line: 0, column: 0, message: "cannot read the policy file")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw QConvertError.policy(path: path, line: 0, column: 0, message: "the policy file is not UTF-8 text")
        }
        return try parse(text: text, source: path)
    }

    static let settingKeys: Set<String> = [
        "dtype", "mapping", "granularity", "axis", "group_size", "calibration",
        "percentile", "bins", "levels", "search", "min_elements", "min_rank", "saturate",
        "onnx_fallback", "onnx_form", "accuracy_level", "symmetric_range"
    ]
    static let selectorKeys: Set<String> = ["match", "source_dtype", "rank", "elements", "op"]

    /// Deepest nesting a policy may have (flow brackets, or indentation columns / 2 plus "- " markers).
    /// Real policies need 4; the limit keeps the YAML parser, which recurses, far from the stack's end.
    public static let maxNesting = 64

    /// Refuses text nested deeper than `maxNesting`, before the YAML parser sees it: a document
    /// nested thousands of levels deep would overflow the parser's stack.
    static func checkNesting(_ text: String, path: String) throws {
        var line = 1
        var flow = 0
        var quote: Character? = nil
        var atLineStart = true
        var indent = 0
        var comment = false
        var column = 0
        for ch in text {
            column += 1
            if ch == "\n" {
                line += 1
                column = 0
                atLineStart = true
                indent = 0
                comment = false
                continue
            }
            if comment { continue }
            if atLineStart {
                if ch == " " {
                    indent += 1
                    continue
                }
                if ch == "-" {
                    indent += 2
                    continue
                }  // "- " markers nest like indentation
                atLineStart = false
                if indent / 2 > maxNesting {
                    throw QConvertError.policy(
                        path: path, line: line, column: column, message: "nested deeper than \(maxNesting) levels")
                }
            }
            if let q = quote {
                if ch == q { quote = nil }
                continue
            }
            switch ch {
            case "'", "\"": quote = ch
            case "#": comment = true
            case "[", "{":
                flow += 1
                if flow > maxNesting {
                    throw QConvertError.policy(
                        path: path, line: line, column: column, message: "nested deeper than \(maxNesting) levels")
                }
            case "]", "}": flow = max(0, flow - 1)
            default: break
            }
        }
    }

    public static func parse(text: String, source: String) throws -> Policy {
        try checkNesting(text, path: source)
        let node: Node?
        do {
            node = try Yams.compose(yaml: text)
        } catch let e as YamlError {
            throw yamlError(e, path: source)
        } catch {
            throw QConvertError.policy(path: source, line: 0, column: 0, message: "\(error)")
        }
        var policy = Policy(source: source, text: text, defaults: .builtIn, rules: [])
        guard let root = node else { return policy }  // empty file: the int8 preset
        guard let map = root.mapping else {
            throw err(source, root, "a policy is a mapping with 'defaults' and 'rules'")
        }
        for (k, v) in map {
            guard let key = k.scalar?.string else { throw err(source, k, "keys must be plain words") }
            switch key {
            case "defaults":
                guard let dm = v.mapping else { throw err(source, v, "'defaults' must be a mapping of settings") }
                let s = try settings(dm, path: source, allowSelectors: false).settings
                policy.defaults = PolicySettings.builtIn.overlaid(with: s)
            case "rules":
                if case .scalar(let sc) = v, sc.string.isEmpty || sc.string == "null" || sc.string == "~" { continue }
                guard let seq = v.sequence else { throw err(source, v, "'rules' must be a list of rules") }
                for item in seq {
                    guard let rm = item.mapping else {
                        throw err(source, item, "each rule must be a mapping (- match: ...)")
                    }
                    let parsed = try settings(rm, path: source, allowSelectors: true)
                    var rule = parsed.rule
                    rule.settings = parsed.settings
                    rule.line = item.mark?.line ?? 0
                    rule.column = item.mark?.column ?? 0
                    policy.rules.append(rule)
                }
            case "activations":
                guard let am = v.mapping else { throw err(source, v, "'activations' is a mapping of settings") }
                policy.activations = try activations(am, path: source)
            case "layout":
                guard let name = v.scalar?.string, let layout = OutputLayout(rawValue: name) else {
                    let names = OutputLayout.allCases.map(\.rawValue).joined(separator: ", ")
                    throw err(source, v, "'layout' is one of \(names)")
                }
                policy.layout = layout
            default:
                throw err(
                    source, k, "unknown key '\(key)' (a policy has 'defaults', 'rules', 'activations' and 'layout')")
            }
        }
        return policy
    }

    /// Applies `--set key=value` overrides to the defaults; each is also appended to the
    /// policy text so that the policy hash changes with it.
    public static func applyOverrides(_ policy: Policy, _ sets: [String]) throws -> Policy {
        var p = policy
        for s in sets {
            guard let eq = s.firstIndex(of: "=") else {
                throw QConvertError.policy(path: "--set", line: 0, column: 0, message: "'\(s)' is not key=value")
            }
            let key = String(s[..<eq]).trimmingCharacters(in: .whitespaces)
            let value = String(s[s.index(after: eq)...]).trimmingCharacters(in: .whitespaces)
            let yaml = "\(key): \(value.isEmpty ? "''" : value)"
            let node: Node?
            try checkNesting(yaml, path: "--set")
            do { node = try Yams.compose(yaml: yaml) } catch {
                throw QConvertError.policy(path: "--set", line: 0, column: 0, message: "'\(s)': cannot read the value")
            }
            guard let m = node?.mapping else {
                throw QConvertError.policy(path: "--set", line: 0, column: 0, message: "'\(s)' is not key=value")
            }
            do {
                let parsed = try settings(m, path: "--set", allowSelectors: false)
                p.defaults = p.defaults.overlaid(with: parsed.settings)
            } catch QConvertError.policy(_, _, _, let message) {
                throw QConvertError.policy(path: "--set", line: 0, column: 0, message: "'\(s)': \(message)")
            }
            p.text += "\n# --set \(key)=\(value)"
        }
        if !sets.isEmpty { p.source += " with --set \(sets.joined(separator: " "))" }
        return p
    }

    // MARK: - pieces

    /// The `activations` section: dtype (int8, uint8), mapping, calibration, percentile, ops.
    static func activations(_ m: Node.Mapping, path: String) throws -> ActivationPolicy {
        var a = ActivationPolicy()
        for (k, v) in m {
            guard let key = k.scalar?.string else { throw err(path, k, "keys must be plain words") }
            switch key {
            case "dtype":
                let t = try string(v, key, path)
                guard let d = TargetType(rawValue: t), d == .int8 || d == .uint8 else {
                    throw err(path, v, "activations are int8 or uint8, not '\(t)'")
                }
                a.dtype = d
            case "mapping":
                let t = try string(v, key, path)
                guard let x = Mapping(rawValue: t) else { throw err(path, v, "bad mapping '\(t)' (scale | affine)") }
                a.mapping = x
            case "calibration":
                let t = try string(v, key, path)
                guard let c = CalibrationName(rawValue: t) else {
                    let names = CalibrationName.allCases.map(\.rawValue).joined(separator: " | ")
                    throw err(path, v, "bad calibration '\(t)' (\(names))")
                }
                a.calibration = c
            case "percentile":
                guard let p = v.scalar.flatMap({ Double($0.string) }), p > 0, p <= 100 else {
                    throw err(path, v, "percentile is a number in (0, 100]")
                }
                a.percentile = p
            case "ops":
                a.ops = Set(try stringList(v, key, path))
            default:
                throw err(path, k, "unknown key '\(key)' (activations: dtype, mapping, calibration, percentile, ops)")
            }
        }
        return a
    }

    static func settings(_ m: Node.Mapping, path: String, allowSelectors: Bool) throws -> (
        settings: PolicySettings, rule: PolicyRule
    ) {
        var s = PolicySettings()
        var rule = PolicyRule(
            match: nil, sourceDTypes: nil, rank: nil, elements: nil, ops: nil, settings: s, line: 0, column: 0)
        for (k, v) in m {
            guard let key = k.scalar?.string else { throw err(path, k, "keys must be plain words") }
            if selectorKeys.contains(key) {
                guard allowSelectors else {
                    throw err(path, k, "'\(key)' selects tensors and belongs in a rule, not in defaults")
                }
                switch key {
                case "match":
                    let text = try string(v, key, path)
                    do {
                        rule.match = try NamePattern(parsing: text)
                    } catch {
                        let what =
                            text.hasPrefix("re:")
                            ? "bad regular expression '\(text.dropFirst(3))'" : "bad glob '\(text)'"
                        throw err(path, v, "\(what): \(error)")
                    }
                case "source_dtype":
                    rule.sourceDTypes = try stringList(v, key, path).map { name in
                        guard let d = DType(rawValue: name.lowercased()) ?? DType(safetensorsName: name.uppercased())
                        else {
                            throw err(
                                path, v,
                                "unknown source_dtype '\(name)' (f64 f32 f16 bf16 f8e4m3 f8e5m2 i64 i32 i16 i8 u64 u32 u16 u8 bool)"
                            )
                        }
                        return d
                    }
                case "rank": rule.rank = try comparison(v, key, path)
                case "elements": rule.elements = try comparison(v, key, path)
                case "op": rule.ops = try stringList(v, key, path)
                default: break
                }
                continue
            }
            guard settingKeys.contains(key) else {
                let known = (allowSelectors ? selectorKeys.union(settingKeys) : settingKeys).sorted().joined(
                    separator: ", ")
                throw err(path, k, "unknown key '\(key)' (known: \(known))")
            }
            switch key {
            case "dtype":
                let t = try string(v, key, path)
                guard let d = TargetType(rawValue: t) else {
                    throw err(
                        path, v, "bad dtype '\(t)' (\(TargetType.allCases.map(\.rawValue).joined(separator: " ")))")
                }
                s.dtype = d
            case "mapping":
                let t = try string(v, key, path)
                guard let x = Mapping(rawValue: t) else { throw err(path, v, "bad mapping '\(t)' (scale | affine)") }
                s.mapping = x
            case "granularity":
                let t = try string(v, key, path)
                guard let x = Granularity(rawValue: t) else {
                    throw err(path, v, "bad granularity '\(t)' (tensor | channel | group | element)")
                }
                s.granularity = x
            case "axis":
                let t = try string(v, key, path)
                if t == "auto" {
                    s.axis = .auto
                } else if let i = Int(t) {
                    s.axis = .fixed(i)
                } else {
                    throw err(path, v, "bad axis '\(t)' (auto or an integer; negative counts from the end)")
                }
            case "group_size":
                let i = try int(v, key, path)
                guard i >= 1 else { throw err(path, v, "group_size must be at least 1") }
                s.groupSize = i
            case "calibration": s.calibration = try choice(v, key, path)
            case "percentile":
                let t = try string(v, key, path)
                guard let p = Double(t), p > 0, p <= 100 else {
                    throw err(path, v, "percentile must be a number in (0, 100]")
                }
                s.percentile = p
            case "bins":
                let i = try int(v, key, path)
                guard i >= 2, i <= 1 << 20 else { throw err(path, v, "bins must be between 2 and 1048576") }
                s.bins = i
            case "levels":
                let i = try int(v, key, path)
                guard i >= 1 else { throw err(path, v, "levels must be at least 1") }
                s.levels = i
            case "search": s.search = try choice(v, key, path)
            case "min_elements":
                let i = try int(v, key, path)
                guard i >= 0 else { throw err(path, v, "min_elements must not be negative") }
                s.minElements = i
            case "min_rank":
                let i = try int(v, key, path)
                guard i >= 0 else { throw err(path, v, "min_rank must not be negative") }
                s.minRank = i
            case "saturate":
                let t = try string(v, key, path)
                guard let b = ["true": true, "false": false, "yes": true, "no": false][t.lowercased()] else {
                    throw err(path, v, "saturate must be true or false")
                }
                s.saturate = b
            case "onnx_fallback": s.onnxFallback = try choice(v, key, path)
            case "onnx_form": s.onnxForm = try choice(v, key, path)
            case "symmetric_range": s.symmetricRange = try choice(v, key, path)
            case "accuracy_level":
                let i = try int(v, key, path)
                guard (0...4).contains(i) else {
                    throw err(path, v, "accuracy_level is 0 to 4 (4: int8 compute, the fast one)")
                }
                s.accuracyLevel = i
            default: break
            }
        }
        return (s, rule)
    }

    /// A value that must be one of an enumeration's names; the error lists them.
    static func choice<T: RawRepresentable & CaseIterable>(_ v: Node, _ key: String, _ path: String) throws -> T
    where T.RawValue == String {
        let t = try string(v, key, path)
        guard let x = T(rawValue: t) else {
            throw err(path, v, "bad \(key) '\(t)' (\(T.allCases.map(\.rawValue).joined(separator: " | ")))")
        }
        return x
    }

    static func string(_ v: Node, _ key: String, _ path: String) throws -> String {
        guard let s = v.scalar?.string else { throw err(path, v, "'\(key)' needs a single value") }
        return s
    }

    static func int(_ v: Node, _ key: String, _ path: String) throws -> Int {
        let s = try string(v, key, path)
        guard let i = Int(s) else { throw err(path, v, "'\(key)' must be an integer, not '\(s)'") }
        return i
    }

    static func stringList(_ v: Node, _ key: String, _ path: String) throws -> [String] {
        if let s = v.scalar?.string { return [s] }
        guard let seq = v.sequence else { throw err(path, v, "'\(key)' needs a value or a list of values") }
        return try seq.map { try string($0, key, path) }
    }

    static func comparison(_ v: Node, _ key: String, _ path: String) throws -> IntComparison {
        let s = try string(v, key, path).replacingOccurrences(of: " ", with: "")
        for op in [IntComparison.Op.ge, .le, .ne, .eq, .gt, .lt] where s.hasPrefix(op.rawValue) {
            if let i = Int(s.dropFirst(op.rawValue.count)) { return IntComparison(op: op, value: i) }
        }
        if let i = Int(s) { return IntComparison(op: .eq, value: i) }
        throw err(path, v, "'\(key)' must be an integer or a comparison such as '>= 2'")
    }

    static func err(_ path: String, _ node: Node, _ message: String) -> QConvertError {
        .policy(path: path, line: node.mark?.line ?? 0, column: node.mark?.column ?? 0, message: message)
    }

    static func yamlError(_ e: YamlError, path: String) -> QConvertError {
        switch e {
        case .scanner(let ctx, let problem, let mark, _), .parser(let ctx, let problem, let mark, _),
            .composer(let ctx, let problem, let mark, _):
            let c = ctx.map { $0.text + " " } ?? ""
            return .policy(path: path, line: mark.line, column: mark.column, message: "YAML: \(c)\(problem)")
        default:
            let first = "\(e)".split(separator: "\n").first.map(String.init) ?? "bad YAML"
            return .policy(path: path, line: 0, column: 0, message: "YAML: \(first)")
        }
    }
}

/// The built-in policies (`--preset`).
public enum Preset: String, Sendable, CaseIterable {
    case int8, uint8, w4g128, fp16, bf16, keep
    /// llama.cpp's block types (GGUF outputs)
    case q8_0, q4_0, q4_1

    /// The policy text the preset stands for.
    public var text: String {
        switch self {
        case .int8:
            """
            # int8 symmetric per-channel, max calibration; float tensors of rank >= 2 with >= 1024 elements
            defaults:
              dtype: int8
              mapping: scale
              granularity: channel
              calibration: max
            """
        case .uint8:
            """
            # uint8 affine (zero point) per-channel
            defaults:
              dtype: uint8
              mapping: affine
              granularity: channel
            """
        case .w4g128:
            """
            # int4 symmetric over the full range (-8..7, as Q4_0 and MatMulNBits), groups of 128 along the reduction axis
            defaults:
              dtype: int4
              mapping: scale
              symmetric_range: full
              granularity: group
              group_size: 128
            rules:
              # embedding tables (ONNX Gather data) keep 8 bits, as llama.cpp keeps its token embeddings wider
              - op: Gather
                dtype: int8
                granularity: channel
            """
        case .fp16:
            """
            # every float tensor cast to float16
            defaults:
              dtype: fp16
              min_elements: 0
              min_rank: 0
            """
        case .bf16:
            """
            # every float tensor cast to bfloat16
            defaults:
              dtype: bf16
              min_elements: 0
              min_rank: 0
            """
        case .q8_0:
            """
            # llama.cpp's Q8_0: every 2-D float tensor whose rows are whole blocks of 32; 1-D tensors (norms, biases) stay as they are
            defaults:
              dtype: q8_0
              min_elements: 0
            """
        case .q4_0:
            """
            # llama.cpp's Q4_0, with the token embedding and output projection at Q8_0, as llama.cpp's own Q4_0 has them
            defaults:
              dtype: q4_0
              min_elements: 0
            rules:
              - match: 're:(.*\\.)?(output|lm_head|token_embd|embed_tokens)\\.weight'
                dtype: q8_0
            """
        case .q4_1:
            """
            # llama.cpp's Q4_1, with the token embedding and output projection at Q8_0, as llama.cpp's own Q4_1 has them
            defaults:
              dtype: q4_1
              min_elements: 0
            rules:
              - match: 're:(.*\\.)?(output|lm_head|token_embd|embed_tokens)\\.weight'
                dtype: q8_0
            """
        case .keep:
            """
            # nothing changes: every tensor copied bit for bit
            defaults:
              dtype: keep
            """
        }
    }
}
