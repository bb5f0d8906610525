import Foundation
import Testing

@testable import QConvertKit

@Suite struct PolicyTests {
    static let issueExample = """
        defaults:
          dtype: int8            # int8 uint8 int4 uint4 fp8_e4m3 fp8_e5m2 fp16 bf16 keep
          mapping: scale         # scale (symmetric) | affine (zero point)
          granularity: channel   # tensor | channel | group | element
          axis: auto             # auto = the output-channel axis the format knows, else 0
          group_size: 128
          calibration: max       # max | percentile | entropy | mse
          percentile: 99.99
          min_elements: 1024     # smaller tensors are kept as they are
          min_rank: 2            # 1-D tensors (biases, norms) are kept
        rules:                   # first match wins; a rule sets only what it names
          - match: "*.bias"      # glob on the tensor name
            dtype: keep
          - match: "re:.*(norm|ln_).*"    # regular expression
            dtype: keep
          - match: "*embed*"
            dtype: fp16
          - match: "layers.*.mlp.*"
            dtype: int4
            granularity: group
            group_size: 64
        """

    func entry(_ name: String, _ dtype: DType = .f32, _ shape: [Int] = [64, 64]) -> TensorEntry {
        TensorEntry(name: name, dtype: dtype, shape: shape, bytes: .owned([]), outputAxis: shape.count >= 2 ? 0 : nil)
    }

    func decide(_ policy: Policy, _ e: TensorEntry) throws -> TensorPlan {
        let ck = Checkpoint(format: "test", path: "x", files: [], entries: [e])
        return try Planner.plan(ck, policy: policy, strict: false)[0]
    }

