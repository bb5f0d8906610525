import Foundation

/// What a Hugging Face model becomes in GGUF: llama.cpp's tensor names, the rows it wants permuted, and
/// the metadata (hyperparameters from config.json, the tokenizer from tokenizer.json). One table entry
/// per architecture; LlamaForCausalLM (SmolLM, TinyLlama-like byte-level BPE models) is the one there.
struct GGUFModel {
    var metadata: [(key: String, value: GGUFValue)]
    /// Source name → GGUF name.
    var names: [String: String]
    /// Source names dropped (buffers llama.cpp recomputes).
    var dropped: Set<String>
    /// Source name → the number of heads whose rows are interleaved as llama.cpp's rotary embedding
    /// expects (the q and k projections).
    var permutedHeads: [String: Int]
}

enum GGUFArchitecture {
    struct Architecture: Sendable {
        var hfName: String
        var ggufName: String
        var build: @Sendable (HFModelFolder, [String]) throws -> GGUFModel
    }

    static let table: [Architecture] = [
        Architecture(hfName: "LlamaForCausalLM", ggufName: "llama", build: llama)
    ]

    /// The GGUF form of a Hugging Face model whose tensors are `names`; refuses other architectures.
    static func model(_ hf: HFModelFolder, tensorNames: [String]) throws -> GGUFModel {
        let archs = (hf.config["architectures"]?.arrayValue ?? []).compactMap(\.stringValue)
        guard let a = table.first(where: { archs.contains($0.hfName) }) else {
            let known = table.map(\.hfName).joined(separator: ", ")
            throw QConvertError.usage(
                message:
                    "\(hf.folder): qconvert writes GGUF for \(known) models; this one is \(archs.isEmpty ? "of no stated architecture" : archs.joined(separator: ", "))"
            )
        }
        return try a.build(hf, tensorNames)
    }

