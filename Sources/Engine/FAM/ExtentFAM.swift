// Why this file exists: an image in a FAM pool lives in one extent of the pool, and the engine writes
// and reads images at offsets from 0. This view is that extent as a FAM of its own: every offset is
// moved by the extent's start and checked against its end, so an image never reaches a neighbour's.
import Sys

/// `byteCount` bytes of `base` from `startOffset`, as a FAM backend of its own.
public final class ExtentFAM: FAMBackend, @unchecked Sendable {
    public let base: any FAMBackend
    public let startOffset: Int
    public let byteCount: Int
    public let path: String?

    public init(base: any FAMBackend, startOffset: Int, byteCount: Int, name: String) {
        precondition(startOffset >= 0 && byteCount > 0 && startOffset <= base.byteCount - byteCount,
                     "extent \(startOffset)+\(byteCount) outside a \(base.byteCount)-byte FAM")
        self.base = base
        self.startOffset = startOffset
        self.byteCount = byteCount
        self.path = name
    }

    /// The offset in `base`, after checking the range lies in the extent (engine offsets: a precondition).
    private func moved(_ byteOffset: Int, _ count: Int) -> Int {
        precondition(byteOffset >= 0 && count >= 0 && byteOffset <= byteCount && count <= byteCount - byteOffset,
                     "range \(byteOffset)+\(count) outside the \(byteCount)-byte extent \(path ?? "")")
        return startOffset + byteOffset
    }

    public func store(_ bytes: [UInt8], at byteOffset: Int) { base.store(bytes, at: moved(byteOffset, bytes.count)) }
    public func storeUInt64(_ value: UInt64, at byteOffset: Int) { base.storeUInt64(value, at: moved(byteOffset, 8)) }

    @discardableResult
    public func storeFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) throws(SyscallError) -> Int {
        let movedRanges = ranges.map { range in
            (remoteAddress: range.remoteAddress, byteCount: range.byteCount, mappingOffset: moved(range.mappingOffset, range.byteCount))
        }
        return try base.storeFromProcess(processID: processID, ranges: movedRanges)
    }

    public func startStoreFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) -> PendingStore {
        base.startStoreFromProcess(processID: processID, ranges: ranges.map { range in
            (remoteAddress: range.remoteAddress, byteCount: range.byteCount, mappingOffset: moved(range.mappingOffset, range.byteCount))
        })
    }

    public func startPageLoad(at byteOffset: Int, pageCount: Int, pageByteCount: Int,
                              code: @escaping @Sendable (Int, ArraySlice<UInt8>) -> UInt64) -> PendingPages {
        base.startPageLoad(at: moved(byteOffset, pageCount * pageByteCount), pageCount: pageCount, pageByteCount: pageByteCount, code: code)
    }

    public func pageCodes(at byteOffset: Int, pageCount: Int, pageByteCount: Int,
                          code: @escaping @Sendable (Int, ArraySlice<UInt8>) -> UInt64) -> [UInt64] {
        base.pageCodes(at: moved(byteOffset, pageCount * pageByteCount), pageCount: pageCount, pageByteCount: pageByteCount, code: code)
    }

    public func flush(at byteOffset: Int, count: Int) { base.flush(at: moved(byteOffset, count), count: count) }
    public func fence() { base.fence() }

    public func loadBytes(at byteOffset: Int, count: Int) -> [UInt8] { base.loadBytes(at: moved(byteOffset, count), count: count) }
    public func loadUInt64(at byteOffset: Int) -> UInt64 { base.loadUInt64(at: moved(byteOffset, 8)) }
    public func digest(at byteOffset: Int, count: Int, seed: UInt64) -> UInt64 {
        base.digest(at: moved(byteOffset, count), count: count, seed: seed)
    }
}
