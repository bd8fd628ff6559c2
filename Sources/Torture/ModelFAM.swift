// Why this file exists: torture runs the real engine on a FAM that behaves like the hardware at its
// worst (DESIGN.md §2, x86 persistency). One `ModelFAM` is the FAM pool of one migration; its source
// node view is the dumper's backend, its target node view the restorer's. A store lands in the source
// node's modelled cache; only a flush followed by a fence guarantees it reaches the fabric the target
// sees; the scheduler may write any pending line back early (`writeBack(line:)`), and a crash lets each
// pending line through or not, by seed. Every store is logged and the checker (FAMChecker.swift) names
// the store a target read depended on before it was durable, and each broken protocol invariant.
//
// Durable means: flushed and then fenced after the line's latest store. An early write-back (or a lucky
// line at a crash) makes bytes visible, never durable: a reader that relied on it got lucky, and the
// checker says so. The target's polling loads (`loadUInt64`, and a `loadBytes` within one 8-byte word)
// may see any visible value; its `loadBytes` and `digest` are dependent reads.
//
// Both files behind the mappings are removed as soon as they are mapped, so no model can leak a file;
// `release()` (or the last reference going away) unmaps them, and a `ModelFAMLedger` counts the models
// still mapped so the "no harm" oracle can require none at the end of an iteration.
import Engine
import Synchronization
import Sys

/// The FAM pool of one migration under torture. Driven from one thread.
public final class ModelFAM: @unchecked Sendable {
    public static let lineByteCount = ModelFAMCore.lineByteCount

    /// The writer: the dumper's backend. Its loads and digests see its own stores at once.
    public let sourceNode: ModelFAMNode
    /// The reader: the restorer's backend. It sees the fabric.
    public let targetNode: ModelFAMNode
    private let core: ModelFAMCore

    /// Maps a writer view and a fabric of `byteCount` bytes each (both zero) from two files under
    /// `directory`, removed at once. `ledger` counts this model until it is released.
    public init(byteCount: Int, directory: String = "/dev/shm", ledger: ModelFAMLedger? = nil) throws(SyscallError) {
        precondition(byteCount > 0, "a model FAM needs at least one byte, asked for \(byteCount)")
        // The address of a live object is unique in this process, and the PID across processes.
        let token = NameToken()
        let prefix = withExtendedLifetime(token) {
            "\(directory)/fammig-model-\(ProcessID.current)-\(String(UInt(bitPattern: ObjectIdentifier(token)), radix: 16))"
        }
        let writerView = try Self.mapWithoutFile(path: prefix + "-writer", byteCount: byteCount)
        let fabric = try Self.mapWithoutFile(path: prefix + "-fabric", byteCount: byteCount)
        withExtendedLifetime(token) {}
        core = ModelFAMCore(writerView: writerView, fabric: fabric, ledger: ledger)
        sourceNode = ModelFAMNode(core: core, side: .source)
        targetNode = ModelFAMNode(core: core, side: .target)
    }

    private final class NameToken {}

    private static func mapWithoutFile(path: String, byteCount: Int) throws(SyscallError) -> SharedMapping {
        let mapping: SharedMapping
        do throws(SyscallError) {
            mapping = try SharedMapping.create(path: path, byteCount: byteCount, prefault: false)
        } catch {
            // The name holds our PID and a live object's address: a file of that name is a leftover of
            // a dead process that had our PID, so it is ours to remove.
            guard error.errno == .fileExists else { throw error }
            try SharedMapping.remove(path: path)
            mapping = try SharedMapping.create(path: path, byteCount: byteCount, prefault: false)
        }
        try SharedMapping.remove(path: path)
        return mapping
    }

    public var byteCount: Int { core.byteCount }
    public var lineCount: Int { core.lineCount }

    /// The line holding byte `byteOffset`.
    public static func line(containing byteOffset: Int) -> Int { byteOffset / lineByteCount }

    /// The scheduler's step, stamped on every store and read the checker reports.
    public var currentStep: Int {
        get { core.currentStep }
        set { core.currentStep = newValue }
    }

    // MARK: The cache and the fabric

    /// Lines whose latest stored bytes may not have reached the fabric yet (stored or flushed, not
    /// fenced, not written back), in increasing order.
    public var pendingLines: [Int] { core.pendingLines }
    public var pendingLineCount: Int { core.pendingLineCount }
    public func isPending(line: Int) -> Bool { core.isPending(line: line) }
    public func durability(line: Int) -> LineDurability { core.durability(line: line) }

    /// The fabric's step: the cache writes `line` (one of `pendingLines`) back on its own. Its bytes
    /// become visible to the target; it is not durable unless it is flushed and fenced too.
    public func writeBack(line: Int) { core.writeBack(line: line) }

    /// The source node dies: every pending line independently reaches the fabric or is lost, one
    /// `Bool.random(using:)` per line in increasing line order, so one generator state gives one
    /// outcome. Afterwards the source node's view is dead: any use of it is a precondition failure (the
    /// deterministic driver never steps the dumper again). Returns the lines that reached the fabric.
    @discardableResult
    public func crash(using random: inout some RandomNumberGenerator) -> [Int] { core.crash(using: &random) }
    public var isCrashed: Bool { core.isCrashed }

    /// Bytes as the fabric holds them, without any check (for tests and oracles, not the engine).
    public func fabricBytes(at byteOffset: Int, count: Int) -> [UInt8] {
        precondition(!core.isReleased, "model FAM used after release()")
        return core.fabric.loadBytes(at: byteOffset, count: count)
    }