    static func llama(_ hf: HFModelFolder, _ names: [String]) throws -> GGUFModel {
        let c = hf.config
        func bad(_ m: String) -> QConvertError { .badInput(path: hf.folder + "/config.json", message: m) }
        func int(_ key: String) throws -> Int {
            guard let v = c[key]?.nonNegativeInt, v > 0 else { throw bad("no positive integer '\(key)'") }
            return v
        }
        let hidden = try int("hidden_size")
        let heads = try int("num_attention_heads")
        let kvHeads = c["num_key_value_heads"]?.nonNegativeInt ?? heads
        let layers = try int("num_hidden_layers")
        guard hidden % heads == 0, kvHeads > 0, heads % kvHeads == 0 else {
            throw bad("hidden_size \(hidden), \(heads) heads and \(kvHeads) key-value heads do not fit together")
        }
        let headDim = c["head_dim"]?.nonNegativeInt ?? hidden / heads
        let ropeTheta =
            c["rope_theta"]?.doubleValue ?? c["rope_parameters"]?["rope_theta"]?.doubleValue ?? 10000
        if let scaling = c["rope_scaling"], scaling != .null {
            throw bad("rope_scaling is not written to GGUF by qconvert yet; this model needs it")
        }
        var meta: [(key: String, value: GGUFValue)] = [
            ("general.architecture", .string("llama")),
            (
                "general.name",
                .string(
                    c["_name_or_path"]?.stringValue ?? c["_model_name_or_path"]?.stringValue
                        ?? URL(fileURLWithPath: hf.folder).lastPathComponent)
            ),
            ("llama.block_count", .uint(UInt64(layers), type: 4)),
            ("llama.context_length", .uint(UInt64(c["max_position_embeddings"]?.nonNegativeInt ?? 2048), type: 4)),
            ("llama.embedding_length", .uint(UInt64(hidden), type: 4)),
            ("llama.feed_forward_length", .uint(UInt64(try int("intermediate_size")), type: 4)),
            ("llama.attention.head_count", .uint(UInt64(heads), type: 4)),
            ("llama.attention.head_count_kv", .uint(UInt64(kvHeads), type: 4)),
            ("llama.rope.freq_base", .float(ropeTheta, type: 6)),
            ("llama.attention.layer_norm_rms_epsilon", .float(c["rms_norm_eps"]?.doubleValue ?? 1e-6, type: 6)),
            ("llama.rope.dimension_count", .uint(UInt64(headDim), type: 4))
        ]
        if let v = c["vocab_size"]?.nonNegativeInt { meta.append(("llama.vocab_size", .uint(UInt64(v), type: 4))) }
        meta += try GGUFTokenizer.metadata(hf)

        let perLayer: [(String, String)] = [
            ("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
            ("post_attention_layernorm", "ffn_norm"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down")
        ]
        let fixed = [
            "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"
        ]
        var map: [String: String] = [:]
        var dropped = Set<String>()
        var permuted: [String: Int] = [:]
        for n in names {
            if n.hasSuffix(".rotary_emb.inv_freq") {
                dropped.insert(n)
                continue
            }
            let parts = n.split(separator: ".").map(String.init)
            guard let suffix = parts.last, suffix == "weight" || suffix == "bias" else {
                throw bad("tensor '\(n)' has no place in a llama GGUF")
            }
            let module = parts.dropLast().joined(separator: ".")
            if let g = fixed[module] {
                map[n] = g + "." + suffix
                continue
            }
            guard parts.count >= 4, parts[0] == "model", parts[1] == "layers", let layer = Int(parts[2]),
                layer < layers,
                let g = perLayer.first(where: { $0.0 == parts[3...].dropLast().joined(separator: ".") })?.1
            else { throw QConvertError.usage(message: "\(hf.folder): tensor '\(n)' has no place in a llama GGUF") }
            map[n] = "blk.\(layer).\(g).\(suffix)"
            if g == "attn_q" { permuted[n] = heads }
            if g == "attn_k" { permuted[n] = kvHeads }
        }
        return GGUFModel(metadata: meta, names: map, dropped: dropped, permutedHeads: permuted)
    }

    /// Interleaves each head's two halves of rows (row (h, a, b) of [heads, 2, half] goes to (h, b, a)):
    /// the layout llama.cpp's rotary embedding reads. Rows are `bytes.count / rows` bytes each, so the
    /// permutation applies to quantized rows (blocks never cross rows) as well as to floats.
    static func permuteRows(_ bytes: UnsafeRawBufferPointer, rows: Int, heads: Int) -> [UInt8]? {
        guard heads > 0, rows % (heads * 2) == 0, rows > 0, bytes.count % rows == 0 else { return nil }
        let rowBytes = bytes.count / rows
        let half = rows / heads / 2
        var out = [UInt8](repeating: 0, count: bytes.count)
        out.withUnsafeMutableBytes { dst in
            for h in 0..<heads {
                for a in 0..<2 {
                    for b in 0..<half {
                        let from = (h * 2 * half + a * half + b) * rowBytes
                        let to = (h * 2 * half + b * 2 + a) * rowBytes
                        dst.baseAddress!.advanced(by: to).copyMemory(
                            from: bytes.baseAddress!.advanced(by: from), byteCount: rowBytes)
                    }
                }
            }
        }
        return out
    }
}

/// A byte-level BPE tokenizer (tokenizer.json) as llama.cpp's `gpt2` tokenizer metadata.
enum GGUFTokenizer {
    /// llama.cpp's names of the pre-tokenizers it knows, by tokenizer.json's `pre_tokenizer`.
    static func preName(_ pre: JSONValue?) -> String? {
        guard let pre else { return nil }
        if pre["type"]?.stringValue == "ByteLevel", pre["use_regex"] != .bool(false) { return "gpt-2" }
        guard pre["type"]?.stringValue == "Sequence", let steps = pre["pretokenizers"]?.arrayValue else { return nil }
        let split = steps.first { $0["type"]?.stringValue == "Split" }
        let regex = split?["pattern"]?["Regex"]?.stringValue
        let byteLevel = steps.contains { $0["type"]?.stringValue == "ByteLevel" }
        guard byteLevel, steps.count == 2 else { return nil }
        if regex == "\\p{N}", split?["behavior"]?.stringValue == "Isolated" { return "smollm" }
        if regex
            == "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
        {
            return "llama-bpe"
        }
        return nil
    }

    static func json(_ path: String) throws -> JSONValue? {
        guard FileManager.default.fileExists(atPath: path) else { return nil }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw QConvertError.io(path: path, message: "cannot read")
        }
        do { return try data.withUnsafeBytes { try JSONParser.parse($0) } } catch {
            throw QConvertError.badInput(path: path, message: "not valid JSON: \(error)")
        }
    }

    static func metadata(_ hf: HFModelFolder) throws -> [(key: String, value: GGUFValue)] {
        let path = hf.folder + "/tokenizer.json"
        func bad(_ m: String) -> QConvertError { .badInput(path: path, message: m) }
        guard let tok = try json(path) else {
            throw QConvertError.usage(
                message: "\(hf.folder): a GGUF needs the tokenizer, and there is no tokenizer.json")
        }
        let config = try json(hf.folder + "/tokenizer_config.json") ?? .object([])
        guard tok["model"]?["type"]?.stringValue == "BPE", let vocab = tok["model"]?["vocab"]?.objectValue else {
            throw bad(
                "qconvert writes byte-level BPE tokenizers to GGUF; this one is \(tok["model"]?["type"]?.stringValue ?? "of no stated type")"
            )
        }
        guard let pre = preName(tok["pre_tokenizer"]) else {
            throw bad("its pre_tokenizer is not one llama.cpp knows by name (gpt-2, smollm, llama-bpe)")
        }
        let size = max(hf.config["vocab_size"]?.nonNegativeInt ?? 0, vocab.count)
        guard size <= 4_000_000 else { throw bad("a vocabulary of \(size) tokens is beyond any model") }
        var tokens = [String?](repeating: nil, count: size)
        var types = [Int64](repeating: 1, count: size)
        for (t, v) in vocab {
            guard let id = v.nonNegativeInt, id < size else {
                throw bad("token '\(t)' has an id outside the vocabulary")
            }
            tokens[id] = t
        }
        for a in tok["added_tokens"]?.arrayValue ?? [] {
            guard let id = a["id"]?.nonNegativeInt, id < size, let content = a["content"]?.stringValue else { continue }
            tokens[id] = content
            types[id] = a["special"] == .bool(true) ? 3 : 4  // control, user-defined
        }
        for i in 0..<size where tokens[i] == nil {
            tokens[i] = "[PAD\(i)]"
            types[i] = 5  // unused
        }
        let merges: [String] = (tok["model"]?["merges"]?.arrayValue ?? []).compactMap { m in
            if let s = m.stringValue { return s }
            let pair = (m.arrayValue ?? []).compactMap(\.stringValue)
            return pair.count == 2 ? pair.joined(separator: " ") : nil
        }
        var meta: [(key: String, value: GGUFValue)] = [
            ("tokenizer.ggml.model", .string("gpt2")),
            ("tokenizer.ggml.pre", .string(pre)),
            ("tokenizer.ggml.tokens", .array(elementType: 8, tokens.map { .string($0!) })),
            ("tokenizer.ggml.token_type", .array(elementType: 5, types.map { .int($0, type: 5) })),
            ("tokenizer.ggml.merges", .array(elementType: 8, merges.map(GGUFValue.string)))
        ]
        // special tokens: by their text in tokenizer_config.json, else by id in config.json
        let ids = Dictionary(tokens.enumerated().map { ($1!, $0) }, uniquingKeysWith: { a, _ in a })
        for (name, key) in [
            ("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")
        ] {
            var id: Int? = nil
            if let text = config[key]?.stringValue ?? config[key]?["content"]?.stringValue { id = ids[text] }
            if id == nil, let v = hf.config[key + "_id"]?.nonNegativeInt, v < size { id = v }
            if let id { meta.append(("tokenizer.ggml.\(name)_token_id", .uint(UInt64(id), type: 4))) }
        }
        let addBOS = config["add_bos_token"] == .bool(true)
        meta.append(("tokenizer.ggml.add_bos_token", .bool(addBOS)))
        meta.append(("tokenizer.ggml.add_space_prefix", .bool(false)))
        var template = config["chat_template"]?.stringValue
        if template == nil, let data = FileManager.default.contents(atPath: hf.folder + "/chat_template.jinja") {
            template = String(decoding: data, as: UTF8.self)
        }
        if let template { meta.append(("tokenizer.chat_template", .string(template))) }
        return meta
    }
}
