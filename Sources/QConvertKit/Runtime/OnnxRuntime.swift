import Foundation

#if canImport(Glibc)
    import Glibc
#endif

/// onnxruntime's C library, loaded at run time (the `onnxruntime` wheel ships `libonnxruntime.so.1.*`;
/// there is no header to build against). `OrtGetApiBase()` → `GetApi(version)` gives the function
/// table, whose order onnxruntime only ever appends to: the entries used are declared here by their
/// index, from the API's documentation (`onnxruntime_c_api.h`), and `OnnxRuntimeTests` calls every one
/// of them so that a wrong index fails a test instead of a conversion.
public final class OnnxRuntime: @unchecked Sendable {
    /// Table indices (OrtApi, the order of onnxruntime_c_api.h).
    enum Entry: Int {
        case createStatus = 0
        case getErrorCode = 1
        case getErrorMessage = 2
        case createEnv = 3
        case createSession = 7
        case createSessionFromArray = 8
        case run = 9
        case createSessionOptions = 10
        case setSessionGraphOptimizationLevel = 23
        case setIntraOpNumThreads = 24
        case disableCpuMemArena = 19
        case sessionGetInputCount = 30
        case sessionGetOutputCount = 31
        case sessionGetInputTypeInfo = 33
        case sessionGetInputName = 36
        case sessionGetOutputName = 37
        case createTensorWithDataAsOrtValue = 49
        case getTensorMutableData = 51
        case castTypeInfoToTensorInfo = 55
        case getTensorElementType = 60
        case getDimensionsCount = 61
        case getDimensions = 62
        case getTensorShapeElementCount = 64
        case getTensorTypeAndShape = 65
        case createCpuMemoryInfo = 69
        case allocatorFree = 76
        case getAllocatorWithDefaultOptions = 78
        case releaseEnv = 92
        case releaseStatus = 93
        case releaseMemoryInfo = 94
        case releaseSession = 95
        case releaseValue = 96
        case releaseTypeInfo = 98
        case releaseTensorTypeAndShapeInfo = 99
        case releaseSessionOptions = 100
    }
    /// The API version asked for: every entry above exists since version 1; 16 is onnxruntime 1.16.
    static let apiVersion: UInt32 = 16

    typealias P = UnsafeMutableRawPointer
    typealias Status = P?
    public let libraryPath: String
    public let version: String
    let table: UnsafePointer<UnsafeRawPointer?>
    let handle: UnsafeMutableRawPointer
    let env: P
    let memoryInfo: P
    let allocator: P

    func fn<T>(_ e: Entry, as type: T.Type) -> T {
        unsafeBitCast(table[e.rawValue]!, to: type)
    }

    /// Where onnxruntime is looked for, in order: `explicit` (`--onnxruntime`), `$QCONVERT_ONNXRUNTIME`,
    /// then the `onnxruntime` Python package of `$VIRTUAL_ENV`, of `.venv` in this folder or a parent, and
    /// the usual site-packages.
    public static func candidates(explicit: String?) -> [String] {
        if let explicit { return [explicit] }
        if let env = ProcessInfo.processInfo.environment["QCONVERT_ONNXRUNTIME"], !env.isEmpty { return [env] }
        var roots: [String] = []
        if let v = ProcessInfo.processInfo.environment["VIRTUAL_ENV"] { roots.append(v + "/lib") }
        // ./.venv, or one of a parent folder (a command run from inside a project)
        var dir = URL(fileURLWithPath: FileManager.default.currentDirectoryPath)
        while true {
            roots.append(dir.path + "/.venv/lib")
            let up = dir.deletingLastPathComponent()
            if up.path == dir.path { break }
            dir = up
        }
        roots += ["/usr/local/lib", "/usr/lib"]
        if let home = ProcessInfo.processInfo.environment["HOME"] { roots.append(home + "/.local/lib") }
        var found: [String] = []
        for root in roots {
            for py in ((try? FileManager.default.contentsOfDirectory(atPath: root)) ?? []).sorted()
            where py.hasPrefix("python3") {
                for site in ["site-packages", "dist-packages"] {
                    let capi = "\(root)/\(py)/\(site)/onnxruntime/capi"
                    for f in ((try? FileManager.default.contentsOfDirectory(atPath: capi)) ?? []).sorted()
                    where f.hasPrefix("libonnxruntime.so") {
                        found.append(capi + "/" + f)
                    }
                }
            }
        }
        return found
    }