    /// Flips one bit of the fabric's copy, outside every store (the tamperer: FAM changed after a seal).
    public func flipFabricBit(at byteOffset: Int, bit: Int) {
        precondition(!core.isReleased, "model FAM used after release()")
        precondition((0..<8).contains(bit), "a byte has bits 0...7")
        var byte = core.fabric.loadBytes(at: byteOffset, count: 1)
        byte[0] ^= UInt8(1) << UInt8(bit)
        core.fabric.store(bytes: byte, at: byteOffset)
    }

    /// Bytes as the source node's cache and memory hold them (every store so far).
    public func writerBytes(at byteOffset: Int, count: Int) -> [UInt8] {
        precondition(!core.isReleased, "model FAM used after release()")
        return core.writerView.loadBytes(at: byteOffset, count: count)
    }

    // MARK: The store log and the checker

    /// Every store so far, `stores[id - 1]` being store #id.
    public var stores: [FAMStore] { core.stores }
    /// The store that last wrote `line`, nil if none did.
    public func latestStore(line: Int) -> FAMStore? { core.latestStore(line: line) }
    /// The broken rules found so far, in the order found (the first 1,000).
    public var violations: [FAMViolation] { core.checker.violations }
    /// How many were found, also past those kept in `violations`.
    public var violationCount: Int { core.checker.violationCount }

    // MARK: Lifetime

    /// Unmaps both views. Using either node afterwards is a precondition failure; `stores` and
    /// `violations` stay readable. Releasing twice does nothing more.
    public func release() { core.release() }
    public var isReleased: Bool { core.isReleased }
}

/// One node's view of a `ModelFAM`, given to the engine as its `FAMBackend`.
public final class ModelFAMNode: FAMBackend, @unchecked Sendable {
    public enum Side: Sendable, CustomStringConvertible {
        case source, target

        public var description: String {
            switch self {
            case .source: "source node"
            case .target: "target node"
            }
        }
    }

    public let side: Side
    private let core: ModelFAMCore

    init(core: ModelFAMCore, side: Side) {
        self.core = core
        self.side = side
    }

    public var byteCount: Int { core.byteCount }
    /// Not a file: the engine uses `path` only in messages.
    public var path: String? { "model FAM (\(side))" }

    // MARK: Writer side

    private func checkSource(_ operation: String) {
        precondition(side == .source, "\(operation) on the target node's view of the model FAM: the target never writes FAM")
    }

    public func store(_ bytes: [UInt8], at byteOffset: Int) {
        checkSource("store")
        core.recordStores(kind: .store, ranges: [byteOffset..<(byteOffset + bytes.count)]) { () throws(Never) in
            core.writerView.store(bytes: bytes, at: byteOffset)
        }
    }

    public func storeUInt64(_ value: UInt64, at byteOffset: Int) {
        checkSource("storeUInt64")
        core.recordStores(kind: .storeUInt64, ranges: [byteOffset..<(byteOffset + 8)]) { () throws(Never) in
            core.writerView.storeUInt64(value, at: byteOffset)
        }
    }

    @discardableResult
    public func storeFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) throws(SyscallError) -> Int {
        checkSource("storeFromProcess")
        var copiedByteCount = 0
        let byteRanges = ranges.map { $0.mappingOffset..<($0.mappingOffset + $0.byteCount) }
        try core.recordStores(kind: .storeFromProcess, ranges: byteRanges) { () throws(SyscallError) in
            copiedByteCount = try core.writerView.readFromProcess(processID: processID, ranges: ranges)
        }
        return copiedByteCount
    }

    /// On the target node a flush has nothing to write back: it never stores.
    public func flush(at byteOffset: Int, count: Int) {
        guard side == .source else { return }
        core.flush(byteRange: byteOffset..<(byteOffset + count))
    }

    /// On the target node a fence orders nothing: it never stores.
    public func fence() {
        guard side == .source else { return }
        core.fence()
    }

    // MARK: Reader side

    public func loadBytes(at byteOffset: Int, count: Int) -> [UInt8] {
        switch side {
        case .source:
            return core.sourceRead().loadBytes(at: byteOffset, count: count)
        case .target:
            if ModelFAMCore.isPollingLoad(byteOffset: byteOffset, count: count) {
                return core.targetPolledBytes(at: byteOffset, count: count)
            }
            return core.targetDependentRead(.loadBytes, byteRange: byteOffset..<(byteOffset + count)).loadBytes(at: byteOffset, count: count)
        }
    }

    public func loadUInt64(at byteOffset: Int) -> UInt64 {
        switch side {
        case .source: core.sourceRead().loadUInt64(at: byteOffset)
        case .target: core.targetPolledWord(at: byteOffset)
        }
    }

    public func digest(at byteOffset: Int, count: Int, seed: UInt64) -> UInt64 {
        switch side {
        case .source:
            core.sourceRead().digest(at: byteOffset, count: count, seed: seed)
        case .target:
            core.targetDependentRead(.digest, byteRange: byteOffset..<(byteOffset + count)).digest(at: byteOffset, count: count, seed: seed)
        }
    }
}

/// Counts the model FAMs still mapped, so the "no harm" oracle can require none left at the end of an
/// iteration. One per torture run (or test); never global.
public final class ModelFAMLedger: Sendable {
    private struct Counts {
        var created = 0
        var released = 0
    }

    private let counts = Mutex(Counts())

    public init() {}

    /// Models created with this ledger and not yet released (nor deallocated).
    public var liveModelCount: Int { counts.withLock { $0.created - $0.released } }
    public var createdModelCount: Int { counts.withLock { $0.created } }

    func modelCreated() { counts.withLock { $0.created += 1 } }
    func modelReleased() { counts.withLock { $0.released += 1 } }
}
