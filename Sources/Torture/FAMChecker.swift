// Why this file exists: the model FAM knows, for every cache line, which store last wrote it and whether
// that store is durable (flushed, then fenced). This checker turns that knowledge into the protocol of
// DESIGN.md §2: it names the exact store a target read depended on before it was durable, and catches a
// writer that breaks invariant 1 (dumped mark before its page is durable), 2 (commit record before the
// marks, state word before what it vouches for) or a reader that breaks 3 (page read before its mark).
// Invariant 4 (checksums) is the reader's own. Violations are collected, never thrown: the torture oracle
// reads them after the iteration and prints them with the seed.
import Engine
import Sys

/// How far the latest store to one 64-byte line has got. Visibility is separate (`ModelFAM.isPending`):
/// an early write-back makes a line's bytes visible on the fabric but never durable, because the
/// protocol may not rely on a cache evicting a line by chance.
public enum LineDurability: UInt8, Sendable, CustomStringConvertible {
    /// Flushed and then fenced after its latest store, or never stored.
    case durable
    /// Stored since the last flush of the line (the "dirty" state).
    case stored
    /// Flushed after its latest store, not yet fenced.
    case flushed

    public var description: String {
        switch self {
        case .durable: "durable"
        case .stored: "stored, not flushed"
        case .flushed: "flushed, not fenced"
        }
    }
}

/// One store the source node made, numbered from 1 in program order. A `storeFromProcess` call gives
/// one store per range it copies.
public struct FAMStore: Equatable, Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        case store, storeUInt64, storeFromProcess
    }

    public let id: Int
    public let byteOffset: Int
    public let byteCount: Int
    /// `ModelFAM.currentStep` when the store was made.
    public let step: Int
    public let kind: Kind

    public init(id: Int, byteOffset: Int, byteCount: Int, step: Int, kind: Kind) {
        self.id = id
        self.byteOffset = byteOffset
        self.byteCount = byteCount
        self.step = step
        self.kind = kind
    }

    public var byteRange: Range<Int> { byteOffset..<(byteOffset + byteCount) }

    public var description: String {
        "store #\(id) (\(kind.rawValue), bytes \(byteOffset)..<\(byteOffset + byteCount), step \(step))"
    }
}

/// One read by the target node that depends on the bytes being durable.
public struct FAMRead: Equatable, Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        case loadBytes, digest
    }

    public let kind: Kind
    public let byteOffset: Int
    public let byteCount: Int
    public let step: Int

    public init(kind: Kind, byteOffset: Int, byteCount: Int, step: Int) {
        self.kind = kind
        self.byteOffset = byteOffset
        self.byteCount = byteCount
        self.step = step
    }

    public var byteRange: Range<Int> { byteOffset..<(byteOffset + byteCount) }

    public var description: String {
        "the target's \(kind.rawValue) of bytes \(byteOffset)..<\(byteOffset + byteCount) at step \(step)"
    }
}

/// A broken rule of DESIGN.md §2, naming the stores and the read involved.
public enum FAMViolation: Equatable, Sendable, CustomStringConvertible {
    /// A dependent read covered `line`, whose latest store `store` was not durable yet (it may have been
    /// visible through an early write-back: that does not count).
    case readBeforeDurable(read: FAMRead, store: FAMStore, line: Int, lineDurability: LineDurability)
    /// Invariant 1: the tag word of `slot`'s dumped mark was stored by `mark` while `pageStore` to a line
    /// of that page slot was not durable.
    case markBeforePageDurable(slot: Int, mark: FAMStore, pageStore: FAMStore, line: Int, lineDurability: LineDurability)
    /// Invariant 2: the commit record was stored by `commitRecord` while the mark line `line`, last
    /// written by `markStore`, was not durable.
    case commitRecordBeforeMarksDurable(commitRecord: FAMStore, markStore: FAMStore, line: Int, lineDurability: LineDurability)
    /// Invariant 2: the state word was set to `state` by `stateStore` while `pendingStore` to the image
    /// part `part` (superblock, metadata, page table, marks, commit record) was not durable.
    case stateBeforeDurable(state: ImageState, stateStore: FAMStore, part: String, pendingStore: FAMStore,
                            line: Int, lineDurability: LineDurability)
    /// Invariant 3: `read` covered page slot `slot` before the target observed that slot's mark with a
    /// polling load.
    case pageReadBeforeMark(slot: Int, read: FAMRead)

    /// The step of the read or store that broke the rule (where the failure report marks it).
    public var step: Int {
        switch self {
        case .readBeforeDurable(let read, _, _, _), .pageReadBeforeMark(_, let read): read.step
        case .markBeforePageDurable(_, let mark, _, _, _): mark.step
        case .commitRecordBeforeMarksDurable(let commitRecord, _, _, _): commitRecord.step
        case .stateBeforeDurable(_, let stateStore, _, _, _, _): stateStore.step
        }
    }

