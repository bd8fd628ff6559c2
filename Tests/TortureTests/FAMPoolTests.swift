// The FAM pool's allocation table under power cuts: a run of table changes (format, allocate, claim,
// free, a dead owner reclaimed, keep) is cut before every one of its stores in turn, the machine crashes
// (each pending line, or each pending 8-byte word, reaches FAM or not, by seed), and the table read back
// must be exactly the one before the interrupted change or the one after it: never a mix, never an
// overlap, every change that returned still there, and every published extent's first page zero. Then
// the rules the allocator keeps when nothing crashes: dead owners reclaimed, a reused PID is not its
// owner, stale handles free nothing, damaged headers and records are refused or ignored.
import Glibc
import Testing
import Engine
import Sys
import Torture

/// SplitMix64, so every crash outcome is the same on every run.
private struct SeededRandom: RandomNumberGenerator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var mixed = state
        mixed = (mixed ^ (mixed >> 30)) &* 0xBF58_476D_1CE4_E5B9
        mixed = (mixed ^ (mixed >> 27)) &* 0x94D0_49BB_1331_11EB
        return mixed ^ (mixed >> 31)
    }
}

/// A FAM whose power goes out right after store number `cutAfter` (1-based; 0: before any): that store
/// is in the writer's cache, not flushed, not fenced, and nothing after it happens. `onFence` sees every
/// fence that did happen, with the stores done by then.
private final class PowerCutFAM: FAMBackend, @unchecked Sendable {
    let base: any FAMBackend
    let cutAfter: Int
    private(set) var storeCount = 0
    var onFence: ((Int) -> Void)?
    private(set) var cutReached: Bool

    init(base: any FAMBackend, cutAfter: Int) {
        self.base = base
        self.cutAfter = cutAfter
        cutReached = cutAfter == 0
    }

    var byteCount: Int { base.byteCount }
    var path: String? { "power-cut FAM" }

    /// Does the store unless the power is gone, and cuts it after store `cutAfter`.
    private func take(_ store: () -> Void) {
        guard !cutReached else { return }
        storeCount += 1
        store()
        if storeCount >= cutAfter { cutReached = true }
    }

    func store(_ bytes: [UInt8], at byteOffset: Int) { take { base.store(bytes, at: byteOffset) } }
    func storeUInt64(_ value: UInt64, at byteOffset: Int) { take { base.storeUInt64(value, at: byteOffset) } }
    func storeFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) throws(SyscallError) -> Int { preconditionFailure("the pool never dumps") }
    func flush(at byteOffset: Int, count: Int) { if !cutReached { base.flush(at: byteOffset, count: count) } }
    func fence() {
        guard !cutReached else { return }
        base.fence()
        onFence?(storeCount)
    }
    func loadBytes(at byteOffset: Int, count: Int) -> [UInt8] { base.loadBytes(at: byteOffset, count: count) }
    func loadUInt64(at byteOffset: Int) -> UInt64 { base.loadUInt64(at: byteOffset) }
    func digest(at byteOffset: Int, count: Int, seed: UInt64) -> UInt64 { base.digest(at: byteOffset, count: count, seed: seed) }
}

/// A FAM of 8-byte words with x86's failure atomicity and nothing more: a store is durable once its
/// lines were flushed and then fenced; at a crash each word stored since independently lands or not.
private final class WordTearingFAM: FAMBackend, @unchecked Sendable {
    let byteCount: Int
    private var visible: [UInt8]
    private var durable: [UInt8]
    /// Words stored since they were last made durable, and lines flushed since the last fence.
    private var dirtyWords = Set<Int>()
    private var flushedLines = Set<Int>()
    private var dirtyAtFlush: [Int: Set<Int>] = [:]

    /// FAM holding `bytes`, all durable.
    init(bytes: [UInt8]) {
        byteCount = bytes.count
        visible = bytes
        durable = bytes
    }

    convenience init(byteCount: Int, filledWith byte: UInt8 = 0) {
        self.init(bytes: [UInt8](repeating: byte, count: byteCount))
    }

