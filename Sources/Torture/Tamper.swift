// Why this file exists: the FAM is shared, and what it holds after the source sealed it is not to be
// trusted blindly: a stray write, a failing module or another node may change a page or a mark after its
// seal. The tamperer flips one bit of a sealed page (or of its mark's digest) in what the target sees.
// Every install path must then compare the page with its mark's digest: the migration stops (the target
// is killed) rather than the program running on a wrong page, or the page was installed before the
// change and the migration ends correctly.
import Engine
import Sys

/// What the tamperer changes.
public struct TamperPlan: Sendable, Codable, Equatable {
    /// The mark's digest instead of the page's bytes.
    public var corruptsMark: Bool
}

final class TamperParticipant: Participant {
    let actor = ActorName.tamperer
    let isEssential = false
    private let plan: TamperPlan
    private let model: () -> ModelFAM?
    private var reader: ImageReader?
    private(set) var fired = false
    /// The slot changed, once fired.
    private(set) var tamperedSlot: Int?

    /// The iteration's key, only to open the image and find its marks: the tamperer never reseals a
    /// code, so what it changes is what a writer without the key could change.
    private let key: MigrationKey

    init(plan: TamperPlan, model: @escaping () -> ModelFAM?, key: MigrationKey) {
        self.key = key
        self.plan = plan
        self.model = model
    }

    /// Sealed slots as the target node sees them now (read past the FAM checker: the tamperer seeing a
    /// mark must not count as the target engine seeing it).
    private func sealedSlots() -> [Int] {
        guard let model = model(), !model.isReleased else { return [] }
        if reader == nil { reader = UncheckedFabricView.openImage(model: model, key: key) }
        guard var reader else { return [] }
        let slots = (0..<reader.pageCount).filter { reader.isMarked(slot: $0) }
        self.reader = reader
        return slots
    }

    func availability() -> Availability {
        if fired { return .finished }
        return sealedSlots().isEmpty ? .waiting(nil, "no sealed page yet") : .choices([plan.corruptsMark ? "corrupt a mark" : "corrupt a page"])
    }

    func take(_ index: Int, rng: inout SeededGenerator) throws -> String? {
        let slots = sealedSlots()
        guard let model = model(), let reader, !slots.isEmpty else { preconditionFailure("tamperer stepped with nothing sealed") }
        let slot = slots[rng.below(slots.count)]
        let byteOffset = plan.corruptsMark ? reader.layout.markOffset(slot: slot) + rng.below(8)
                                           : reader.layout.pageOffset(slot: slot) + rng.below(ImageLayout.pageSize)
        model.flipFabricBit(at: byteOffset, bit: rng.below(8))
        fired = true
        tamperedSlot = slot
        return "slot \(slot) (\(hex(reader.pageAddresses[slot])))"
    }

    func abort(reason: String) {}
}

/// The fabric as it is, read without the FAM checker seeing the reads: for the harness (the tamperer, the
/// victim watch), never for the engine. Read-only.
final class UncheckedFabricView: FAMBackend, @unchecked Sendable {
    private let model: ModelFAM
    init(model: ModelFAM) { self.model = model }

    /// The image as the target node sees it, once its metadata is committed (nil before).
    static func openImage(model: ModelFAM, key: MigrationKey) -> ImageReader? {
        let view = UncheckedFabricView(model: model)
        guard ImageReader.peekState(backend: view).map({ $0 == .metadataCommitted || $0 == .complete }) == true else { return nil }
        return try? ImageReader.open(backend: view, key: key, requireComplete: false, deferPageChecks: true)
    }
    var byteCount: Int { model.byteCount }
    var path: String? { "model FAM (fabric, unchecked)" }
    func store(_ bytes: [UInt8], at byteOffset: Int) { preconditionFailure("the unchecked fabric view is read-only") }
    func storeUInt64(_ value: UInt64, at byteOffset: Int) { preconditionFailure("the unchecked fabric view is read-only") }
    func storeFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) throws(SyscallError) -> Int {
        preconditionFailure("the unchecked fabric view is read-only")
    }
    func flush(at byteOffset: Int, count: Int) {}
    func fence() {}
    func loadBytes(at byteOffset: Int, count: Int) -> [UInt8] { model.fabricBytes(at: byteOffset, count: count) }
    func loadUInt64(at byteOffset: Int) -> UInt64 {
        model.fabricBytes(at: byteOffset, count: 8).enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
    }
    func digest(at byteOffset: Int, count: Int, seed: UInt64) -> UInt64 {
        SharedMapping.digest(of: loadBytes(at: byteOffset, count: count), seed: seed)
    }
}