    @Test func issueExampleWorksAsWritten() throws {
        let p = try PolicyLoader.parse(text: PolicyTests.issueExample, source: "policy.cfg")
        #expect(p.rules.count == 4)
        #expect(try decide(p, entry("layers.0.attn.q.bias", .f32, [64, 64])).decision == .keep(reason: "policy: keep"))
        #expect(
            try decide(p, entry("layers.3.post_attention_layernorm.weight", .f32, [64, 64])).decision
                == .keep(reason: "policy: keep"))
        #expect(try decide(p, entry("model.embed_tokens.weight")).decision.scheme?.target == .fp16)
        let mlp = try decide(p, entry("layers.2.mlp.up_proj.weight", .f32, [256, 128]))
        #expect(
            mlp.decision.scheme
                == QuantScheme(target: .int4, mapping: .scale, granularity: .group, axis: 0, groupSize: 64))
        #expect(mlp.rule == "rule 4 (layers.*.mlp.*)")
        let other = try decide(p, entry("layers.2.attn.q_proj.weight"))
        #expect(other.decision.scheme == QuantScheme(target: .int8, granularity: .channel, axis: 0))
        #expect(other.rule == "defaults")
        #expect(
            try decide(p, entry("small", .f32, [10, 10])).decision == .keep(reason: "100 elements < min_elements 1024"))
        #expect(try decide(p, entry("ids", .i64, [64, 64])).decision == .keep(reason: "not floating point (i64)"))
        #expect(try decide(p, entry("mask", .bool, [64, 64])).decision == .keep(reason: "not floating point (bool)"))
    }

    @Test func missingKeysTakeTheInt8Preset() throws {
        let p = try PolicyLoader.parse(text: "defaults:\n  granularity: tensor\n", source: "p.yaml")
        #expect(p.defaults.dtype == .int8)
        #expect(p.defaults.minElements == 1024)
        #expect(p.defaults.granularity == .tensor)
        let empty = try PolicyLoader.parse(text: "", source: "empty.yaml")
        #expect(empty.defaults == PolicySettings.builtIn)
    }

    @Test func presetsLoad() throws {
        for name in PolicyLoader.presetNames { _ = try PolicyLoader.preset(name) }
        #expect(try PolicyLoader.preset("w4g128").defaults.groupSize == 128)
        #expect(try PolicyLoader.preset("uint8").defaults.mapping == .affine)
        #expect(throws: QConvertError.self) { try PolicyLoader.preset("int3") }
    }

    @Test func everyEnumeratedSettingParsesToItsType() throws {
        // each name a policy may give reaches the planner as that value, never a fallback
        for m in CalibrationName.allCases {
            let p = try PolicyLoader.parse(text: "defaults: {calibration: \(m.rawValue)}", source: "t.yaml")
            #expect(p.defaults.calibration == m)
        }
        for f in OnnxFallback.allCases {
            #expect(
                try PolicyLoader.parse(text: "defaults: {onnx_fallback: \(f.rawValue)}", source: "t.yaml").defaults
                    .onnxFallback == f)
        }
        for r in SymmetricRange.allCases {
            #expect(
                try PolicyLoader.parse(text: "defaults: {symmetric_range: \(r.rawValue)}", source: "t.yaml").defaults
                    .symmetricRange == r)
        }
        for x in CalibrationSearch.allCases {
            #expect(
                try PolicyLoader.parse(text: "defaults: {search: \(x.rawValue)}", source: "t.yaml").defaults.search == x
            )
        }
        #expect(throws: QConvertError.self) {
            try PolicyLoader.parse(text: "defaults: {calibration: kl}", source: "t.yaml")
        }
        for preset in Preset.allCases { #expect(try PolicyLoader.preset(preset).source == "preset:\(preset.rawValue)") }
    }

    @Test func selectorsByDtypeRankElementsAndOp() throws {
        let p = try PolicyLoader.parse(
            text: """
                rules:
                  - source_dtype: [f16, bf16]
                    dtype: keep
                  - rank: ">= 3"
                    dtype: uint8
                    mapping: affine
                  - elements: "> 100000"
                    dtype: int4
                  - op: Conv
                    granularity: tensor
                """, source: "sel.yaml")
        #expect(try decide(p, entry("a", .f16)).decision == .keep(reason: "policy: keep"))
        #expect(try decide(p, entry("b", .f32, [16, 16, 3, 3])).decision.scheme?.target == .uint8)
        #expect(try decide(p, entry("c", .f32, [512, 512])).decision.scheme?.target == .int4)
        var conv = entry("d")
        conv.consumerOps = ["Conv"]
        #expect(try decide(p, conv).decision.scheme?.granularity == .tensor)
        #expect(try decide(p, entry("e")).decision.scheme?.granularity == .channel)
    }

    func policyError(_ text: String) -> QConvertError? {
        do {
            _ = try PolicyLoader.parse(text: text, source: "bad.cfg")
            return nil
        } catch let e as QConvertError { return e } catch { return nil }
    }

    @Test(arguments: [
        ("defaults:\n  dtype: int3\n", 2, 10, "bad dtype 'int3'"),
        ("defaults:\n  colour: red\n", 2, 3, "unknown key 'colour'"),
        ("rules:\n  - match: \"re:([a\"\n    dtype: keep\n", 2, 12, "bad regular expression"),
        ("defaults:\n  group_size: zero\n", 2, 15, "must be an integer"),
        ("rules:\n  - match: x\n    granularity: row\n", 3, 18, "bad granularity 'row'"),
        ("defaults:\n  match: \"*\"\n", 2, 3, "belongs in a rule"),
        ("defaults: [1, 2\n", 2, 1, "YAML"),
        ("wat: 1\n", 1, 1, "unknown key 'wat'"),
        ("defaults:\n  search: quick\n", 2, 11, "bad search 'quick' (fast | exhaustive)")
    ])
    func errorsNameFileLineAndColumn(_ c: (String, Int, Int, String)) {
        let e = policyError(c.0)
        guard case .policy(let path, let line, let col, let message)? = e else {
            Issue.record("no policy error for \(c.0)")
            return
        }
        #expect(path == "bad.cfg")
        #expect(line == c.1, "\(message)")
        #expect(col == c.2, "\(message)")
        #expect(message.contains(c.3), "\(message)")
        #expect(!e!.description.contains("\n"))
        #expect(e!.description.hasPrefix("bad.cfg:\(c.1):\(c.2): "))
    }

    @Test func strictFailsOnUnmatchedRule() throws {
        let p = try PolicyLoader.parse(text: "rules:\n  - match: \"nothing.*\"\n    dtype: keep\n", source: "s.cfg")
        let ck = Checkpoint(format: "test", path: "x", files: [], entries: [entry("w")])
        _ = try Planner.plan(ck, policy: p, strict: false)
        #expect(
            throws: QConvertError.policy(
                path: "s.cfg", line: 2, column: 5, message: "rule nothing.* matches no tensor (--strict)")
        ) {
            _ = try Planner.plan(ck, policy: p, strict: true)
        }
    }

    @Test func setOverridesDefaults() throws {
        let p = try PolicyLoader.applyOverrides(
            try PolicyLoader.preset("int8"), ["dtype=int4", "group_size=32", "granularity=group"])
        #expect(p.defaults.dtype == .int4)
        #expect(p.defaults.groupSize == 32)
        #expect(p.text.contains("--set dtype=int4"))
        #expect(throws: QConvertError.self) { try PolicyLoader.applyOverrides(p, ["dtype=int5"]) }
        #expect(throws: QConvertError.self) { try PolicyLoader.applyOverrides(p, ["nonsense"]) }
    }

    @Test func globsAndRegexes() {
        #expect(NamePattern("*.bias")!.matches("a.b.bias"))
        #expect(!NamePattern("*.bias")!.matches("a.bias.x"))
        #expect(NamePattern("layers.?.mlp.*")!.matches("layers.3.mlp.w"))
        #expect(!NamePattern("layers.?.mlp.*")!.matches("layers.13.mlp.w"))
        #expect(NamePattern("w[0-9]")!.matches("w7"))
        #expect(NamePattern("re:.*(norm|ln_).*")!.matches("model.ln_f.weight"))
        #expect(!NamePattern("re:norm")!.matches("layernorm"))  // anchored
        #expect(NamePattern("re:([a") == nil)
        #expect(NamePattern("w[") != nil && NamePattern("w[")!.matches("w["))  // an unclosed class is literal
    }

    /// The linear-time engine agrees with Foundation's (backtracking) engine on whole-name matches.
    @Test func linearRegexAgreesWithFoundation() throws {
        let patterns = [
            "a*", "a+b", "(ab|a)*b?", "[a-c]{2,3}", "x{2}", "x{2,}", "(?:q|r)+s", "\\d+\\.\\w*", "[^.]+\\.bias",
            ".*(norm|ln_).*", "a{0,2}b", "(a|)+c", "[\\d_]+", "\\D\\S\\W", "(a*)*", "^a$", "a|b|", "[]a]", "[a-]+"
        ]
        let subjects = [
            "", "a", "aa", "ab", "aab", "abab", "abb", "bb", "b", "abc", "cab", "xx", "xxx", "x", "qrs", "qqs", "s",
            "12.a_b", "1.",
            "w.bias", "a.b.bias", "model.ln_f.weight", "layernorm", "c", "aac", "_9", "x y", "a-", "]", "{x", "a{,2}",
            "ac"
        ]
        for p in patterns {
            let ours = try LinearRegex("^(?:" + p + ")$")
            let theirs = try NSRegularExpression(pattern: "^(?:" + p + ")$")
            for s in subjects {
                let expected = theirs.firstMatch(in: s, range: NSRange(s.startIndex..., in: s)) != nil
                #expect(ours.matches(s) == expected, "pattern \(p) on '\(s)'")
            }
        }
    }

    /// Nested quantifiers on a long name: a backtracking engine takes exponential time here.
    @Test func regexCostIsLinear() throws {
        let name = String(repeating: "a", count: 20_000) + "!"
        let start = Date()
        #expect(!NamePattern("re:(a+)+$")!.matches(name))
        #expect(!NamePattern("re:(a|a|aa)*(a*)*b")!.matches(name))
        #expect(Date().timeIntervalSince(start) < 5)
        for bad in [
            "re:a{1001}", "re:(?=a)", "re:\\1",
            "re:" + String(repeating: "(", count: 70) + String(repeating: ")", count: 70),
            "re:(a{1000}){1000}", "re:*a"
        ] {
            #expect(NamePattern(bad) == nil, "\(bad)")
        }
    }

    @Test func axisOutOfRangeIsAnError() throws {
        let p = try PolicyLoader.parse(text: "defaults:\n  axis: 2\n", source: "a.cfg")
        #expect(throws: QConvertError.self) { try decide(p, entry("w")) }
        let neg = try PolicyLoader.parse(text: "defaults:\n  axis: -1\n", source: "a.cfg")
        #expect(try decide(neg, entry("w")).decision.scheme?.axis == 1)
    }
}
