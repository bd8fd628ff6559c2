// Why this file exists: the image fuzz target opens tens of thousands of mutated images; a FAM file per
// input would make the gate slow and leave files behind on a crash. The reader only ever loads from its
// backend, so an image held in memory is the same input to it as the file the source wrote.
import Engine
import Sys

/// An image in memory: one node's coherent view, no caches, no persistence. For the reader only (the
/// dumper needs a process: that is refused).
public final class MemoryFAM: FAMBackend, @unchecked Sendable {
    // Used by one thread at a time: a fuzz input is opened, checked and dropped on one thread.
    public private(set) var bytes: [UInt8]

    public init(bytes: [UInt8]) { self.bytes = bytes }

    public var byteCount: Int { bytes.count }
    public var path: String? { "fuzz-image" }

    public func store(_ newBytes: [UInt8], at byteOffset: Int) {
        checkRange(byteOffset, newBytes.count)
        bytes.replaceSubrange(byteOffset..<(byteOffset + newBytes.count), with: newBytes)
    }

    public func storeUInt64(_ value: UInt64, at byteOffset: Int) {
        store((0..<8).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }, at: byteOffset)
    }

    @discardableResult
    public func storeFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) throws(SyscallError) -> Int {
        preconditionFailure("MemoryFAM images come from the corpus, never from a process (\(processID))")
    }

    public func flush(at byteOffset: Int, count: Int) { checkRange(byteOffset, count) }
    public func fence() {}

    public func loadBytes(at byteOffset: Int, count: Int) -> [UInt8] {
        checkRange(byteOffset, count)
        return Array(bytes[byteOffset..<(byteOffset + count)])
    }

    public func loadUInt64(at byteOffset: Int) -> UInt64 {
        LittleEndian.words(loadBytes(at: byteOffset, count: 8), count: 1)[0]
    }

    public func digest(at byteOffset: Int, count: Int, seed: UInt64) -> UInt64 {
        SharedMapping.digest(of: loadBytes(at: byteOffset, count: count), seed: seed)
    }

    /// Offsets are the engine's own arithmetic, never input (FAMBackend's contract): a bad one is a bug.
    private func checkRange(_ byteOffset: Int, _ count: Int) {
        precondition(byteOffset >= 0 && count >= 0 && byteOffset <= bytes.count - count,
                     "MemoryFAM access of \(count) bytes at \(byteOffset) outside \(bytes.count)")
    }
}
