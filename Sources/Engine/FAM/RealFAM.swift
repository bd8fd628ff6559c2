// Why this file exists: the production FAM backend. A MAP_SHARED file (under /dev/shm, or a DAX file on
// persistent/CXL memory) where stores, flushes and fences are the real instructions.
import Sys

/// FAM backed by a real shared mapping; every call goes straight to `SharedMapping`.
public final class RealFAM: FAMBackend {
    public let mapping: SharedMapping

    public init(mapping: SharedMapping) {
        self.mapping = mapping
    }

    /// Creates a new FAM file of `byteCount` bytes (use `ImageLayout.byteCount(...)`). `prefault` maps
    /// every page before the freeze so the dump does not pay first-touch faults.
    public static func create(path: String, byteCount: Int, prefault: Bool) throws(ImageError) -> RealFAM {
        do {
            return RealFAM(mapping: try SharedMapping.create(path: path, byteCount: byteCount, prefault: prefault))
        } catch {
            throw .cannotCreate(path: path, error)
        }
    }

    /// Maps an existing FAM file whole; `ImageReader.open` then decides whether it holds an image.
    public static func open(path: String, writable: Bool, prefault: Bool = false) throws(ImageError) -> RealFAM {
        do {
            return RealFAM(mapping: try SharedMapping.open(path: path, writable: writable, prefault: prefault))
        } catch {
            throw .cannotOpen(path: path, error)
        }
    }

    /// Maps an image file to restore from, refusing one that someone else could have written: it must
    /// belong to this user and be writable by nobody else. (The check uses the descriptor that was
    /// mapped, so a file swapped in under the path afterwards changes nothing.)
    /// A pool is opened `writable` (every node changes its extent table) and pre-faulted, once per node.
    public static func openTrusted(path: String, writable: Bool = false, prefault: Bool = false) throws(ImageError) -> RealFAM {
        let fam = try open(path: path, writable: writable, prefault: prefault)
        let owner = fam.mapping.ownerUserID, permissions = fam.mapping.permissionBits
        let userID = ProcessIdentity.current().effectiveUserID
        guard owner == userID else {
            throw .untrustedFile(path: path, reason: "belongs to uid \(owner), not to this user (uid \(userID))")
        }
        guard permissions & 0o022 == 0 else {
            throw .untrustedFile(path: path, reason: "is writable by group or others (mode \(String(permissions, radix: 8)))")
        }
        return fam
    }

    public var byteCount: Int { mapping.byteCount }
    public var path: String? { mapping.path }
    /// Which write-back instruction `flush` uses on this CPU.
    public var flushInstruction: FlushInstruction { mapping.flushInstruction }

    public func store(_ bytes: [UInt8], at byteOffset: Int) { mapping.store(bytes: bytes, at: byteOffset) }
    public func storeUInt64(_ value: UInt64, at byteOffset: Int) { mapping.storeUInt64(value, at: byteOffset) }

    @discardableResult
    public func storeFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) throws(SyscallError) -> Int {
        try mapping.readFromProcess(processID: processID, ranges: ranges)
    }

    /// On a thread of its own: process_vm_readv of the next batch overlaps the flush and digests of the
    /// one before (both cores work; the nonlive dump's pipeline).
    public func startStoreFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) -> PendingStore {
        let mapping = mapping
        return PendingStore { () throws(SyscallError) in try mapping.readFromProcess(processID: processID, ranges: ranges) }
    }

    /// On a thread of its own: a restore loads and verifies the next batch while it installs this one.
    /// The codes on every CPU (this thread's share, one more thread per CPU), while the caller installs.
    public func startPageLoad(at byteOffset: Int, pageCount: Int, pageByteCount: Int,
                              code: @escaping @Sendable (Int, ArraySlice<UInt8>) -> UInt64) -> PendingPages {
        let mapping = mapping
        return PendingPages {
            PendingPages.loadAndCode(mapping.loadBytes(at: byteOffset, count: pageCount * pageByteCount), pageByteCount: pageByteCount,
                                     threadCount: Spawn.onlineCPUCount, code: code)
        }
    }

    /// One share of the pages per CPU, each loaded (one copy per share, not per page) and coded on a
    /// thread of its own while the next batch is read from the victim.
    public func pageCodes(at byteOffset: Int, pageCount: Int, pageByteCount: Int,
                          code: @escaping @Sendable (Int, ArraySlice<UInt8>) -> UInt64) -> [UInt64] {
        let mapping = mapping
        return PageCoding.codes(pageCount: pageCount, threadCount: Spawn.onlineCPUCount) { share in
            let bytes = mapping.loadBytes(at: byteOffset + share.lowerBound * pageByteCount, count: share.count * pageByteCount)
            return (0..<share.count).map { index in code(share.lowerBound + index, bytes[(index * pageByteCount)..<((index + 1) * pageByteCount)]) }
        }
    }

    public func flush(at byteOffset: Int, count: Int) { mapping.flush(at: byteOffset, count: count) }
    public func fence() { mapping.fence() }

    public func loadBytes(at byteOffset: Int, count: Int) -> [UInt8] { mapping.loadBytes(at: byteOffset, count: count) }
    public func loadUInt64(at byteOffset: Int) -> UInt64 { mapping.loadUInt64(at: byteOffset) }
    public func digest(at byteOffset: Int, count: Int, seed: UInt64) -> UInt64 {
        mapping.digest(at: byteOffset, count: count, seed: seed)
    }
}