    /// Loads the first library found; fails in one line saying how to get one.
    public static func load(explicit: String? = nil) throws -> OnnxRuntime {
        let paths = candidates(explicit: explicit)
        var last = "no onnxruntime library found"
        for p in paths {
            do { return try OnnxRuntime(path: p) } catch QConvertError.usage(let m) { last = m }
        }
        throw QConvertError.usage(
            message:
                "\(last); install it with 'pip install onnxruntime' (in the active virtual environment), or name libonnxruntime.so with --onnxruntime or QCONVERT_ONNXRUNTIME"
        )
    }

    public init(path: String) throws {
        guard let h = dlopen(path, RTLD_NOW | RTLD_LOCAL) else {
            throw QConvertError.usage(message: "\(path): cannot load: \(String(cString: dlerror()))")
        }
        guard let sym = dlsym(h, "OrtGetApiBase") else {
            dlclose(h)
            throw QConvertError.usage(message: "\(path): not onnxruntime (no OrtGetApiBase)")
        }
        typealias GetApiBase = @convention(c) () -> UnsafePointer<UnsafeRawPointer?>?
        typealias GetApi = @convention(c) (UInt32) -> UnsafePointer<UnsafeRawPointer?>?
        typealias GetVersion = @convention(c) () -> UnsafePointer<CChar>?
        // OrtApiBase: { GetApi, GetVersionString }
        guard let base = unsafeBitCast(sym, to: GetApiBase.self)(), let getApi = base[0], let getVersion = base[1]
        else {
            dlclose(h)
            throw QConvertError.usage(message: "\(path): OrtGetApiBase returned nothing")
        }
        let v = unsafeBitCast(getVersion, to: GetVersion.self)().map { String(cString: $0) } ?? "?"
        guard let api = unsafeBitCast(getApi, to: GetApi.self)(OnnxRuntime.apiVersion) else {
            dlclose(h)
            throw QConvertError.usage(
                message:
                    "\(path): onnxruntime \(v) does not serve API version \(OnnxRuntime.apiVersion) (1.16 or newer is needed)"
            )
        }
        handle = h
        libraryPath = path
        version = v
        table = api
        var e: P? = nil
        var m: P? = nil
        var a: P? = nil
        typealias CreateEnv = @convention(c) (Int32, UnsafePointer<CChar>, UnsafeMutablePointer<P?>) -> Status
        typealias CreateCpuMemoryInfo = @convention(c) (Int32, Int32, UnsafeMutablePointer<P?>) -> Status
        typealias GetAllocator = @convention(c) (UnsafeMutablePointer<P?>) -> Status
        let t = UnsafePointer<UnsafeRawPointer?>(api)
        func call(_ s: Status) throws {
            guard let s else { return }
            typealias Message = @convention(c) (P) -> UnsafePointer<CChar>
            typealias Release = @convention(c) (P) -> Void
            let text = String(cString: unsafeBitCast(t[Entry.getErrorMessage.rawValue]!, to: Message.self)(s))
            unsafeBitCast(t[Entry.releaseStatus.rawValue]!, to: Release.self)(s)
            throw QConvertError.usage(message: "\(path): onnxruntime: \(text)")
        }
        try call(unsafeBitCast(t[Entry.createEnv.rawValue]!, to: CreateEnv.self)(3, "qconvert", &e))
        // OrtArenaAllocator (1), OrtMemTypeDefault (0)
        try call(unsafeBitCast(t[Entry.createCpuMemoryInfo.rawValue]!, to: CreateCpuMemoryInfo.self)(1, 0, &m))
        try call(unsafeBitCast(t[Entry.getAllocatorWithDefaultOptions.rawValue]!, to: GetAllocator.self)(&a))
        env = e!
        memoryInfo = m!
        allocator = a!
    }

