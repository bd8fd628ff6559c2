// Why this file exists: the state behind both views of a model FAM. Two real shared mappings: the
// writer's view (what the source node's cache and memory hold: every store lands here at once) and the
// fabric (what the target node sees: a line gets there only by a fence after its flush, by an early
// write-back the scheduler chooses, or by luck when the source crashes). Per-line bookkeeping lives in
// flat arrays sized at creation; a fence costs O(lines flushed since the last fence), not O(all lines).
import Engine
import Sys

/// Per-line bookkeeping of a model FAM, in flat arrays. A struct, so that a loop over many lines is one
/// access to the core's stored property, not one exclusivity check per line.
struct LineTable {
    let lineCount: Int
    private(set) var durabilities: [LineDurability]
    /// The id of each line's latest store; 0 before the first.
    private(set) var latestStoreIDs: [Int]
    /// Lines whose latest bytes may not have reached the fabric, in no order, with each line's index in
    /// the list (-1 when not pending) so that a write-back removes it in O(1).
    private var pendingList: [Int] = []
    private var pendingPositions: [Int32]
    /// `pendingList` sorted, rebuilt on demand after lines were added: the scheduler asks every step.
    /// A single write-back keeps it (binary search and remove) rather than sorting everything again.
    private var sortedPendingCache: [Int]? = []
    /// Lines flushed since the last fence (each once), for the fence to make durable.
    private var flushList: [Int] = []
    private var isInFlushList: [Bool]

    init(lineCount: Int) {
        precondition(lineCount < Int(Int32.max), "\(lineCount) lines is too large a model FAM")
        self.lineCount = lineCount
        durabilities = Array(repeating: .durable, count: lineCount)
        latestStoreIDs = Array(repeating: 0, count: lineCount)
        pendingPositions = Array(repeating: -1, count: lineCount)
        isInFlushList = Array(repeating: false, count: lineCount)
    }

    var pendingLineCount: Int { pendingList.count }

    func isPending(_ line: Int) -> Bool { pendingPositions[line] >= 0 }

    func firstNotDurable(in lines: Range<Int>) -> Int? {
        for line in lines where durabilities[line] != .durable { return line }
        return nil
    }

    mutating func sortedPendingLines() -> [Int] {
        if let sortedPendingCache { return sortedPendingCache }
        let sorted = pendingList.sorted()
        sortedPendingCache = sorted
        return sorted
    }

    /// A store wrote `lines`: not durable, pending, even if flushed before (that flush does not cover it).
    mutating func stored(_ lines: Range<Int>, storeID: Int) {
        for line in lines {
            latestStoreIDs[line] = storeID
            durabilities[line] = .stored
            if pendingPositions[line] < 0 {
                pendingPositions[line] = Int32(pendingList.count)
                pendingList.append(line)
                sortedPendingCache = nil
            }
        }
    }

    mutating func flushed(_ lines: Range<Int>) {
        for line in lines where durabilities[line] == .stored {
            durabilities[line] = .flushed
            if !isInFlushList[line] {
                isInFlushList[line] = true
                flushList.append(line)
            }
        }
    }

    private mutating func removePending(_ line: Int) {
        let position = Int(pendingPositions[line])
        precondition(position >= 0, "line \(line) is not pending")
        let lastLine = pendingList.removeLast()
        if lastLine != line {
            pendingList[position] = lastLine
            pendingPositions[lastLine] = Int32(position)
        }
        pendingPositions[line] = -1
    }

    /// Every line still flushed becomes durable. Returns the runs of adjacent lines that were pending,
    /// to be copied to the fabric (a line written back early already is there).
    mutating func fenced() -> [Range<Int>] {
        var runs: [Range<Int>] = []
        for line in flushList {
            isInFlushList[line] = false
            guard durabilities[line] == .flushed else { continue }  // stored again since its flush
            durabilities[line] = .durable
            guard pendingPositions[line] >= 0 else { continue }
            removePending(line)
            if let last = runs.last, last.upperBound == line {
                runs[runs.count - 1] = last.lowerBound..<(line + 1)
            } else {
                runs.append(line..<(line + 1))
            }
        }
        if !runs.isEmpty { sortedPendingCache = nil }
        flushList.removeAll(keepingCapacity: true)
        return runs
    }

