// Why this file exists: real FAM is allocated once and shared by many migrations (DESIGN.md §8), so a
// migration's busy time starts at real work, not at making and pre-faulting a file. A pool is one FAM
// region (a file under /dev/shm, a DAX file) that holds a header, an extent table and the extents; the
// table is the pool's own allocation record, kept in the pool, like a FAM librarian's.
//
// Crash safety. Every change to the table is one record written into one slot, in one cache line, then
// flushed and fenced before the change is reported done. Each slot holds two versions of its record; a
// change writes generation g+1 into the half the current version (g) does not use, so a crash at any
// store leaves the current version whole: on reading, the valid version with the highest generation
// wins, and a half torn by the crash fails its digest and is ignored. A change is therefore in or out,
// never half in, and one reported done is durable. Before an extent is published its first page is
// zeroed durably, so no reader of the new record finds an older image's header in it.
//
// Ownership. An owned extent names its owner (PID, start time, boot): when that owner is dead, the extent
// is reclaimed by the next allocation or by `collectGarbage`, so nothing leaks when a node dies. A
// migration hands its extent over: the source allocates it, the target claims it once the image's
// metadata is committed, and whoever holds it last frees it. A kept extent (a committed checkpoint) has
// no owner and waits for its restore.
//
// Nodes of one machine take turns at the table with a file lock (`FileLock`), released by the kernel when
// the holder dies. Nodes on several machines would need the fabric's atomics or a librarian instead.
import Sys

/// One extent as the table describes it now.
public struct PoolExtent: Equatable, Sendable, CustomStringConvertible {
    public var slot: Int
    public var generation: UInt64
    public var state: ExtentState
    public var owner: PoolOwner
    public var offset: Int
    public var byteCount: Int
    /// Which migration's: derived from its key (`MigrationKey.poolTag`), so only a key holder finds it.
    public var tag: UInt64

    public var description: String {
        "slot \(slot) gen \(generation) \(state) \(byteCount >> 20) MiB at \(offset >> 20) MiB tag \(String(tag, radix: 16))"
            + (state == .owned ? " owner \(owner)" : "")
    }
}

public enum PoolError: Error, CustomStringConvertible, Sendable {
    case notAPool(path: String, reason: String)
    case full(path: String, requestedByteCount: Int, largestFreeByteCount: Int)
    case tableFull(path: String, slotCount: Int)
    case tagInUse(path: String, extent: PoolExtent)
    case overlapping(path: String, PoolExtent, PoolExtent)
    case lock(path: String, SyscallError)

    public var description: String {
        switch self {
        case .notAPool(let path, let reason):
            "\(path) is not a FAM pool (\(reason)); make one with `fammig pool create --pool \(path) --mib N`."
        case .full(let path, let requested, let largest):
            "the pool \(path) has no free extent of \(requested >> 20) MiB (the largest is \(largest >> 20) MiB); "
                + "run `fammig pool gc --pool \(path)`, free a kept checkpoint, or make a bigger pool."
        case .tableFull(let path, let slotCount):
            "every one of the \(slotCount) extent slots of \(path) is in use; run `fammig pool gc --pool \(path)` or make a pool with more slots."
        case .tagInUse(let path, let extent):
            "the pool \(path) already holds an extent of this migration's key (\(extent)); use a new key for each migration."
        case .overlapping(let path, let first, let second):
            "the extent table of \(path) is damaged: \(first) overlaps \(second); stop every node using it and make the pool again."
        case .lock(let path, let error):
            "cannot lock the pool \(path) (\(error))."
        }
    }
}

public final class FAMPool: @unchecked Sendable {
    public let backend: any FAMBackend
    public let header: PoolHeader
    /// The file whose flock serialises changes to the table; nil when one thread owns the pool (tests).
    private let lockPath: String?
    private let isAlive: @Sendable (PoolOwner) -> Bool
    private var name: String { backend.path ?? "FAM pool" }

    public static let defaultUnitByteCount = 2 << 20
    public static let defaultSlotCount = 256