    deinit {
        typealias Release = @convention(c) (P) -> Void
        fn(.releaseMemoryInfo, as: Release.self)(memoryInfo)
        fn(.releaseEnv, as: Release.self)(env)
    }

    /// Throws the status's message (and releases it) when there is one.
    func check(_ s: Status, _ what: String) throws {
        guard let s else { return }
        typealias Message = @convention(c) (P) -> UnsafePointer<CChar>
        typealias Release = @convention(c) (P) -> Void
        let text = String(cString: fn(.getErrorMessage, as: Message.self)(s))
        fn(.releaseStatus, as: Release.self)(s)
        throw QConvertError.badInput(path: what, message: "onnxruntime: \(text)")
    }

    /// A status made and read back (CreateStatus, GetErrorCode, GetErrorMessage, ReleaseStatus).
    func statusRoundTrip(code: Int32, message: String) -> (Int32, String) {
        typealias Create = @convention(c) (Int32, UnsafePointer<CChar>) -> P
        typealias Code = @convention(c) (P) -> Int32
        typealias Message = @convention(c) (P) -> UnsafePointer<CChar>
        typealias Release = @convention(c) (P) -> Void
        let s = fn(.createStatus, as: Create.self)(code, message)
        defer { fn(.releaseStatus, as: Release.self)(s) }
        return (fn(.getErrorCode, as: Code.self)(s), String(cString: fn(.getErrorMessage, as: Message.self)(s)))
    }

    /// ONNX element types (TensorProto.DataType) of the dtypes a session is fed or returns.
    public static func elementType(_ d: DType) -> Int32? {
        switch d {
        case .f32: 1
        case .u8: 2
        case .i8: 3
        case .u16: 4
        case .i16: 5
        case .i32: 6
        case .i64: 7
        case .bool: 9
        case .f16: 10
        case .f64: 11
        case .u32: 12
        case .u64: 13
        case .bf16: 16
        default: nil
        }
    }

    /// A session over a serialized model, on one thread, at onnxruntime's basic graph optimizations
    /// (requested outputs stay as the graph computes them).
    public func session(model bytes: [UInt8], name: String, threads: Int = 1) throws -> OrtSessionHandle {
        try session(name: name, threads: threads) { o, s in
            typealias Create = @convention(c) (P, UnsafeRawPointer, Int, P, UnsafeMutablePointer<P?>) -> Status
            try bytes.withUnsafeBytes { b in
                try check(fn(.createSessionFromArray, as: Create.self)(env, b.baseAddress!, b.count, o, &s), name)
            }
        }
    }

    /// A session over a model file (onnxruntime reads it itself).
    public func session(path: String, name: String, threads: Int = 1) throws -> OrtSessionHandle {
        try session(name: name, threads: threads) { o, s in
            typealias Create = @convention(c) (P, UnsafePointer<CChar>, P, UnsafeMutablePointer<P?>) -> Status
            try check(fn(.createSession, as: Create.self)(env, path, o, &s), name)
        }
    }

    func session(name: String, threads: Int, create: (P, inout P?) throws -> Void) throws -> OrtSessionHandle {
        typealias CreateOptions = @convention(c) (UnsafeMutablePointer<P?>) -> Status
        typealias SetLevel = @convention(c) (P, Int32) -> Status
        typealias SetThreads = @convention(c) (P, Int32) -> Status
        typealias ReleaseOptions = @convention(c) (P) -> Void
        var o: P? = nil
        try check(fn(.createSessionOptions, as: CreateOptions.self)(&o), name)
        defer { fn(.releaseSessionOptions, as: ReleaseOptions.self)(o!) }
        try check(fn(.setSessionGraphOptimizationLevel, as: SetLevel.self)(o!, 1), name)
        try check(fn(.setIntraOpNumThreads, as: SetThreads.self)(o!, Int32(threads)), name)
        // no arena: memory goes back as each run's intermediates are freed (calibration runs stay small)
        typealias Disable = @convention(c) (P) -> Status
        try check(fn(.disableCpuMemArena, as: Disable.self)(o!), name)
        var s: P? = nil
        try create(o!, &s)
        return try OrtSessionHandle(runtime: self, session: s!, name: name)
    }
}

