// qconvert-fuzz TARGET [libFuzzer options and corpus folders]
//
// Built by `make fuzz` with -sanitize=fuzzer,address (and UBSan traps in the C code), it runs
// libFuzzer on one of the readers listed in FuzzEntries.targets. Built normally (swift build), it
// replays files instead: every file named, or every file in each folder named, goes through the
// target once, which is how the corpus is checked without sanitizers.
import Foundation
import QConvertKit

#if QCONVERT_FUZZ
    import CFuzzDriver
#endif

let arguments = CommandLine.arguments
guard arguments.count >= 2, let chosen = FuzzEntries.targets[arguments[1]] else {
    let names = FuzzEntries.targets.keys.sorted().joined(separator: " ")
    FileHandle.standardError.write(Data("usage: qconvert-fuzz TARGET [options] [corpus...]\ntargets: \(names)\n".utf8))
    exit(64)
}
nonisolated(unsafe) var target: (UnsafeRawBufferPointer) -> Void = chosen

#if QCONVERT_FUZZ
    var rest = [arguments[0]] + arguments.dropFirst(2)
    var argc = Int32(rest.count)
    var cArgs: [UnsafeMutablePointer<CChar>?] = rest.map { strdup($0) } + [nil]
    let status = cArgs.withUnsafeMutableBufferPointer { buf -> Int32 in
        var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = buf.baseAddress
        return LLVMFuzzerRunDriver(&argc, &argv) { data, size in fuzzOne(data, size) }
    }
    exit(status)
#else
    var files: [String] = []
    for a in arguments.dropFirst(2) where !a.hasPrefix("-") {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: a, isDirectory: &isDir) else { continue }
        if isDir.boolValue {
            let names = (try? FileManager.default.contentsOfDirectory(atPath: a)) ?? []
            files += names.sorted().map { a + "/" + $0 }
        } else {
            files.append(a)
        }
    }
    for f in files {
        guard let data = FileManager.default.contents(atPath: f) else { continue }
        data.withUnsafeBytes { target($0) }
    }
    print("\(arguments[1]): replayed \(files.count) inputs")
#endif