    /// One line reached the fabric on its own; its durability is unchanged.
    mutating func writtenBack(_ line: Int) {
        precondition(pendingPositions[line] >= 0, "line \(line) has nothing to write back")
        removePending(line)
        if var sorted = sortedPendingCache {
            sortedPendingCache = nil  // one owner while it changes, so the removal does not copy it
            var lowerIndex = 0
            var upperIndex = sorted.count
            while lowerIndex < upperIndex {
                let middleIndex = (lowerIndex + upperIndex) / 2
                if sorted[middleIndex] < line { lowerIndex = middleIndex + 1 } else { upperIndex = middleIndex }
            }
            precondition(lowerIndex < sorted.count && sorted[lowerIndex] == line, "pending line \(line) missing from the sorted list")
            sorted.remove(at: lowerIndex)
            sortedPendingCache = sorted
        }
    }

    /// The source node died: nothing is pending any more (what did not get through is lost), nothing
    /// is waiting for a fence. Durabilities stay as they were.
    mutating func crashed() {
        for line in pendingList { pendingPositions[line] = -1 }
        pendingList.removeAll()
        sortedPendingCache = []
        for line in flushList { isInFlushList[line] = false }
        flushList.removeAll()
    }
}

/// Shared by `ModelFAM` and its two `ModelFAMNode`s, so that neither view keeps the other alive.
/// Driven from one thread (torture's deterministic driver), hence `@unchecked Sendable`.
final class ModelFAMCore: @unchecked Sendable {
    static let lineByteCount = 64

    let byteCount: Int
    let lineCount: Int
    let writerView: SharedMapping
    let fabric: SharedMapping
    let ledger: ModelFAMLedger?
    var currentStep = 0
    private(set) var isCrashed = false
    private(set) var isReleased = false
    private var lineTable: LineTable
    private(set) var stores: [FAMStore] = []
    let checker = FAMChecker()

    init(writerView: SharedMapping, fabric: SharedMapping, ledger: ModelFAMLedger?) {
        precondition(writerView.byteCount == fabric.byteCount, "writer view of \(writerView.byteCount) bytes, fabric of \(fabric.byteCount)")
        byteCount = writerView.byteCount
        lineCount = (byteCount + Self.lineByteCount - 1) / Self.lineByteCount
        self.writerView = writerView
        self.fabric = fabric
        self.ledger = ledger
        lineTable = LineTable(lineCount: lineCount)
        ledger?.modelCreated()
    }

    deinit { release() }

    func release() {
        if isReleased { return }
        isReleased = true
        writerView.close()
        fabric.close()
        // The log and the violations stay readable; the per-line arrays go with the mappings.
        lineTable = LineTable(lineCount: 0)
        ledger?.modelReleased()
    }

    // MARK: Lines

    func lines(covering byteRange: Range<Int>) -> Range<Int> {
        precondition(byteRange.lowerBound >= 0 && byteRange.upperBound <= byteCount,
                     "bytes \(byteRange) outside the \(byteCount)-byte model FAM")
        if byteRange.isEmpty { return 0..<0 }
        return (byteRange.lowerBound / Self.lineByteCount)..<((byteRange.upperBound - 1) / Self.lineByteCount + 1)
    }

    private func checkLine(_ line: Int) {
        precondition(!isReleased, "model FAM used after release()")
        precondition(line >= 0 && line < lineCount, "line \(line) outside 0..<\(lineCount)")
    }

    func durability(line: Int) -> LineDurability {
        checkLine(line)
        return lineTable.durabilities[line]
    }

    func isPending(line: Int) -> Bool {
        checkLine(line)
        return lineTable.isPending(line)
    }

    func latestStore(line: Int) -> FAMStore? {
        checkLine(line)
        let id = lineTable.latestStoreIDs[line]
        return id == 0 ? nil : stores[id - 1]
    }

    func firstNotDurableLine(in byteRange: Range<Int>) -> Int? {
        lineTable.firstNotDurable(in: lines(covering: byteRange))
    }

    var pendingLines: [Int] {
        precondition(!isReleased, "model FAM used after release()")
        return lineTable.sortedPendingLines()
    }

    var pendingLineCount: Int { lineTable.pendingLineCount }

