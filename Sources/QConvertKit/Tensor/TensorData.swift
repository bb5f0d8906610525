import CQKernels
import Foundation

/// Where a tensor's bytes live: a window of a mapped file, or memory of its own.
public enum TensorBytes: @unchecked Sendable {
    case mapped(MappedFile, offset: Int, count: Int)
    /// A window of a mapped file whose integrity (a zip member's CRC-32) is verified before its bytes
    /// are first used: every reader of the bytes gets the check, none has to remember it.
    case verified(MappedFile, offset: Int, count: Int, check: IntegrityCheck)
    case owned([UInt8])
    /// Memory owned by another object (e.g. an unpacked protobuf), kept alive by `owner`.
    case borrowed(UnsafeRawPointer?, count: Int, owner: AnyObject)
    /// Bytes produced on each use (a deflated zip member, inflated only while a tensor is worked
    /// on, so an archive's memory never holds all of its members at once).
    case deferred(DeferredBytes)

    public var count: Int {
        switch self {
        case .mapped(_, _, let c), .verified(_, _, let c, _): return c
        case .owned(let a): return a.count
        case .borrowed(_, let c, _): return c
        case .deferred(let d): return d.count
        }
    }

    /// Calls `body` with the bytes; throws when deferred bytes cannot be produced (a corrupt stream).
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) throws -> R {
        switch self {
        case .mapped(let f, let off, let c): return try body(f.bytes(at: off, count: c))
        case .verified(let f, let off, let c, let check):
            try check.verify()
            return try body(f.bytes(at: off, count: c))
        case .owned(let a): return try a.withUnsafeBytes(body)
        case .borrowed(let p, let c, let owner):
            return try withExtendedLifetime(owner) {
                try body(UnsafeRawBufferPointer(start: c > 0 ? p : nil, count: c))
            }
        case .deferred(let d):
            let a = try d.produce()
            guard a.count == d.count else {
                throw QConvertError.badInput(
                    path: d.path, message: "\(d.what) produced \(a.count) bytes, expected \(d.count)")
            }
            return try a.withUnsafeBytes(body)
        }
    }

    /// Releases the resident pages of a mapped window after use.
    public func release() {
        switch self {
        case .mapped(let f, let off, let c), .verified(let f, let off, let c, _): f.release(offset: off, count: c)
        case .owned, .borrowed, .deferred: break
        }
    }

    /// The same window without its integrity check, to parse a member's header when it is read (the
    /// data still gets the check when it is used).
    var headerView: TensorBytes {
        if case .verified(let f, let off, let c, _) = self { return .mapped(f, offset: off, count: c) }
        return self
    }

    /// `count` bytes from `offset` of these bytes, still mapped (and still checked) where these are;
    /// nil for bytes that are not a mapped window.
    public func window(offset: Int, count: Int) -> TensorBytes? {
        switch self {
        case .mapped(let f, let off, _): return .mapped(f, offset: off + offset, count: count)
        case .verified(let f, let off, _, let check):
            return .verified(f, offset: off + offset, count: count, check: check)
        case .owned, .borrowed, .deferred: return nil
        }
    }
}

/// A check of some bytes' integrity, run once by whichever reader comes first (others wait for and
/// share its outcome).
public final class IntegrityCheck: @unchecked Sendable {
    private let lock = NSLock()
    private var outcome: Result<Void, Error>?
    private let body: @Sendable () throws -> Void

    public init(_ body: @escaping @Sendable () throws -> Void) { self.body = body }

    public func verify() throws {
        lock.lock()
        defer { lock.unlock() }
        if outcome == nil { outcome = Result { try body() } }
        try outcome!.get()
    }
}

/// Bytes made on demand by `produce` (which must give `count` bytes or throw).
public final class DeferredBytes: Sendable {
    public let count: Int
    let path: String
    let what: String
    let produce: @Sendable () throws -> [UInt8]

    public init(count: Int, path: String, what: String, produce: @escaping @Sendable () throws -> [UInt8]) {
        self.count = count
        self.path = path
        self.what = what
        self.produce = produce
    }
}

/// Decodes floating-point tensor bytes into float32 values.
public enum FloatDecoding {
    public static func toFloat32(_ bytes: UnsafeRawBufferPointer, dtype: DType, count: Int) -> [Float] {
        [Float](unsafeUninitializedCapacity: count) { buf, initialized in
            decode(bytes, dtype: dtype, count: count, into: buf.baseAddress!)
            initialized = count
        }
    }

    public static func decode(
        _ bytes: UnsafeRawBufferPointer, dtype: DType, count: Int, into dst: UnsafeMutablePointer<Float>
    ) {
        guard count > 0, let src = bytes.baseAddress else { return }
        switch dtype {
        case .f32: qk_copy_f32(src, Int64(count), dst)
        case .f16: qk_f16_to_f32(src, Int64(count), dst)
        case .bf16: qk_bf16_to_f32(src, Int64(count), dst)
        case .f64: qk_f64_to_f32(src, Int64(count), dst)
        case .f8e4m3:
            for i in 0..<count { dst[i] = FP8.decode(src.load(fromByteOffset: i, as: UInt8.self), format: .e4m3) }
        case .f8e5m2:
            for i in 0..<count { dst[i] = FP8.decode(src.load(fromByteOffset: i, as: UInt8.self), format: .e5m2) }
        default:
            preconditionFailure("not a floating-point dtype: \(dtype)")
        }
    }
}