    private init(backend: any FAMBackend, header: PoolHeader, lockPath: String?, isAlive: @escaping @Sendable (PoolOwner) -> Bool) {
        self.backend = backend
        self.header = header
        self.lockPath = lockPath
        self.isAlive = isAlive
    }

    /// Writes an empty pool over all of `backend`: the table cleared and durable first, then the header
    /// (so a crash in between leaves no pool, never a pool with a stale table).
    public static func format(backend: any FAMBackend, slotCount: Int = defaultSlotCount, unitByteCount: Int = defaultUnitByteCount,
                              poolID: UInt64, lockPath: String?,
                              isAlive: @escaping @Sendable (PoolOwner) -> Bool = PoolOwner.isAliveOnThisMachine) throws(PoolError) -> FAMPool {
        precondition(slotCount > 0 && slotCount <= PoolHeader.maximumSlotCount, "a pool of \(slotCount) slots")
        precondition(unitByteCount >= .pageSize && unitByteCount & (unitByteCount - 1) == 0, "a pool unit of \(unitByteCount) bytes")
        let dataOffset = PoolHeader.dataOffset(slotCount: slotCount, unitByteCount: unitByteCount)
        let poolByteCount = backend.byteCount / unitByteCount * unitByteCount
        guard poolByteCount > dataOffset else {
            throw .notAPool(path: backend.path ?? "FAM", reason: "\(backend.byteCount) bytes hold no extent after a table of \(slotCount) slots")
        }
        let header = PoolHeader(slotCount: slotCount, unitByteCount: unitByteCount, dataOffset: dataOffset, poolByteCount: poolByteCount, poolID: poolID)
        backend.storeUInt64(0, at: 0)
        backend.flush(at: 0, count: 8)
        backend.fence()
        let tableByteCount = slotCount * PoolHeader.slotByteCount
        backend.store([UInt8](repeating: 0, count: tableByteCount), at: PoolHeader.tableOffset)
        backend.flush(at: PoolHeader.tableOffset, count: tableByteCount)
        backend.fence()
        backend.store(header.encoded(), at: 0)
        backend.flush(at: 0, count: PoolHeader.byteCount)
        backend.fence()
        return FAMPool(backend: backend, header: header, lockPath: lockPath, isAlive: isAlive)
    }

    /// The pool in `backend`, after checking its header.
    public static func open(backend: any FAMBackend, lockPath: String?,
                            isAlive: @escaping @Sendable (PoolOwner) -> Bool = PoolOwner.isAliveOnThisMachine) throws(PoolError) -> FAMPool {
        guard backend.byteCount >= PoolHeader.tableOffset else {
            throw .notAPool(path: backend.path ?? "FAM", reason: "\(backend.byteCount) bytes are too few")
        }
        switch PoolHeader.decode(backend.loadBytes(at: 0, count: PoolHeader.byteCount), mappedByteCount: backend.byteCount) {
        case .failure(let problem): throw .notAPool(path: backend.path ?? "FAM", reason: problem.reason)
        case .success(let header): return FAMPool(backend: backend, header: header, lockPath: lockPath, isAlive: isAlive)
        }
    }

    // MARK: Reading the table

    private func recordOffset(slot: Int, half: Int) -> Int {
        PoolHeader.tableOffset + slot * PoolHeader.slotByteCount + half * PoolRecord.byteCount
    }

    private func seed(slot: Int, half: Int) -> UInt64 {
        header.poolID ^ (UInt64(slot) << 1 | UInt64(half)) &* 0x9E37_79B9_7F4A_7C15
    }

    /// The slot's current record: the valid version with the highest generation; a free record of
    /// generation 0 when neither half holds one (never written, or the first write was torn).
    private func currentRecord(slot: Int) -> PoolRecord {
        var best = PoolRecord.free(generation: 0)
        for half in 0..<2 {
            guard let record = PoolRecord.decode(backend.loadBytes(at: recordOffset(slot: slot, half: half), count: PoolRecord.byteCount),
                                                 seed: seed(slot: slot, half: half)),
                  record.generation % 2 == UInt64(half), record.generation > best.generation, isInBounds(record) else { continue }
            best = record
        }
        return best
    }

