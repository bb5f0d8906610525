import Foundation
import Crypto

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

    public init(name: String, dtype: DType, shape: [Int], bytes: TensorBytes, outputAxis: Int? = nil,
                consumerOps: [String] = [], shard: String? = nil) {
        self.name = name; self.dtype = dtype; self.shape = shape; self.bytes = bytes
        self.outputAxis = outputAxis; self.consumerOps = consumerOps; self.shard = shard
    }

    public var elementCount: Int { Shape(shape).elementCount }
}

/// A checkpoint read by a reader plugin: ordered tensor entries plus what the writer needs of the container.
public final class Checkpoint: @unchecked Sendable {
    public let format: String
    /// The path the user named (a file, a folder or an index).
    public let path: String
    /// The files holding the data, in a fixed order (hashing, shard plans).
    public let files: [MappedFile]
    public var entries: [TensorEntry]
    /// Container-level string metadata (safetensors `__metadata__`), keys kept in file order.
    public var metadata: [(key: String, value: String)]
    /// Shard file names in order, when the input is sharded.
    public var shardNames: [String]?

    public init(format: String, path: String, files: [MappedFile], entries: [TensorEntry],
                metadata: [(key: String, value: String)] = [], shardNames: [String]? = nil) {
        self.format = format; self.path = path; self.files = files; self.entries = entries
        self.metadata = metadata; self.shardNames = shardNames
    }

    /// SHA-256 of the input's bytes (for several files: of their hashes in order).
    /// Pages are released as they are hashed so memory stays flat.
    public func contentHash() -> String {
        if files.count == 1 { return Checkpoint.sha256(of: files[0]) }
        var h = SHA256()
        for f in files { h.update(data: Data(Checkpoint.sha256(of: f).utf8)) }
        return h.finalize().map { String(format: "%02x", $0) }.joined()
    }

    /// Reads with pread into one reused buffer rather than through the mapping, so the
    /// hashing thread neither adds resident pages nor drops pages the converter is using.
    static func sha256(of f: MappedFile) -> String {
        var h = SHA256()
        let chunk = 4 << 20
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 64)
        defer { buf.deallocate() }
        var off = 0
        while off < f.size {
            let n = f.read(into: buf, at: off, count: min(chunk, f.size - off))
            if n <= 0 { break }
            h.update(bufferPointer: UnsafeRawBufferPointer(rebasing: buf[0..<n]))
            off += n
        }
        return h.finalize().map { String(format: "%02x", $0) }.joined()
    }
}

public func sha256Hex(_ s: String) -> String {
    SHA256.hash(data: Data(s.utf8)).map { String(format: "%02x", $0) }.joined()
}

/// One tensor of an output, known before any data is produced.
public struct OutputTensor: Sendable {
    public var name: String
    public var dtype: DType
    public var shape: [Int]
    public var byteCount: Int
    public var shard: String?
    public init(name: String, dtype: DType, shape: [Int], byteCount: Int, shard: String? = nil) {
        self.name = name; self.dtype = dtype; self.shape = shape; self.byteCount = byteCount; self.shard = shard
    }
}

/// Options a writer receives.
public struct WriterOptions: Sendable {
    /// Split into shards of at most this many bytes of tensor data (greedy, in order).
    public var maxShardSize: Int?
    /// A hint for the size of the final metadata, to reserve header room.
    public var metadataSizeHint: Int
    public init(maxShardSize: Int? = nil, metadataSizeHint: Int = 0) {
        self.maxShardSize = maxShardSize; self.metadataSizeHint = metadataSizeHint
    }
}

/// An open output: tensors are put as they are produced; `commit` makes the output
/// appear atomically, `abort` removes every temporary file.
public protocol CheckpointSink: AnyObject {
    /// Writes the bytes of output tensor `index` (an index into the declared tensors).
    func put(_ index: Int, _ bytes: UnsafeRawBufferPointer) throws
    /// Finishes with the container metadata; `perShard` maps a shard file name to the
    /// metadata of that shard where it differs.
    func commit(metadata: [(key: String, value: String)], perShard: [String: [(key: String, value: String)]]) throws
    func abort()
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
    func open(path: String, tensors: [OutputTensor], source: Checkpoint, options: WriterOptions) throws -> CheckpointSink
}