/// An input or output of a session: its name, element type and shape (-1: free).
public struct OrtValueInfo: Sendable, Equatable {
    public var name: String
    public var elementType: Int32
    public var shape: [Int64]
}

/// One onnxruntime session.
public final class OrtSessionHandle {
    typealias P = OnnxRuntime.P
    let rt: OnnxRuntime
    let session: P
    let name: String
    public private(set) var inputs: [OrtValueInfo] = []
    public private(set) var outputNames: [String] = []

    init(runtime: OnnxRuntime, session: P, name: String) throws {
        rt = runtime
        self.session = session
        self.name = name
        typealias Count = @convention(c) (P, UnsafeMutablePointer<Int>) -> OnnxRuntime.Status
        typealias Name =
            @convention(c) (P, Int, P, UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>) -> OnnxRuntime.Status
        typealias Free = @convention(c) (P, UnsafeMutableRawPointer) -> OnnxRuntime.Status
        typealias TypeInfo = @convention(c) (P, Int, UnsafeMutablePointer<P?>) -> OnnxRuntime.Status
        typealias Cast = @convention(c) (P, UnsafeMutablePointer<P?>) -> OnnxRuntime.Status
        typealias Release = @convention(c) (P) -> Void
        func names(_ count: OnnxRuntime.Entry, _ get: OnnxRuntime.Entry) throws -> [String] {
            var n = 0
            try rt.check(rt.fn(count, as: Count.self)(session, &n), name)
            return try (0..<n).map { i in
                var s: UnsafeMutablePointer<CChar>? = nil
                try rt.check(rt.fn(get, as: Name.self)(session, i, rt.allocator, &s), name)
                defer { _ = rt.fn(.allocatorFree, as: Free.self)(rt.allocator, s!) }
                return String(cString: s!)
            }
        }
        let inputNames = try names(.sessionGetInputCount, .sessionGetInputName)
        outputNames = try names(.sessionGetOutputCount, .sessionGetOutputName)
        for (i, n) in inputNames.enumerated() {
            var info: P? = nil
            try rt.check(rt.fn(.sessionGetInputTypeInfo, as: TypeInfo.self)(session, i, &info), name)
            defer { rt.fn(.releaseTypeInfo, as: Release.self)(info!) }
            var tensor: P? = nil
            try rt.check(rt.fn(.castTypeInfoToTensorInfo, as: Cast.self)(info!, &tensor), name)
            guard let tensor else {
                throw QConvertError.badInput(path: name, message: "input '\(n)' is not a tensor")
            }
            let (type, shape) = try typeAndShape(tensor)
            inputs.append(OrtValueInfo(name: n, elementType: type, shape: shape))
        }
    }

    deinit {
        typealias Release = @convention(c) (P) -> Void
        rt.fn(.releaseSession, as: Release.self)(session)
    }

    func typeAndShape(_ info: P) throws -> (Int32, [Int64]) {
        typealias ElementType = @convention(c) (P, UnsafeMutablePointer<Int32>) -> OnnxRuntime.Status
        typealias DimCount = @convention(c) (P, UnsafeMutablePointer<Int>) -> OnnxRuntime.Status
        typealias Dims = @convention(c) (P, UnsafeMutablePointer<Int64>, Int) -> OnnxRuntime.Status
        var type: Int32 = 0
        try rt.check(rt.fn(.getTensorElementType, as: ElementType.self)(info, &type), name)
        var n = 0
        try rt.check(rt.fn(.getDimensionsCount, as: DimCount.self)(info, &n), name)
        var dims = [Int64](repeating: 0, count: n)
        if n > 0 { try rt.check(rt.fn(.getDimensions, as: Dims.self)(info, &dims, n), name) }
        return (type, dims)
    }