    /// A free record says nothing about bytes; any other must lie wholly in the data area, on units.
    private func isInBounds(_ record: PoolRecord) -> Bool {
        guard record.state != .free else { return true }
        let unit = UInt64(header.unitByteCount)
        return record.offset >= UInt64(header.dataOffset) && record.offset % unit == 0 && record.extentByteCount > 0
            && record.extentByteCount % unit == 0 && record.extentByteCount <= UInt64(header.poolByteCount) - record.offset
    }

    private func extent(slot: Int, _ record: PoolRecord) -> PoolExtent {
        PoolExtent(slot: slot, generation: record.generation, state: record.state, owner: record.owner,
                   offset: Int(record.offset), byteCount: Int(record.extentByteCount), tag: record.tag)
    }

    /// Every extent that is not free, by slot; throws when two overlap (the protocol never lets them).
    public func extents() throws(PoolError) -> [PoolExtent] {
        var result: [PoolExtent] = []
        for slot in 0..<header.slotCount {
            let record = currentRecord(slot: slot)
            if record.state != .free { result.append(extent(slot: slot, record)) }
        }
        let byOffset = result.sorted { $0.offset < $1.offset }
        for (first, second) in zip(byOffset, byOffset.dropFirst()) where first.offset + first.byteCount > second.offset {
            throw .overlapping(path: name, first, second)
        }
        return result
    }

    /// Free bytes in the data area (not counting extents a dead owner still holds).
    public func freeByteCount() throws(PoolError) -> Int {
        header.poolByteCount - header.dataOffset - (try extents()).reduce(0) { $0 + $1.byteCount }
    }

    // MARK: Changing the table

    /// Writes `record` as the slot's next version: the half its generation names, one line, flushed and
    /// fenced before returning.
    private func write(_ record: PoolRecord, slot: Int) {
        let half = Int(record.generation % 2)
        let offset = recordOffset(slot: slot, half: half)
        backend.store(record.encoded(seed: seed(slot: slot, half: half)), at: offset)
        backend.flush(at: offset, count: PoolRecord.byteCount)
        backend.fence()
    }

    private func withTableLock<T>(_ body: () throws(PoolError) -> T) throws(PoolError) -> T {
        guard let lockPath else { return try body() }
        let lock: FileLock
        do { lock = try FileLock.acquire(path: lockPath) } catch { throw .lock(path: lockPath, error) }
        defer { lock.release() }
        return try body()
    }

    /// Frees every owned extent whose owner is dead; returns them (as they were).
    @discardableResult
    public func collectGarbage() throws(PoolError) -> [PoolExtent] {
        try withTableLock { () throws(PoolError) in try reclaimDead() }
    }

    private func reclaimDead() throws(PoolError) -> [PoolExtent] {
        var reclaimed: [PoolExtent] = []
        for extent in try extents() where extent.state == .owned && !isAlive(extent.owner) {
            write(.free(generation: extent.generation + 1), slot: extent.slot)
            reclaimed.append(extent)
        }
        return reclaimed
    }

    /// Takes a new extent of at least `byteCount` bytes for `owner`, first fit, after reclaiming what dead
    /// owners held. Its first page is zero and durable before the record names it.
    public func allocate(byteCount: Int, tag: UInt64, owner: PoolOwner) throws(PoolError) -> PoolExtent {
        precondition(byteCount > 0, "an extent of \(byteCount) bytes")
        return try withTableLock { () throws(PoolError) -> PoolExtent in
            _ = try reclaimDead()
            let taken = try extents()
            if let same = taken.first(where: { $0.tag == tag }) { throw .tagInUse(path: name, extent: same) }
            let unit = header.unitByteCount
            let rounded = (byteCount + unit - 1) / unit * unit
            var cursor = header.dataOffset
            var largest = 0
            var found: Int?
            for extent in taken.sorted(by: { $0.offset < $1.offset }) + [PoolExtent.end(header.poolByteCount)] {
                let gap = extent.offset - cursor
                if gap >= rounded { found = cursor; break }
                largest = max(largest, gap)
                cursor = max(cursor, extent.offset + extent.byteCount)
            }
            guard let offset = found else { throw .full(path: name, requestedByteCount: rounded, largestFreeByteCount: largest) }
            guard let slot = (0..<header.slotCount).first(where: { currentRecord(slot: $0).state == .free }) else {
                throw .tableFull(path: name, slotCount: header.slotCount)
            }
            let zeroCount = min(.pageSize, rounded)
            backend.store([UInt8](repeating: 0, count: zeroCount), at: offset)
            backend.flush(at: offset, count: zeroCount)
            backend.fence()
            let record = PoolRecord(generation: currentRecord(slot: slot).generation + 1, state: .owned, owner: owner,
                                    offset: UInt64(offset), extentByteCount: UInt64(rounded), tag: tag)
            write(record, slot: slot)
            return extent(slot: slot, record)
        }
    }