    var path: String? { "word-tearing FAM" }
    func store(_ bytes: [UInt8], at byteOffset: Int) {
        visible.replaceSubrange(byteOffset..<(byteOffset + bytes.count), with: bytes)
        if bytes.isEmpty { return }
        for word in (byteOffset / 8)...((byteOffset + bytes.count - 1) / 8) { dirtyWords.insert(word) }
    }
    func storeUInt64(_ value: UInt64, at byteOffset: Int) {
        store((0..<8).map { UInt8(truncatingIfNeeded: value >> (8 * UInt64($0))) }, at: byteOffset)
    }
    func storeFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) throws(SyscallError) -> Int { preconditionFailure("the pool never dumps") }
    func flush(at byteOffset: Int, count: Int) {
        guard count > 0 else { return }
        for line in (byteOffset / 64)...((byteOffset + count - 1) / 64) {
            flushedLines.insert(line)
            dirtyAtFlush[line, default: []].formUnion((line * 8)..<(line * 8 + 8))
        }
    }
    func fence() {
        for line in flushedLines {
            for word in dirtyAtFlush[line] ?? [] where dirtyWords.contains(word) {
                durable.replaceSubrange((word * 8)..<(word * 8 + 8), with: visible[(word * 8)..<(word * 8 + 8)])
                dirtyWords.remove(word)
            }
        }
        flushedLines.removeAll()
        dirtyAtFlush.removeAll()
    }
    func loadBytes(at byteOffset: Int, count: Int) -> [UInt8] { Array(visible[byteOffset..<(byteOffset + count)]) }
    func loadUInt64(at byteOffset: Int) -> UInt64 {
        loadBytes(at: byteOffset, count: 8).enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
    }
    func digest(at byteOffset: Int, count: Int, seed: UInt64) -> UInt64 { SharedMapping.digest(of: loadBytes(at: byteOffset, count: count), seed: seed) }

    /// What FAM holds after a crash now: the durable bytes plus a seeded subset of the words not yet durable.
    func crash(using random: inout some RandomNumberGenerator) -> [UInt8] {
        var after = durable
        for word in dirtyWords.sorted() where Bool.random(using: &random) {
            after.replaceSubrange((word * 8)..<(word * 8 + 8), with: visible[(word * 8)..<(word * 8 + 8)])
        }
        return after
    }
}

/// One FAM that loses power, and how to read it back after the crash.
private protocol CrashableFAM {
    var backend: any FAMBackend { get }
    /// Fills FAM with 0xFF, durably, so a zero first page proves the allocator zeroed it.
    func poison()
    mutating func crashedBytes(seed: UInt64) throws -> [UInt8]
}

private struct ModelMachine: CrashableFAM {
    let model: ModelFAM
    var backend: any FAMBackend { model.sourceNode }
    func poison() {
        model.sourceNode.store([UInt8](repeating: 0xFF, count: model.byteCount), at: 0)
        model.sourceNode.flush(at: 0, count: model.byteCount)
        model.sourceNode.fence()
    }
    mutating func crashedBytes(seed: UInt64) throws -> [UInt8] {
        var random = SeededRandom(state: seed)
        model.crash(using: &random)
        defer { model.release() }
        return model.fabricBytes(at: 0, count: model.byteCount)
    }
}

private struct WordMachine: CrashableFAM {
    let fam: WordTearingFAM
    var backend: any FAMBackend { fam }
    func poison() {}  // made filled with 0xFF
    mutating func crashedBytes(seed: UInt64) throws -> [UInt8] {
        var random = SeededRandom(state: seed)
        return fam.crash(using: &random)
    }
}

private let unit = 64 << 10
private let poolByteCount = 4096 + 16 * unit  // the table, then 15 units of extents (4 slots)
private let slotCount = 4
private let owners = (1...4).map { PoolOwner(processID: UInt32(1000 + $0), startTime: UInt64(77 + $0), bootID: 0xB007) }

/// What a table says, without generations (they differ between an interrupted and a finished change).
private struct TableEntry: Hashable, CustomStringConvertible {
    var slot: Int, state: ExtentState, owner: PoolOwner, offset: Int, byteCount: Int, tag: UInt64
    init(_ extent: PoolExtent) {
        (slot, state, owner, offset, byteCount, tag) = (extent.slot, extent.state, extent.owner, extent.offset, extent.byteCount, extent.tag)
    }
    var description: String { "slot \(slot) \(state) \(offset)+\(byteCount) tag \(tag) pid \(owner.processID)" }
}

private func table(_ pool: FAMPool) throws -> Set<TableEntry> { Set(try pool.extents().map(TableEntry.init)) }

/// Whose extents are still alive in the scenario: owner 3 dies before the last allocation.
private final class Liveness: @unchecked Sendable {
    var dead: Set<UInt32> = []
}

/// The scenario: format, then six changes. Returns the pool (for snapshots); stops early, quietly, when
/// the power is gone (calls after the cut change nothing, and their results are not looked at).
private func runScenario(on fam: PowerCutFAM, liveness: Liveness) throws {
    do { try scenarioSteps(on: fam, liveness: liveness) } catch {
        // After the cut the table may be anything the crash allows; what the calls say then is moot.
        if !fam.cutReached { throw error }
    }
}

