import Foundation

/// Batch conversion of model zoos: discovery, variants, incremental skips, sharing work out.
public enum Batch {
    /// One model to convert: a file or a folder of shards, with its path relative to the source.
    public struct Item: Sendable {
        public var path: String
        public var relative: String
        public init(path: String, relative: String) {
            self.path = path
            self.relative = relative
        }
    }

    /// One policy to apply, written under OUT/<name>/ (the empty name writes straight under OUT).
    public struct Variant: Sendable {
        public var name: String
        public var policy: Policy
        public init(name: String, policy: Policy) {
            self.name = name
            self.policy = policy
        }
    }

    /// How a model's conversion under one variant ended (the manifest's `status`).
    public enum Status: String, Sendable, CaseIterable {
        case converted, skipped, failed
        case gateFailed = "gate-failed"
    }

    /// What happened to one model under one variant.
    public struct Outcome: Sendable {
        public var model: String
        public var variant: String
        public var format: String
        public var output: String
        public var status: Status
        public var error: String?
        public var bytesBefore: Int
        public var bytesAfter: Int
        public var worstSQNR: Double?
        public var seconds: Double

        public var json: String {
            JSONValue.object([
                ("model", .string(model)), ("variant", .string(variant)), ("format", .string(format)),
                ("output", .string(output)),
                ("status", .string(status.rawValue)), ("error", error.map(JSONValue.string) ?? .null),
                ("bytes_before", .int(bytesBefore)), ("bytes_after", .int(bytesAfter)),
                ("size_ratio", bytesBefore > 0 ? .number(Double(bytesAfter) / Double(bytesBefore)) : .null),
                ("worst_sqnr_db", worstSQNR.map(JSONValue.number) ?? .null),
                ("seconds", .number((seconds * 1000).rounded() / 1000))
            ]).compact
        }

        /// A manifest: JSON lines, or CSV (with a header row).
        public static func manifest(_ rows: [Outcome], csv: Bool) -> String {
            csv
                ? ([csvHeader] + rows.map(\.csv)).joined(separator: "\n") + "\n"
                : rows.map(\.json).joined(separator: "\n") + (rows.isEmpty ? "" : "\n")
        }

        public static let csvHeader =
            "model,variant,format,status,bytes_before,bytes_after,size_ratio,worst_sqnr_db,seconds,error"
        public var csv: String {
            func q(_ s: String) -> String {
                s.contains(where: { ",\"\n".contains($0) })
                    ? "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\"" : s
            }
            let ratio = bytesBefore > 0 ? String(format: "%.4f", Double(bytesAfter) / Double(bytesBefore)) : ""
            return [
                q(model), q(variant), format, status.rawValue, String(bytesBefore), String(bytesAfter), ratio,
                worstSQNR.map { String(format: "%.2f", $0) } ?? "", String(format: "%.3f", seconds), q(error ?? "")
            ].joined(separator: ",")
        }

        /// A manifest row; nil when its status is not one qconvert writes.
        public init?(json: JSONValue) {
            guard let s = json["status"]?.stringValue.flatMap(Status.init(rawValue:)) else { return nil }
            status = s
            model = json["model"]?.stringValue ?? ""
            variant = json["variant"]?.stringValue ?? ""
            format = json["format"]?.stringValue ?? ""
            output = json["output"]?.stringValue ?? ""
            error = json["error"]?.stringValue
            bytesBefore = json["bytes_before"]?.nonNegativeInt ?? 0
            bytesAfter = json["bytes_after"]?.nonNegativeInt ?? 0
            worstSQNR = json["worst_sqnr_db"]?.doubleValue
            seconds = json["seconds"]?.doubleValue ?? 0
        }

        public init(
            model: String, variant: String, format: String, output: String, status: Status, error: String?,
            bytesBefore: Int, bytesAfter: Int, worstSQNR: Double?, seconds: Double
        ) {
            self.model = model
            self.variant = variant
            self.format = format
            self.output = output
            self.status = status
            self.error = error
            self.bytesBefore = bytesBefore
            self.bytesAfter = bytesAfter
            self.worstSQNR = worstSQNR
            self.seconds = seconds
        }
    }

