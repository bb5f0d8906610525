import CQKernels
import Foundation

/// One tensor of a checkpoint: what it is, where its bytes are, and what the format knows of its role.
public struct TensorEntry: Sendable {
    public var name: String
    public var dtype: DType
    public var shape: [Int]
    public var bytes: TensorBytes
    /// The output-channel axis, when the format knows how the tensor is used.
    public var outputAxis: Int?
    /// Ops consuming the tensor (ONNX), for `op:` rules.
    public var consumerOps: [String]
    /// The shard file holding the tensor, for sharded checkpoints.
    public var shard: String?

    public init(
        name: String, dtype: DType, shape: [Int], bytes: TensorBytes, outputAxis: Int? = nil,
        consumerOps: [String] = [], shard: String? = nil
    ) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.bytes = bytes
        self.outputAxis = outputAxis
        self.consumerOps = consumerOps
        self.shard = shard
    }

    public var elementCount: Int { Shape(shape).elementCount }
}

/// The format's own structure that its writer needs (the ONNX graph, the pickled object tree), kept by
/// the checkpoint it was read with. Writers read it and never change it.
public protocol CheckpointContainer: AnyObject, Sendable {
    /// Frees the memory holding an entry's bytes where the reader owns them (payloads copied out of
    /// a protobuf); entries of mapped files need nothing.
    func releasePayload(entry name: String)
}

extension CheckpointContainer {
    public func releasePayload(entry name: String) {}
}

/// A checkpoint read by a reader plugin: ordered tensor entries plus what the writer needs of the
/// container. Immutable once read (threads share it while converting); the one state it has, whether a
/// conversion consumed it, is behind a lock.
public final class Checkpoint: @unchecked Sendable {
    public let format: String
    /// The path the user named (a file, a folder or an index).
    public let path: String
    /// The files holding the data, in a fixed order (hashing, shard plans).
    public let files: [MappedFile]
    public let entries: [TensorEntry]
    /// Container-level string metadata (safetensors `__metadata__`), keys kept in file order.
    public let metadata: [(key: String, value: String)]
    /// Shard file names in order, when the input is sharded.
    public let shardNames: [String]?
    /// The format's own structure that its writer needs, if any.
    public let container: (any CheckpointContainer)?
    /// The Hugging Face model folder the input belongs to (config.json beside the weights), if any.
    public let hfModel: HFModelFolder?
    /// Entries the reader dequantizes while they are used (GGUF blocks, compressed-tensors weights): the
    /// input was quantized, and these are its float values.
    public let dequantizedOnRead: [String]
    private let consumeLock = NSLock()
    private var consumedFlag = false

    /// Whether a conversion that read each entry once has released entries' memory: the checkpoint
    /// cannot be converted again (open it again).
    public var consumed: Bool {
        consumeLock.lock()
        defer { consumeLock.unlock() }
        return consumedFlag
    }

    /// For a conversion done with entry `i` (its output is in the writer's hands): frees the memory the
    /// reader holds it in, and marks the checkpoint consumed.
    public func consume(_ i: Int) {
        consumeLock.lock()
        consumedFlag = true
        consumeLock.unlock()
        container?.releasePayload(entry: entries[i].name)
    }
    /// Runs now every integrity check the entries' bytes carry (CRCs of stored zip members); each
    /// runs once, so a reader of the bytes later waits for or shares its outcome. Reading the bytes
    /// checks them anyway: this only moves the work (the converter calls it on another thread).
    public func verifyIntegrity() throws {
        for e in entries { if case .verified(_, _, _, let check) = e.bytes { try check.verify() } }
    }

    public init(
        format: String, path: String, files: [MappedFile], entries: [TensorEntry],
        metadata: [(key: String, value: String)] = [], shardNames: [String]? = nil,
        container: (any CheckpointContainer)? = nil, hfModel: HFModelFolder? = nil, dequantizedOnRead: [String] = []
    ) {
        self.dequantizedOnRead = dequantizedOnRead
        self.format = format
        self.path = path
        self.files = files
        self.entries = entries
        self.metadata = metadata
        self.shardNames = shardNames
        self.container = container
        self.hfModel = hfModel
    }