    /// An input tensor: its element type, shape and bytes (borrowed for the run).
    public struct Input {
        public var name: String
        public var elementType: Int32
        public var shape: [Int64]
        public var bytes: [UInt8]
        public init(name: String, elementType: Int32, shape: [Int64], bytes: [UInt8]) {
            self.name = name
            self.elementType = elementType
            self.shape = shape
            self.bytes = bytes
        }
    }

    /// Runs the session and hands each requested output (float32 only; others are an error) to `body`
    /// while onnxruntime still owns its memory.
    public func run(
        _ feeds: [Input], outputs: [String], _ body: (Int, [Int64], UnsafeBufferPointer<Float>) throws -> Void
    ) throws {
        typealias Create =
            @convention(c) (P, UnsafeMutableRawPointer, Int, UnsafePointer<Int64>, Int, Int32, UnsafeMutablePointer<P?>)
            ->
            OnnxRuntime.Status
        typealias Run =
            @convention(c) (
                P, P?, UnsafePointer<UnsafePointer<CChar>?>, UnsafePointer<P?>, Int,
                UnsafePointer<UnsafePointer<CChar>?>,
                Int, UnsafeMutablePointer<P?>
            ) -> OnnxRuntime.Status
        typealias Release = @convention(c) (P) -> Void
        typealias TypeAndShape = @convention(c) (P, UnsafeMutablePointer<P?>) -> OnnxRuntime.Status
        typealias Data = @convention(c) (P, UnsafeMutablePointer<UnsafeMutableRawPointer?>) -> OnnxRuntime.Status
        typealias ElementCount = @convention(c) (P, UnsafeMutablePointer<Int>) -> OnnxRuntime.Status
        // onnxruntime reads the inputs in place for the whole run: they live in buffers of our own,
        // freed after it (an array's storage is only borrowed inside its closure)
        let buffers = feeds.map { f -> UnsafeMutableRawBufferPointer in
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: Swift.max(f.bytes.count, 1), alignment: 64)
            f.bytes.withUnsafeBytes { b.copyMemory(from: $0) }
            return b
        }
        defer { for b in buffers { b.deallocate() } }
        var values: [P?] = []
        defer { for v in values { if let v { rt.fn(.releaseValue, as: Release.self)(v) } } }
        for (i, f) in feeds.enumerated() {
            var v: P? = nil
            try f.shape.withUnsafeBufferPointer { s in
                try rt.check(
                    rt.fn(.createTensorWithDataAsOrtValue, as: Create.self)(
                        rt.memoryInfo, buffers[i].baseAddress!, f.bytes.count,
                        s.baseAddress ?? UnsafePointer(bitPattern: 8)!, s.count, f.elementType, &v), name)
            }
            values.append(v)
        }
        let inNames = feeds.map { strdup($0.name) }
        let outNames = outputs.map { strdup($0) }
        defer { for p in inNames + outNames { free(p) } }
        var results = [P?](repeating: nil, count: outputs.count)
        defer { for r in results { if let r { rt.fn(.releaseValue, as: Release.self)(r) } } }
        let ins = inNames.map { UnsafePointer($0) }
        let outs = outNames.map { UnsafePointer($0) }
        try rt.check(
            rt.fn(.run, as: Run.self)(session, nil, ins, values, values.count, outs, outs.count, &results), name)
        for (k, r) in results.enumerated() {
            guard let r else { continue }
            var info: P? = nil
            try rt.check(rt.fn(.getTensorTypeAndShape, as: TypeAndShape.self)(r, &info), name)
            defer { rt.fn(.releaseTensorTypeAndShapeInfo, as: Release.self)(info!) }
            let (type, shape) = try typeAndShape(info!)
            guard type == 1 else {
                throw QConvertError.badInput(
                    path: name, message: "output '\(outputs[k])' is of ONNX type \(type), not float32")
            }
            var n = 0
            try rt.check(rt.fn(.getTensorShapeElementCount, as: ElementCount.self)(info!, &n), name)
            var data: UnsafeMutableRawPointer? = nil
            try rt.check(rt.fn(.getTensorMutableData, as: Data.self)(r, &data), name)
            try body(k, shape, UnsafeBufferPointer(start: data?.assumingMemoryBound(to: Float.self), count: n))
        }
    }
}