    /// Copies whole lines from the writer's view to the fabric (the last line may be short).
    private func copyToFabric(lines: Range<Int>) {
        let start = lines.lowerBound * Self.lineByteCount
        let end = min(byteCount, lines.upperBound * Self.lineByteCount)
        fabric.store(bytes: writerView.loadBytes(at: start, count: end - start), at: start)
    }

    // MARK: Writer side

    private func checkWriterAlive() {
        precondition(!isReleased, "model FAM used after release()")
        // The deterministic driver never steps the dumper again after a crash; a store here is its bug.
        precondition(!isCrashed, "the source node crashed: its view of the model FAM is dead")
    }

    /// Runs `write` (which puts the bytes into the writer's view), then logs, checks and books one store
    /// per range. A failed `write` (process_vm_readv) may have written part of any range, so every range
    /// is booked before the error is passed on.
    func recordStores<WriteError: Error>(kind: FAMStore.Kind, ranges: [Range<Int>],
                                         write: () throws(WriteError) -> Void) throws(WriteError) {
        checkWriterAlive()
        for range in ranges { _ = lines(covering: range) }
        var writeError: WriteError?
        do { try write() } catch { writeError = error }
        for range in ranges where !range.isEmpty {
            let store = FAMStore(id: stores.count + 1, byteOffset: range.lowerBound, byteCount: range.count, step: currentStep, kind: kind)
            stores.append(store)
            if range.overlaps(0..<ImageLayout.stateWordOffset) { checker.superblockChanged() }
            checker.check(store: store, in: self)
            lineTable.stored(lines(covering: range), storeID: store.id)
        }
        if let writeError { throw writeError }
    }

    func flush(byteRange: Range<Int>) {
        checkWriterAlive()
        lineTable.flushed(lines(covering: byteRange))
    }

    /// Every line still flushed (not stored again since) becomes durable and reaches the fabric; runs of
    /// adjacent lines are copied at once.
    func fence() {
        checkWriterAlive()
        for run in lineTable.fenced() { copyToFabric(lines: run) }
    }

    // MARK: The fabric's own moves

    /// The cache wrote `line` back on its own: its bytes are visible now, its durability unchanged.
    func writeBack(line: Int) {
        checkLine(line)
        lineTable.writtenBack(line)
        copyToFabric(lines: line..<(line + 1))
    }

    /// The source node died: each pending line, in line order, reaches the fabric or is lost, one coin
    /// of `random` each. Returns the lines that reached it.
    func crash(using random: inout some RandomNumberGenerator) -> [Int] {
        checkWriterAlive()
        let reached = pendingLines.filter { _ in Bool.random(using: &random) }
        for line in reached { copyToFabric(lines: line..<(line + 1)) }
        lineTable.crashed()
        isCrashed = true
        return reached
    }

    // MARK: Reads

    func sourceRead() -> SharedMapping {
        checkWriterAlive()
        return writerView
    }

    /// The fabric, after checking a read that relies on durable bytes.
    func targetDependentRead(_ kind: FAMRead.Kind, byteRange: Range<Int>) -> SharedMapping {
        precondition(!isReleased, "model FAM used after release()")
        _ = lines(covering: byteRange)
        checker.check(read: FAMRead(kind: kind, byteOffset: byteRange.lowerBound, byteCount: byteRange.count, step: currentStep), in: self)
        return fabric
    }

    /// A polling load (`loadUInt64`): allowed to see bytes that are not durable yet.
    func targetPolledWord(at byteOffset: Int) -> UInt64 {
        precondition(!isReleased, "model FAM used after release()")
        let value = fabric.loadUInt64(at: byteOffset)
        checker.observePolledWord(at: byteOffset, value: value, in: self)
        return value
    }

    /// A `loadBytes` within one aligned 8-byte word is one load too, polled like `loadUInt64`:
    /// `ImageReader.peekState` reads the superblock's magic that way while it waits for a commit.
    static func isPollingLoad(byteOffset: Int, count: Int) -> Bool {
        count > 0 && count <= 8 && byteOffset / 8 == (byteOffset + count - 1) / 8
    }

    func targetPolledBytes(at byteOffset: Int, count: Int) -> [UInt8] {
        precondition(!isReleased, "model FAM used after release()")
        let bytes = fabric.loadBytes(at: byteOffset, count: count)
        if count == 8 { checker.observePolledWord(at: byteOffset, value: fabric.loadUInt64(at: byteOffset), in: self) }
        return bytes
    }
}