    /// The invariant of DESIGN.md §2 this breaks; nil for the general rule that a dependent read needs
    /// durable bytes.
    public var invariant: Int? {
        switch self {
        case .readBeforeDurable: nil
        case .markBeforePageDurable: 1
        case .commitRecordBeforeMarksDurable, .stateBeforeDurable: 2
        case .pageReadBeforeMark: 3
        }
    }

    public var description: String {
        switch self {
        case .readBeforeDurable(let read, let store, let line, let durability):
            "read depended on \(store) before it was durable: \(read) covers line \(line), \(durability)"
        case .markBeforePageDurable(let slot, let mark, let pageStore, let line, let durability):
            "invariant 1: the dumped mark of page slot \(slot) was stored by \(mark) while \(pageStore) to that page was not durable (line \(line), \(durability))"
        case .commitRecordBeforeMarksDurable(let commitRecord, let markStore, let line, let durability):
            "invariant 2: the commit record was stored by \(commitRecord) while mark \(markStore) was not durable (line \(line), \(durability))"
        case .stateBeforeDurable(let state, let stateStore, let part, let pendingStore, let line, let durability):
            "invariant 2: state \(state) was stored by \(stateStore) while \(pendingStore) to the \(part) was not durable (line \(line), \(durability))"
        case .pageReadBeforeMark(let slot, let read):
            "invariant 3: \(read) read page slot \(slot) before the target observed that slot's mark"
        }
    }
}

/// The checker's state: what it knows of the image and which marks the target observed. It interprets
/// offsets with the layout of the writer's own superblock (the source node's view, which holds every
/// store), decoded again after any store to the superblock's fields.
final class FAMChecker {
    /// Violations kept; a reader stuck in a loop of bad reads must not fill memory. The first explains.
    static let violationLimit = 1_000

    private(set) var violations: [FAMViolation] = []
    /// Every violation found, also those past `violationLimit`.
    private(set) var violationCount = 0

    private func report(_ violation: FAMViolation) {
        violationCount += 1
        if violations.count < Self.violationLimit { violations.append(violation) }
    }

    private struct Image: Equatable {
        let generation: UInt64
        let layout: ImageLayout
        let markTag: UInt64
    }

    private enum Knowledge {
        /// The superblock changed since it was last decoded.
        case stale
        /// The writer's superblock does not decode (not written yet, or not an image): no image rules apply.
        case none
        case known(Image)
    }

    private var knowledge: Knowledge = .stale
    /// Per page slot of `lastImage`: whether the target polled its mark's tag and saw this generation's.
    private var observedMarks: [Bool] = []
    /// The image `observedMarks` belongs to; a new one (another generation) starts with no mark observed.
    private var lastImage: Image?

    /// A store touched the superblock's digested fields: decode them again when next needed.
    func superblockChanged() {
        knowledge = .stale
    }

    private func image(in model: ModelFAMCore) -> Image? {
        switch knowledge {
        case .known(let image): return image
        case .none: return nil
        case .stale: break
        }
        let snapshotByteCount = ImageLayout.superblockEncodedByteCount
        guard model.byteCount >= ImageLayout.pageSize,
              let (generation, layout) = ImageLayout.decodeIgnoringState(model.writerView.loadBytes(at: 0, count: snapshotByteCount),
                                                                         fileByteCount: model.byteCount) else {
            knowledge = .none
            return nil
        }
        let image = Image(generation: generation, layout: layout, markTag: ImageLayout.markTag(generation: generation))
        knowledge = .known(image)
        if image != lastImage {
            lastImage = image
            observedMarks = Array(repeating: false, count: layout.pageCount)
        }
        return image
    }

    // MARK: Writer side