    /// A hash of the input's bytes, as "ALGORITHM:hex" (for several files: the hash of their
    /// hex digests joined in order).
    public func contentHash(_ algorithm: ContentHash = .xxh64) -> String {
        let digests = files.map { algorithm.digest(of: $0) }
        if digests.count == 1 { return "\(algorithm.rawValue):\(digests[0])" }
        return "\(algorithm.rawValue):" + algorithm.digest(of: Array(digests.joined().utf8))
    }
}

/// How inputs are fingerprinted in the metadata document.
public enum ContentHash: String, Sendable, CaseIterable {
    /// XXH64: fast (memory speed), enough to tell whether an input changed.
    case xxh64
    /// SHA-256: cryptographic, checkable with sha256sum; about 2 GB/s here.
    case sha256

    func digest(of bytes: [UInt8]) -> String {
        bytes.withUnsafeBytes { raw in
            var d = Digester(self)
            d.update(raw)
            return d.hex()
        }
    }

    /// Hashes through the mapping in 4 MB windows, releasing each window's pages after use
    /// so that the hashing thread does not grow resident memory with the file.
    func digest(of f: MappedFile) -> String {
        var d = Digester(self)
        let chunk = 4 << 20
        var off = 0
        while off < f.size {
            let n = min(chunk, f.size - off)
            d.update(f.bytes(at: off, count: n))
            f.release(offset: off, count: n)
            off += n
        }
        return d.hex()
    }
}

struct Digester {
    var isSHA: Bool
    var sha = qk_sha256_state()
    var xx = qk_xxh64_state()

    /// `portable` forces SHA-256's plain C rounds (the tests compare them with the SHA extensions).
    init(_ a: ContentHash, portable: Bool = false) {
        isSHA = a == .sha256
        if isSHA { qk_sha256_init(&sha, portable ? 1 : 0) } else { qk_xxh64_init(&xx) }
    }

    mutating func update(_ b: UnsafeRawBufferPointer) {
        guard let base = b.baseAddress else { return }
        if isSHA { qk_sha256_update(&sha, base, b.count) } else { qk_xxh64_update(&xx, base, b.count) }
    }

    func hex() -> String {
        if isSHA {
            var state = sha
            var out = [UInt8](repeating: 0, count: 32)
            qk_sha256_final(&state, &out)
            return out.map { String(format: "%02x", $0) }.joined()
        }
        var state = xx
        return String(format: "%016llx", qk_xxh64_digest(&state))
    }
}

public func sha256Hex(_ s: String) -> String {
    var d = Digester(.sha256)
    Array(s.utf8).withUnsafeBytes { d.update($0) }
    return d.hex()
}

/// One tensor of an output, known before any data is produced.
public struct OutputTensor: Sendable {
    public var name: String
    public var dtype: DType
    public var shape: [Int]
    public var byteCount: Int
    public var shard: String?
    /// What the tensor is, decided once by the converter with its final (unique) name: writers read
    /// roles, they never work them out from positions or names.
    public var role: OutputRole
    public init(
        name: String, dtype: DType, shape: [Int], byteCount: Int, shard: String? = nil, role: OutputRole = .plain
    ) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.byteCount = byteCount
        self.shard = shard
        self.role = role
    }
}

/// The role of an output tensor, with the index of the plan (in `WriterOptions.plans`) it comes from.
public enum OutputRole: Sendable, Equatable {
    /// A tensor of the input, kept or cast.
    case passthrough(plan: Int)
    /// The quantized values of a tensor.
    case values(plan: Int)
    /// Its scales.
    case scale(plan: Int)
    /// Its zero points.
    case zeroPoint(plan: Int)
    /// A tensor written without plans (dequantize).
    case plain

    public var plan: Int? {
        switch self {
        case .passthrough(let p), .values(let p), .scale(let p), .zeroPoint(let p): return p
        case .plain: return nil
        }
    }