    /// Models under a folder (by content, then extension; a folder with an index is one sharded
    /// model), or listed one per line in a manifest file (relative to it; # starts a comment).
    /// `excluding` (the batch's output folder) is never walked into, so outputs are never read back.
    public static func discover(_ src: String, excluding: String? = nil) throws -> [Item] {
        if let out = excluding, PathGuard.isDirectory(src), PathGuard.isInside(src, out) {
            throw QConvertError.usage(
                message:
                    "\(out): the output folder is the source folder or holds it; outputs would replace the models (choose another -o)"
            )
        }
        let skip = excluding.flatMap(PathGuard.identity)
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: src, isDirectory: &isDir) else {
            throw QConvertError.io(path: src, message: "no such file or folder")
        }
        if !isDir.boolValue {
            guard let text = try? String(contentsOfFile: src, encoding: .utf8) else {
                throw QConvertError.badInput(
                    path: src, message: "a batch source is a folder or a manifest (text, one path per line)")
            }
            let base = URL(fileURLWithPath: src).deletingLastPathComponent().path
            return text.split(separator: "\n").compactMap { raw in
                let line = raw.trimmingCharacters(in: .whitespaces)
                guard !line.isEmpty, !line.hasPrefix("#") else { return nil }
                let path = line.hasPrefix("/") ? line : base + "/" + line
                return Item(
                    path: path, relative: line.hasPrefix("/") ? URL(fileURLWithPath: line).lastPathComponent : line)
            }
        }
        var items: [Item] = []
        func walk(_ dir: String, _ rel: String) {
            let names = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter {
                !$0.hasPrefix(".")
            }.sorted()
            if !rel.isEmpty, names.contains(where: { $0.hasSuffix(".index.json") }) {
                items.append(Item(path: dir, relative: rel))
                return
            }
            for n in names {
                let p = dir + "/" + n
                let r = rel.isEmpty ? n : rel + "/" + n
                var d: ObjCBool = false
                guard FileManager.default.fileExists(atPath: p, isDirectory: &d) else { continue }
                if d.boolValue {
                    if let skip, PathGuard.identity(p) == skip { continue }  // the batch's own outputs
                    walk(p, r)
                    continue
                }
                if (try? FormatRegistry.reader(for: p)) != nil { items.append(Item(path: p, relative: r)) }
            }
        }
        walk(src, "")
        return items.sorted { $0.relative < $1.relative }
    }

    /// This copy's deterministic share of the work: items whose position is `index` modulo `count`.
    public static func shard(_ items: [Item], index: Int, count: Int) -> [Item] {
        items.enumerated().filter { $0.offset % count == index }.map(\.element)
    }

    public static func outputPath(out: String, variant: String, relative: String) -> String {
        (variant.isEmpty ? out : out + "/" + variant) + "/" + relative
    }

    /// The existing output, opened, when this qconvert version wrote it from the same input and policy.
    public static func upToDate(output: String, inputHash: String, policy: Policy) -> Checkpoint? {
        guard FileManager.default.fileExists(atPath: output), let ck = try? Converter.open(output),
            let doc = try? MetadataDocument.find(in: ck.metadata, path: output),
            doc.input.hash == inputHash, doc.policy.sha256 == sha256Hex(policy.text),
            doc.tool.version == QConvertVersion.string
        else { return nil }
        return ck
    }

    /// The tensors an earlier run recorded in an output's metadata: a folder of shards records in each
    /// shard the tensors it holds.
    static func recordedTensors(output: String, existing: Checkpoint) -> [String: TensorRecord]? {
        func doc(_ ck: Checkpoint) -> MetadataDocument? { try? MetadataDocument.find(in: ck.metadata, path: output) }
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: output, isDirectory: &isDir), isDir.boolValue,
            Set(existing.entries.compactMap(\.shard)).count > 1
        else { return doc(existing)?.tensors }
        var tensors: [String: TensorRecord] = [:]
        for shard in Set(existing.entries.compactMap(\.shard)).sorted() {
            guard let ck = try? Converter.open(output + "/" + shard), let d = doc(ck) else { return nil }
            tensors.merge(d.tensors) { a, _ in a }
        }
        return tensors
    }

    /// Converts every item under every variant, `jobs` models at a time; one failure never stops
    /// the others. `progress` is called after each model with (done, total, bytes done).
    /// `started` and `finished` report each item (by position) as it begins and ends, for a
    /// supervising process that must know which model was in flight if this one crashes.
    public static func run(
        _ items: [Item], variants: [Variant], out: String, template: ConvertOptions, jobs: Int,
        progress: (@Sendable (Int, Int, Int) -> Void)? = nil,
        started: (@Sendable (Int) -> Void)? = nil,
        finished: (@Sendable (Int, [Outcome]) -> Void)? = nil
    ) -> [Outcome] {
        let results = Box([[Outcome]](repeating: [], count: items.count))
        let next = Box(0)
        let done = Box((0, 0))
        let lock = NSLock()
        DispatchQueue.concurrentPerform(iterations: max(1, min(jobs, items.count))) { _ in
            while true {
                lock.lock()
                let k = next.value
                next.value += 1
                lock.unlock()
                guard k < items.count else { return }
                started?(k)
                let r = convertOne(items[k], variants: variants, out: out, template: template)
                finished?(k, r)
                lock.lock()
                results.value[k] = r
                done.value.0 += 1
                done.value.1 += r.first?.bytesBefore ?? 0
                let snapshot = done.value
                lock.unlock()
                progress?(snapshot.0, items.count, snapshot.1)
            }
        }
        return results.value.flatMap { $0 }
    }

    static func convertOne(_ item: Item, variants: [Variant], out: String, template: ConvertOptions) -> [Outcome] {
        let start = Date()
        let ck: Checkpoint
        let hash: String
        do {
            ck = try Converter.open(item.path)
            hash = ck.contentHash(template.inputHash)
        } catch {
            return variants.map { v in
                Outcome(
                    model: item.relative, variant: v.name, format: "?",
                    output: outputPath(out: out, variant: v.name, relative: item.relative),
                    status: .failed, error: "\(error)", bytesBefore: 0, bytesAfter: 0, worstSQNR: nil,
                    seconds: Date().timeIntervalSince(start))
            }
        }
        let before = ck.entries.reduce(0) { $0 + $1.bytes.count }
        return variants.enumerated().map { vi, v in
            // the last variant is the last to read the input: it may release its memory as it goes
            let t0 = Date()
            var output = outputPath(out: out, variant: v.name, relative: item.relative)
            // A model found by its content under an extension no writer knows: the output gets its
            // format's extension, so that it is one file of that format, never a folder by accident.
            if (try? FormatRegistry.writer(for: output, format: nil, inputFormat: ck.format)) == nil,
                let ext = FormatRegistry.writers.first(where: { $0.name == ck.format })?.fileExtensions.first
            {
                output += ext
            }
            var o = Outcome(
                model: item.relative, variant: v.name, format: ck.format, output: output, status: .converted,
                error: nil,
                bytesBefore: before, bytesAfter: 0, worstSQNR: nil, seconds: 0)
            if let existing = upToDate(output: output, inputHash: hash, policy: v.policy) {
                // Nothing to convert again, but the manifest row keeps the quality figures of the run that
                // wrote it, and a gate it failed then fails again now: a retry never turns a failure into success.
                o.status = .skipped
                o.bytesAfter = existing.entries.reduce(0) { $0 + $1.bytes.count }
                if let records = recordedTensors(output: output, existing: existing) {
                    o.worstSQNR = records.values.compactMap { $0.metrics?.sqnrDB }.min()
                    let failures = template.gates.evaluate(
                        QualityGates.rows(records, bytesBefore: before, bytesAfter: o.bytesAfter))
                    if !failures.isEmpty {
                        o.status = .gateFailed
                        o.error =
                            GateFailure(failures: failures, outputWritten: true).description
                            + " (output of an earlier run)"
                    }
                }
                o.seconds = Date().timeIntervalSince(t0)
                return o
            }
            do {
                try FileManager.default.createDirectory(
                    atPath: URL(fileURLWithPath: output).deletingLastPathComponent().path,
                    withIntermediateDirectories: true)
                var opts = template
                opts.policy = v.policy
                opts.consumeInput = vi == variants.count - 1
                opts.jobs = 1
                let r = try Converter.convert(ck, output: output, options: opts, inputHash: hash)
                o.bytesAfter = r.bytesAfter
                o.worstSQNR = r.worst?.metrics?.sqnrDB
            } catch let g as GateFailure {
                // Not written: the next run converts it again and fails again until input or policy change.
                o.status = .gateFailed
                o.error = g.description
                o.bytesAfter = g.report?.bytesAfter ?? 0
                o.worstSQNR = g.report?.worst?.metrics?.sqnrDB
            } catch {
                o.status = .failed
                o.error = "\(error)"
            }
            o.seconds = Date().timeIntervalSince(t0)
            return o
        }
    }
}