private func scenarioSteps(on fam: PowerCutFAM, liveness: Liveness) throws {
    let pool = try FAMPool.format(backend: fam, slotCount: slotCount, unitByteCount: unit, poolID: 0x5EED_F00D, lockPath: nil,
                                  isAlive: { !liveness.dead.contains($0.processID) })
    let first = try pool.allocate(byteCount: 3 * unit - 100, tag: 11, owner: owners[0])
    let second = try pool.allocate(byteCount: 2 * unit, tag: 22, owner: owners[1])
    _ = try pool.claim(tag: 11, owner: owners[2])
    _ = first
    try pool.free(second)
    liveness.dead.insert(owners[2].processID)
    let third = try pool.allocate(byteCount: 5 * unit, tag: 33, owner: owners[3])
    try pool.keep(third)
}

private func checkPowerCuts(machine makeMachine: () throws -> any CrashableFAM, seedsPerCut: Int) throws {
    // The uncut run: the table the writer sees at every fence, with the stores done by then.
    var snapshots: [(storeCount: Int, table: Set<TableEntry>?)] = [(0, nil)]
    var whole = try makeMachine()
    whole.poison()
    let recorder = PowerCutFAM(base: whole.backend, cutAfter: Int.max)
    recorder.onFence = { storeCount in
        let pool = try? FAMPool.open(backend: whole.backend, lockPath: nil)
        snapshots.append((storeCount, pool.flatMap { try? table($0) }))
    }
    try runScenario(on: recorder, liveness: Liveness())
    let totalStores = recorder.storeCount
    #expect(totalStores > 10)
    // The first extent went with its dead owner, the second was freed: the kept third is left.
    #expect(snapshots.last?.table.map { $0.map(\.state) } == [.kept], "the scenario's end: \(String(describing: snapshots.last?.table))")
    _ = try? whole.crashedBytes(seed: 0)

    var outcomes = 0
    for cut in 0...totalStores {
        for seed in 0..<UInt64(seedsPerCut) {
            var machine = try makeMachine()
            machine.poison()
            let cutting = PowerCutFAM(base: machine.backend, cutAfter: cut)
            try runScenario(on: cutting, liveness: Liveness())
            let bytes = try machine.crashedBytes(seed: seed &* 0x1F3 &+ UInt64(cut))
            // Read back on a machine that never crashed.
            let reader = WordTearingFAM(bytes: bytes)
            // Fences done before the cut (after at most cut - 1 stores): their tables are durable; the
            // change after the last of them may be in or out, and nothing else.
            let doneIndex = snapshots.lastIndex { $0.storeCount < cut } ?? 0
            let allowed = [snapshots[doneIndex].table] + (doneIndex + 1 < snapshots.count ? [snapshots[doneIndex + 1].table] : [])
            var recovered: Set<TableEntry>?
            do {
                let pool = try FAMPool.open(backend: reader, lockPath: nil)
                recovered = try table(pool)
                for extent in try pool.extents() {
                    #expect(reader.loadBytes(at: extent.offset, count: 4096).allSatisfy { $0 == 0 },
                            "cut after store \(cut), seed \(seed): \(extent) published with a stale first page")
                }
            } catch PoolError.notAPool {
                recovered = nil
            }
            #expect(allowed.contains(recovered), "cut after store \(cut), seed \(seed): table \(String(describing: recovered)), allowed \(allowed)")
            outcomes += 1
        }
    }
    #expect(outcomes == (totalStores + 1) * seedsPerCut)
}

@Suite struct FAMPoolCrashTests {
    /// Torture's model FAM: lines written back whole or not at all.
    @Test func powerCutAtEveryStoreOfTheModelFAM() throws {
        try checkPowerCuts(machine: { ModelMachine(model: try ModelFAM(byteCount: poolByteCount)) }, seedsPerCut: 3)
    }

    /// Only x86's 8-byte failure atomicity: a record may land torn, word by word.
    @Test func powerCutAtEveryStoreWithTornWords() throws {
        try checkPowerCuts(machine: { WordMachine(fam: WordTearingFAM(byteCount: poolByteCount, filledWith: 0xFF)) }, seedsPerCut: 16)
    }
}

@Suite struct FAMPoolRuleTests {
    private func makePool(liveness: Liveness = Liveness()) throws -> (FAMPool, WordTearingFAM) {
        let fam = WordTearingFAM(byteCount: poolByteCount)
        let pool = try FAMPool.format(backend: fam, slotCount: slotCount, unitByteCount: unit, poolID: 42, lockPath: nil,
                                      isAlive: { !liveness.dead.contains($0.processID) })
        return (pool, fam)
    }

