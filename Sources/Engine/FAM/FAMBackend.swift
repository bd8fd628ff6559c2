// Why this file exists: the engine writes and reads FAM only through this protocol, so the torture
// framework can put a model FAM (write-back caches, partial persistence, a store/flush/fence log) under
// the same engine code. Its methods mirror the hardware: stores land in the writer's cache, `flush`
// writes lines back, `fence` orders them; what a reader on another node sees is only what was fenced.
import Sys

/// Fabric-attached memory as one node sees it. Offsets are bytes from the start of the FAM file; an
/// offset outside `byteCount` is a programmer error (precondition), never input.
public protocol FAMBackend: AnyObject, Sendable {
    /// Size of the FAM region in bytes.
    var byteCount: Int { get }
    /// The file behind it, for messages; nil for a model that has none.
    var path: String? { get }
    /// Where a reader on another node finds `count` bytes at `byteOffset` to copy them itself (UFFDIO_COPY
    /// or pwrite straight from FAM, without a load through this protocol). For the real backend the
    /// mapping itself; a model returns its fabric copy and records the read as one that depends on those
    /// bytes being durable.
    func readableRegion(at byteOffset: Int, count: Int) -> (mapping: SharedMapping, offset: Int)

    // Writer side.
    func store(_ bytes: [UInt8], at byteOffset: Int)
    /// One 8-byte store; at an 8-aligned offset a reader sees either the old or the new value.
    func storeUInt64(_ value: UInt64, at byteOffset: Int)
    /// The dump path: process_vm_readv from `processID` straight into FAM. Returns the bytes copied.
    @discardableResult
    func storeFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) throws(SyscallError) -> Int
    /// Writes back (clwb) every cache line overlapping the range; not ordered until `fence()`.
    func flush(at byteOffset: Int, count: Int)
    /// Orders every earlier flush before any later store (sfence).
    func fence()

    // Reader side.
    func loadBytes(at byteOffset: Int, count: Int) -> [UInt8]
    func loadUInt64(at byteOffset: Int) -> UInt64
    /// csys_digest64 of `count` bytes (a multiple of 8) as this node sees them.
    func digest(at byteOffset: Int, count: Int, seed: UInt64) -> UInt64
}
