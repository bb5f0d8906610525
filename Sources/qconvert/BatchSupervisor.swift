import ArgumentParser
import Foundation
import QConvertKit

#if canImport(Glibc)
    import Glibc
#endif

/// Crash isolation for `batch`: one model that crashes the reader (a signal, a trap) must not take
/// the other models down. The batch process supervises a worker process (qconvert itself, with the
/// same options) that converts the models and writes a journal line as each one starts and ends.
/// When the worker dies, the models it had finished keep their results, the one in flight is
/// recorded as failed, and a new worker takes the rest. With several models in flight at the
/// crash, the suspects are retried one at a time first, so the blame falls on the right one.
enum BatchSupervisor {
    /// The running worker, for forwarding SIGINT/SIGTERM (0 when none).
    nonisolated(unsafe) static var workerPID: pid_t = 0

    static func supervise(_ items: [Batch.Item], jobs: Int, variants: [Batch.Variant], out: String) throws -> [Batch
        .Outcome]
    {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent(
            "qconvert-batch-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        ).path
        guard mkdir(dir, 0o700) == 0 else {
            throw QConvertError.write(path: dir, message: String(cString: strerror(errno)))
        }
        defer { try? FileManager.default.removeItem(atPath: dir) }
        installForwarding()

        var results = [[Batch.Outcome]?](repeating: nil, count: items.count)
        var pending = Array(items.indices)
        var suspects = Set<Int>()
        var round = 0
        while !pending.isEmpty {
            round += 1
            // suspects first, one model at a time, until each is cleared or blamed
            let order = pending.filter { suspects.contains($0) } + pending.filter { !suspects.contains($0) }
            let itemsFile = dir + "/items-\(round).json"
            let journal = dir + "/journal-\(round).jsonl"
            let list = JSONValue.array(
                order.map { k in .array([.int(k), .string(items[k].path), .string(items[k].relative)]) })
            try Data(list.compact.utf8).write(to: URL(fileURLWithPath: itemsFile))
            _ = FileManager.default.createFile(atPath: journal, contents: nil)
            let status = try spawnWorker(extra: [
                "--worker-items", itemsFile, "--worker-journal", journal,
                "--jobs", String(suspects.isEmpty ? jobs : 1)
            ])
            var inFlight = Set<Int>()
            let text = (try? String(contentsOfFile: journal, encoding: .utf8)) ?? ""
            for line in text.split(separator: "\n") {
                guard let v = try? JSONParser.parse(String(line)) else { continue }  // a line cut by the crash
                if let k = v["start"]?.nonNegativeInt, k < items.count { inFlight.insert(k) }
                if let k = v["done"]?.nonNegativeInt, k < items.count, let rows = v["outcomes"]?.arrayValue {
                    results[k] = rows.compactMap(Batch.Outcome.init(json:))
                    inFlight.remove(k)
                    suspects.remove(k)
                }
            }
            pending.removeAll { results[$0] != nil }
            switch status {
            case .exited(0):
                // a clean exit converts everything it was given
                for k in pending {
                    results[k] = failed(items[k], variants, out, "the batch worker ended without converting it")
                }
                pending = []
            case .exited(let code) where code >= 128 && [SIGINT, SIGTERM].contains(code - 128):
                throw ExitCode(code)  // interrupted: the worker removed its temporaries
            default:
                if inFlight.count == 1, let k = inFlight.first {
                    results[k] = failed(items[k], variants, out, "qconvert crashed while converting it (\(status))")
                    pending.removeAll { $0 == k }
                    suspects.remove(k)
                } else if inFlight.isEmpty {
                    // a death outside any model: give up on the rest rather than loop
                    for k in pending {
                        results[k] = failed(
                            items[k], variants, out, "the batch worker died (\(status)) before converting it")
                    }
                    pending = []
                } else {
                    suspects.formUnion(inFlight)
                }
            }
        }
        return results.flatMap { $0 ?? [] }
    }

    static func failed(_ item: Batch.Item, _ variants: [Batch.Variant], _ out: String, _ why: String) -> [Batch.Outcome]
    {
        variants.map { v in
            Batch.Outcome(
                model: item.relative, variant: v.name, format: "?",
                output: Batch.outputPath(out: out, variant: v.name, relative: item.relative),
                status: .failed, error: why, bytesBefore: 0, bytesAfter: 0, worstSQNR: nil, seconds: 0)
        }
    }

    enum Status: CustomStringConvertible, Equatable {
        case exited(Int32)
        case signalled(Int32)
        var description: String {
            switch self {
            case .exited(let c): return "exit code \(c)"
            case .signalled(let s):
                return "signal \(s)" + (String(validatingCString: strsignal(s)).map { ": \($0)" } ?? "")
            }
        }
    }

    /// Runs this executable with the original arguments plus `extra`, waiting for it.
    static func spawnWorker(extra: [String]) throws -> Status {
        let exe =
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        let args = [exe] + CommandLine.arguments.dropFirst() + extra
        var argv: [UnsafeMutablePointer<CChar>?] = args.map { strdup($0) } + [nil]
        defer { for a in argv { free(a) } }
        var pid: pid_t = 0
        // The worker's crash is reported in the manifest, not as a backtrace on the user's terminal.
        var env = ProcessInfo.processInfo.environment.filter { $0.key != "SWIFT_BACKTRACE" }.map {
            "\($0.key)=\($0.value)"
        }
        env.append("SWIFT_BACKTRACE=enable=no")
        var envp: [UnsafeMutablePointer<CChar>?] = env.map { strdup($0) } + [nil]
        defer { for e in envp { free(e) } }
        let rc = posix_spawn(&pid, exe, nil, nil, &argv, &envp)
        guard rc == 0 else {
            throw QConvertError.io(path: exe, message: "cannot start a batch worker: \(String(cString: strerror(rc)))")
        }
        workerPID = pid
        defer { workerPID = 0 }
        var st: Int32 = 0
        while waitpid(pid, &st, 0) < 0 {
            if errno != EINTR {
                throw QConvertError.io(path: exe, message: "lost the batch worker: \(String(cString: strerror(errno)))")
            }
        }
        // WIFEXITED / WEXITSTATUS / WTERMSIG spelled out (they are macros)
        if st & 0x7f == 0 { return .exited((st >> 8) & 0xff) }
        return .signalled(st & 0x7f)
    }

    /// SIGINT/SIGTERM go to the worker, which removes its temporaries and exits 128+N; the
    /// supervisor then exits with the same code.
    static func installForwarding() {
        for sig in [SIGINT, SIGTERM] {
            signal(sig, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            source.setEventHandler {
                let pid = workerPID
                if pid > 0 { kill(pid, sig) } else { exit(ExitStatus.interrupted(sig)) }
            }
            source.resume()
            signalSources.append(source)
        }
    }

    /// The worker's side: converts the listed items, journaling each start and end.
    static func work(
        itemsFile: String, journal: String, variants: [Batch.Variant], out: String, template: ConvertOptions,
        jobs: Int, tty: Bool
    ) throws {
        if TempFileRegistry.dieWithParent() { throw ExitCode(ExitStatus.interrupted(SIGTERM)) }
        installInterruptCleanup()
        guard let data = FileManager.default.contents(atPath: itemsFile),
            let list = try? JSONParser.parse(String(decoding: data, as: UTF8.self)).arrayValue
        else {
            throw QConvertError.badInput(path: itemsFile, message: "not a batch worker item list")
        }
        var positions: [Int] = []
        var items: [Batch.Item] = []
        for row in list {
            guard let r = row.arrayValue, r.count == 3, let k = r[0].nonNegativeInt, let path = r[1].stringValue,
                let rel = r[2].stringValue
            else {
                throw QConvertError.badInput(path: itemsFile, message: "not a batch worker item list")
            }
            positions.append(k)
            items.append(Batch.Item(path: path, relative: rel))
        }
        let fd = open(journal, O_WRONLY | O_APPEND | O_CLOEXEC)
        guard fd >= 0 else { throw QConvertError.write(path: journal, message: String(cString: strerror(errno))) }
        defer { close(fd) }
        let lock = NSLock()
        @Sendable func note(_ line: String) {
            lock.lock()
            defer { lock.unlock() }
            let bytes = Array((line + "\n").utf8)
            var done = 0
            while done < bytes.count {
                let n = bytes[done...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                if n <= 0 {
                    if errno == EINTR { continue }
                    return
                }
                done += n
            }
        }
        let start = Date()
        let at = positions
        // Fault injection for the crash-isolation tests: a model whose relative path is named here
        // crashes the worker as a hostile file would.
        let crashOn = Set(
            (ProcessInfo.processInfo.environment["QCONVERT_TEST_CRASH_ON"] ?? "").split(separator: ",").map(String.init)
        )
        let names = items.map(\.relative)
        _ = Batch.run(
            items, variants: variants, out: out, template: template, jobs: jobs,
            progress: { done, total, bytes in
                guard tty else { return }
                let elapsed = Date().timeIntervalSince(start)
                let eta = done > 0 ? elapsed / Double(done) * Double(total - done) : 0
                let line =
                    "\r\u{1B}[2K\(done)/\(total) models  \(formatBytes(bytes))  \(String(format: "%.0f", elapsed)) s  ETA \(String(format: "%.0f", eta)) s"
                FileHandle.standardError.write(Data(line.utf8))
            },
            started: { k in
                note("{\"start\":\(at[k])}")
                if crashOn.contains(names[k]) { raise(SIGSEGV) }
            },
            finished: { k, outcomes in
                note("{\"done\":\(at[k]),\"outcomes\":[" + outcomes.map(\.json).joined(separator: ",") + "]}")
            })
    }
}