    @Test func deadOwnersExtentIsReclaimedAndNothingLeaks() throws {
        let liveness = Liveness()
        let (pool, _) = try makePool(liveness: liveness)
        let freeAtStart = try pool.freeByteCount()
        let taken = try pool.allocate(byteCount: 4 * unit, tag: 1, owner: owners[0])
        #expect(try pool.freeByteCount() == freeAtStart - 4 * unit)
        #expect(try pool.collectGarbage().isEmpty, "a live owner's extent was reclaimed")
        liveness.dead.insert(owners[0].processID)
        #expect(try pool.collectGarbage().map(\.tag) == [1])
        #expect(try pool.freeByteCount() == freeAtStart)
        #expect(try pool.free(taken) == false, "a stale handle freed a reclaimed slot")
    }

    @Test func claimHandsTheExtentOverSoTheSourcesDeathKeepsIt() throws {
        let liveness = Liveness()
        let (pool, _) = try makePool(liveness: liveness)
        let sourceHeld = try pool.allocate(byteCount: unit, tag: 5, owner: owners[0])
        let targetHeld = try #require(try pool.claim(tag: 5, owner: owners[1]))
        #expect(targetHeld.offset == sourceHeld.offset && targetHeld.owner == owners[1])
        liveness.dead.insert(owners[0].processID)
        #expect(try pool.collectGarbage().isEmpty, "the target's extent went with the dead source")
        #expect(try pool.free(sourceHeld) == false, "the source freed an extent it had handed over")
        #expect(try pool.free(targetHeld))
        #expect(try pool.extents().isEmpty)
    }

    @Test func keptExtentOutlivesEveryOwner() throws {
        let liveness = Liveness()
        let (pool, _) = try makePool(liveness: liveness)
        let held = try pool.allocate(byteCount: unit, tag: 9, owner: owners[0])
        let kept = try #require(try pool.keep(held))
        #expect(kept.state == .kept)
        liveness.dead.insert(owners[0].processID)
        #expect(try pool.collectGarbage().isEmpty)
        #expect(try pool.claim(tag: 9, owner: owners[1])?.state == .owned)
    }

    @Test func fullPoolAndFullTableAreRefusedWithWhatToDo() throws {
        let (pool, _) = try makePool()
        do {
            _ = try pool.allocate(byteCount: 100 * unit, tag: 1, owner: owners[0])
            Issue.record("a 6.4 MiB extent came out of a 1 MiB pool")
        } catch PoolError.full(_, let requested, let largest) {
            #expect(requested == 100 * unit && largest == 15 * unit)
        }
        for tag in 1...UInt64(slotCount) { _ = try pool.allocate(byteCount: unit, tag: tag, owner: owners[0]) }
        #expect(throws: PoolError.self) { _ = try pool.allocate(byteCount: unit, tag: 99, owner: owners[0]) }
        #expect(throws: PoolError.self) { _ = try pool.allocate(byteCount: unit, tag: 1, owner: owners[0]) }
    }

    @Test func extentsNeverOverlapAndViewsStayInside() throws {
        let (pool, fam) = try makePool()
        let first = try pool.allocate(byteCount: 2 * unit, tag: 1, owner: owners[0])
        let second = try pool.allocate(byteCount: 3 * unit, tag: 2, owner: owners[0])
        #expect(first.offset + first.byteCount <= second.offset)
        let view = pool.view(of: second)
        view.store([1, 2, 3], at: 0)
        #expect(fam.loadBytes(at: second.offset, count: 3) == [1, 2, 3])
        #expect(view.byteCount == 3 * unit)
        try pool.free(first)
        let third = try pool.allocate(byteCount: unit, tag: 3, owner: owners[0])
        #expect(third.offset == first.offset, "first fit reuses the freed gap")
    }

    @Test func damagedHeaderIsRefusedAndDamagedRecordIgnored() throws {
        let (pool, fam) = try makePool()
        let taken = try pool.allocate(byteCount: unit, tag: 7, owner: owners[0])
        // A flipped bit in the slot's current record: that version fails its digest, the older (free) one stands.
        let recordOffset = 4096 + taken.slot * 128 + Int(taken.generation % 2) * 64
        var word = fam.loadBytes(at: recordOffset + 16, count: 1)
        word[0] ^= 0x10
        fam.store(word, at: recordOffset + 16)
        #expect(try FAMPool.open(backend: fam, lockPath: nil).extents().isEmpty)
        fam.store([0x02], at: 8)  // version 2
        #expect(throws: PoolError.self) { _ = try FAMPool.open(backend: fam, lockPath: nil) }
    }

    @Test func reusedProcessIDIsNotTheOwner() throws {
        let me = PoolOwner.current()
        #expect(PoolOwner.isAliveOnThisMachine(me))
        #expect(!PoolOwner.isAliveOnThisMachine(PoolOwner(processID: me.processID, startTime: me.startTime + 1, bootID: me.bootID)))
        #expect(!PoolOwner.isAliveOnThisMachine(PoolOwner(processID: me.processID, startTime: me.startTime, bootID: me.bootID ^ 1)))
    }
}