    /// Called for each store after its bytes are in the writer's view but before its lines count as
    /// stored: the durability the rules ask about is the one at the instant of the store.
    func check(store: FAMStore, in model: ModelFAMCore) {
        guard let image = image(in: model) else { return }
        let layout = image.layout
        let range = store.byteRange

        let usedMarks = layout.marks.offset..<(layout.marks.offset + layout.marksByteCount)
        if range.overlaps(usedMarks) {
            let firstSlot = max(0, range.lowerBound - layout.marks.offset) / ImageLayout.markByteCount
            let endSlot = min(layout.pageCount, (range.upperBound - layout.marks.offset + ImageLayout.markByteCount - 1) / ImageLayout.markByteCount)
            for slot in firstSlot..<endSlot {
                let tagOffset = layout.markOffset(slot: slot) + 8
                guard range.overlaps(tagOffset..<(tagOffset + 8)) else { continue }
                guard model.writerView.loadUInt64(at: tagOffset) == image.markTag else {
                    // A cleared mark (a new image in the same file): what the target saw of it no longer counts.
                    observedMarks[slot] = false
                    continue
                }
                let page = layout.pageOffset(slot: slot)..<(layout.pageOffset(slot: slot) + ImageLayout.pageSize)
                if let line = model.firstNotDurableLine(in: page) {
                    report(.markBeforePageDurable(slot: slot, mark: store, pageStore: model.latestStore(line: line)!,
                                                             line: line, lineDurability: model.durability(line: line)))
                }
            }
        }

        let commitRecord = layout.commitRecord.offset..<(layout.commitRecord.offset + ImageLayout.commitRecordByteCount)
        if range.overlaps(commitRecord), model.writerView.loadUInt64(at: commitRecord.lowerBound) == ImageLayout.commitRecordMagic,
           let line = model.firstNotDurableLine(in: usedMarks) {
            report(.commitRecordBeforeMarksDurable(commitRecord: store, markStore: model.latestStore(line: line)!,
                                                              line: line, lineDurability: model.durability(line: line)))
        }

        let stateWord = ImageLayout.stateWordOffset..<(ImageLayout.stateWordOffset + 8)
        if range.overlaps(stateWord), let state = ImageLayout.state(fromWord: model.writerView.loadUInt64(at: stateWord.lowerBound)) {
            checkState(state, store: store, layout: layout, in: model)
        }
    }

    /// metadataCommitted vouches for superblock, metadata and page table; complete for those and for
    /// the marks and the commit record too (pages are covered by invariant 1 through their marks).
    private func checkState(_ state: ImageState, store: FAMStore, layout: ImageLayout, in model: ModelFAMCore) {
        var parts: [(name: String, bytes: Range<Int>)] = []
        switch state {
        case .creating, .aborted:
            return
        case .metadataCommitted, .complete:
            parts = [("superblock", 0..<ImageLayout.superblockEncodedByteCount),
                     ("metadata", layout.metadata.offset..<(layout.metadata.offset + layout.paddedMetadataByteCount)),
                     ("page table", layout.pageTable.offset..<(layout.pageTable.offset + layout.pageTableByteCount))]
        }
        if state == .complete {
            parts.append(("marks", layout.marks.offset..<(layout.marks.offset + layout.marksByteCount)))
            parts.append(("commit record", layout.commitRecord.offset..<(layout.commitRecord.offset + ImageLayout.commitRecordByteCount)))
        }
        for part in parts {
            guard let line = model.firstNotDurableLine(in: part.bytes) else { continue }
            report(.stateBeforeDurable(state: state, stateStore: store, part: part.name,
                                                  pendingStore: model.latestStore(line: line)!,
                                                  line: line, lineDurability: model.durability(line: line)))
            return
        }
    }

    // MARK: Reader side

    /// A polling load by the target (`loadUInt64`, or a load within one 8-byte word): may see bytes that
    /// are not durable yet. A mark's tag with this image's generation counts as observing that mark.
    func observePolledWord(at byteOffset: Int, value: UInt64, in model: ModelFAMCore) {
        guard let image = image(in: model) else { return }
        let layout = image.layout
        let relativeOffset = byteOffset - layout.marks.offset
        guard relativeOffset >= 0, relativeOffset < layout.marksByteCount,
              relativeOffset % ImageLayout.markByteCount == 8, value == image.markTag else { return }
        observedMarks[relativeOffset / ImageLayout.markByteCount] = true
    }

    /// A read that relies on the bytes being durable: each must be, and a read of the page area needs
    /// every slot it covers to have had its mark observed. One violation per rule per read (the first
    /// line or slot): the first is the one to explain.
    func check(read: FAMRead, in model: ModelFAMCore) {
        if read.byteCount == 0 { return }
        if let line = model.firstNotDurableLine(in: read.byteRange) {
            report(.readBeforeDurable(read: read, store: model.latestStore(line: line)!, line: line,
                                                 lineDurability: model.durability(line: line)))
        }
        guard let image = image(in: model) else { return }
        let pageArea = image.layout.pageArea.offset..<(image.layout.pageArea.offset + image.layout.pageCount * ImageLayout.pageSize)
        let covered = read.byteRange.clamped(to: pageArea)
        if covered.isEmpty { return }
        let firstSlot = (covered.lowerBound - pageArea.lowerBound) / ImageLayout.pageSize
        let lastSlot = (covered.upperBound - 1 - pageArea.lowerBound) / ImageLayout.pageSize
        if let slot = (firstSlot...lastSlot).first(where: { !observedMarks[$0] }) {
            report(.pageReadBeforeMark(slot: slot, read: read))
        }
    }
}