    /// For each of `planCount` plans, the indices of its outputs: values (or the passthrough tensor),
    /// then scale, then zero point, whatever their positions.
    public static func outputsByPlan(_ tensors: [OutputTensor], planCount: Int) -> [[Int]] {
        var first = [Int?](repeating: nil, count: planCount)
        var scale = [Int?](repeating: nil, count: planCount)
        var zero = [Int?](repeating: nil, count: planCount)
        for (i, t) in tensors.enumerated() {
            switch t.role {
            case .passthrough(let p), .values(let p): if p < planCount { first[p] = i }
            case .scale(let p): if p < planCount { scale[p] = i }
            case .zeroPoint(let p): if p < planCount { zero[p] = i }
            case .plain: break
            }
        }
        return (0..<planCount).map { p in [first[p], scale[p], zero[p]].compactMap { $0 } }
    }
}

/// Options a writer receives.
public struct WriterOptions: Sendable {
    /// Split into shards of at most this many bytes of tensor data (greedy, in order).
    public var maxShardSize: Int?
    /// A hint for the size of the final metadata, to reserve header room.
    public var metadataSizeHint: Int
    /// The plans behind the output tensors, for writers that rebuild a graph (ONNX).
    public var plans: [TensorPlan] = []
    /// ONNX: write tensor data to a side file (also automatic past 2 GB).
    public var externalData: Bool = false
    /// safetensors: how quantized tensors are laid out.
    public var layout: OutputLayout = .qconvert
    /// ONNX: activations quantized statically (QuantizeLinear/DequantizeLinear into `activationOps`).
    public var activations: [ActivationParameters] = []
    public var activationOps: Set<String> = []
    public init(maxShardSize: Int? = nil, metadataSizeHint: Int = 0) {
        self.maxShardSize = maxShardSize
        self.metadataSizeHint = metadataSizeHint
    }
}

/// An open output: tensors are put as they are produced; `commit` makes the output
/// appear atomically, `abort` removes every temporary file.
public protocol CheckpointSink: AnyObject {
    /// Writes the bytes of output tensor `index` (an index into the declared tensors).
    func put(_ index: Int, _ bytes: UnsafeRawBufferPointer) throws
    /// Finishes with the container metadata and qconvert's metadata document (stored under
    /// `MetadataDocument.key`); `perShard` maps a shard file name to the document of that shard.
    func commit(
        metadata: [(key: String, value: String)], document: MetadataDocument?, perShard: [String: MetadataDocument])
        throws
    func abort()
}

extension MetadataDocument {
    /// The container metadata with a document (if any) stored under its key.
    static func entries(_ metadata: [(key: String, value: String)], _ doc: MetadataDocument?) -> [(
        key: String, value: String
    )] {
        metadata.filter { $0.key != key } + (doc.map { [(key, $0.encoded)] } ?? [])
    }
}

/// A format plugin that reads checkpoints.
public protocol FormatReader: Sendable {
    var name: String { get }
    var fileExtensions: [String] { get }
    /// True when the first bytes of a file identify the format.
    func sniff(_ prefix: [UInt8], fileSize: Int) -> Bool
    /// True when a folder holds a checkpoint of this format.
    func recognizesFolder(_ path: String) -> Bool
    func read(path: String) throws -> Checkpoint
}

/// A format plugin that writes checkpoints.
public protocol FormatWriter: Sendable {
    var name: String { get }
    var fileExtensions: [String] { get }
    /// Refusals the format makes from the plans alone (an opset too old for a scheme), and the notes
    /// it adds to them; the converter calls it before any tensor is quantized.
    func check(_ plans: inout [TensorPlan], source: Checkpoint, output: String) throws
    /// Whether the format holds llama.cpp's block types (`TargetType.isBlock`).
    var holdsBlockTypes: Bool { get }
    func open(path: String, tensors: [OutputTensor], source: Checkpoint, options: WriterOptions) throws
        -> CheckpointSink
}

extension FormatWriter {
    /// Formats that can hold every plan have nothing to check.
    public func check(_ plans: inout [TensorPlan], source: Checkpoint, output: String) throws {}
    public var holdsBlockTypes: Bool { false }
}