    /// The extent holding `tag`'s image, as the table says now (nil: none).
    public func find(tag: UInt64) throws(PoolError) -> PoolExtent? {
        try extents().first { $0.tag == tag }
    }

    /// Makes `owner` the owner of `tag`'s extent (the target taking it over from the source, or a
    /// restore taking a kept checkpoint). nil when there is no such extent.
    public func claim(tag: UInt64, owner: PoolOwner) throws(PoolError) -> PoolExtent? {
        try withTableLock { () throws(PoolError) -> PoolExtent? in
            guard let current = try find(tag: tag) else { return nil }
            if current.state == .owned && current.owner == owner { return current }
            return rewrite(current, state: .owned, owner: owner)
        }
    }

    /// Lets `extent` outlive its owner (a committed checkpoint); false when it is no longer the one the
    /// caller holds (someone reclaimed or claimed it since).
    @discardableResult
    public func keep(_ extent: PoolExtent) throws(PoolError) -> PoolExtent? {
        try withTableLock { () throws(PoolError) -> PoolExtent? in
            let record = currentRecord(slot: extent.slot)
            guard record.generation == extent.generation else { return nil }
            return rewrite(self.extent(slot: extent.slot, record), state: .kept, owner: .none)
        }
    }

    /// Frees `extent` if the table still holds exactly this version of it (nobody reclaimed, claimed or
    /// changed it since); returns whether it did.
    @discardableResult
    public func free(_ extent: PoolExtent) throws(PoolError) -> Bool {
        try withTableLock { () throws(PoolError) -> Bool in
            let record = currentRecord(slot: extent.slot)
            guard record.generation == extent.generation, record.state != .free else { return false }
            write(.free(generation: record.generation + 1), slot: extent.slot)
            return true
        }
    }

    private func rewrite(_ extent: PoolExtent, state: ExtentState, owner: PoolOwner) -> PoolExtent {
        let record = PoolRecord(generation: extent.generation + 1, state: state, owner: owner, offset: UInt64(extent.offset),
                                extentByteCount: UInt64(extent.byteCount), tag: extent.tag)
        write(record, slot: extent.slot)
        return self.extent(slot: extent.slot, record)
    }

    /// The extent as a FAM backend of its own, for the image writer and reader.
    public func view(of extent: PoolExtent) -> ExtentFAM {
        ExtentFAM(base: backend, startOffset: extent.offset, byteCount: extent.byteCount,
                  name: "\(name)#\(extent.slot)")
    }
}

extension PoolExtent {
    /// A sentinel at the end of the data area, for the first-fit scan.
    static func end(_ poolByteCount: Int) -> PoolExtent {
        PoolExtent(slot: -1, generation: 0, state: .owned, owner: .none, offset: poolByteCount, byteCount: 0, tag: 0)
    }
}

extension MigrationKey {
    /// The tag of this migration's extent in a pool: only a node holding the key can find the extent.
    public var poolTag: UInt64 {
        let bytes = derivedBytes(purpose: "pool extent tag", byteCount: 8)
        // 0 never names an extent.
        return max(1, bytes.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) })
    }
}
