// Why this file exists: issue 12's attacker, as a nemesis. Two of them, one per untrusted input:
// * a rogue peer on the wire between the nodes (post-copy modes): it adds a frame it made without the
//   migration key (a forged sealed frame), resends a sealed frame it saw (a replay), or sends the old
//   probe, an unsealed `complete` to the source (which once made it exit "migrated" and kill the victim);
// * a FAM writer without the key (FAM modes): it flips a bit of the header's code, the process metadata,
//   the page table or the commit record (Tamper.swift does pages and marks).
// With the attacker on, the link is sealed as two nodes seal it (SecureChannel.sealedPair). The oracle
// (Iteration): the migration either completes with every oracle passing (the restored process is exactly
// the checkpointed one: no credential, descriptor or page gained) or fails with the attack's own cause
// named; and before the commit record the victim is never lost.
import Engine
import Sys

/// What the attacker does, drawn per seed from a generator of its own.
public struct AttackPlan: Sendable, Codable, Equatable {
    public enum Kind: String, Sendable, Codable, CaseIterable {
        /// A sealed frame of random bytes (made without the key).
        case forgedFrame = "forged-frame"
        /// The last sealed frame delivered in that direction, again.
        case replayedFrame = "replayed-frame"
        /// An unsealed `complete` to the source.
        case unsealedComplete = "unsealed-complete"
        /// One bit of the header's authentication code.
        case headerCode = "header-code"
        case metadata
        case pageTable = "page-table"
        case commitRecord = "commit-record"

        public var isRoguePeer: Bool { self == .forgedFrame || self == .replayedFrame || self == .unsealedComplete }
    }
    public var kind: Kind
    /// Toward the target (else toward the source); rogue-peer kinds but `unsealedComplete`.
    public var towardTarget: Bool
    /// A rogue peer acts once the link delivered this many frames; a FAM writer waits this many steps
    /// after what it changes is there.
    public var delay: Int

    /// The kinds that fit a mode, in `Kind`'s order: rogue peers only where there is a wire between the
    /// nodes (post-copy), FAM writers only where there is an image (nonlive, postcopy-fam).
    public static func kinds(for mode: MigrationMode) -> [Kind] {
        Kind.allCases.filter { $0.isRoguePeer ? mode.isPostcopy : mode.usesFAM }
    }

    public var summary: String {
        "attack \(kind.rawValue)" + (kind == .forgedFrame || kind == .replayedFrame ? (towardTarget ? " to-target" : " to-source") : "")
            + " after \(delay)"
    }

    /// What a failure caused by this attack says: the channel's or the image's refusal, nothing else.
    public func isItsRefusal(_ error: String) -> Bool {
        if kind.isRoguePeer {
            return error.contains("does not open under this migration's channel key") || error.contains("an unsealed")
        }
        return error.contains("the image is corrupted") || error.contains("tampered metadata") || error.contains("tampered commit record")
            || error.contains("process metadata is malformed") || error.contains("cannot be restored")
    }
}

final class AttackerParticipant: Participant {
    let actor = ActorName.attacker
    let isEssential = false
    private let plan: AttackPlan
    private let link: MemoryLink?
    private let model: () -> ModelFAM?
    private let generation: UInt64
    private let key: MigrationKey
    private var layout: ImageLayout?
    private var stepsSinceReady = 0
    private(set) var fired = false
    /// The image state in the fabric when it fired (FAM kinds).
    private(set) var imageStateAtAttack: ImageState?

    /// `key` only opens the image to find where its regions lie: the attacker never computes a code.
    init(plan: AttackPlan, link: MemoryLink?, model: @escaping () -> ModelFAM?, generation: UInt64, key: MigrationKey) {
        self.plan = plan
        self.link = link
        self.model = model
        self.generation = generation
        self.key = key
    }

    private var direction: MemoryLink.Direction {
        plan.kind == .unsealedComplete ? .toSource : plan.towardTarget ? .toTarget : .toSource
    }

    private func fabricState() -> ImageState? {
        guard let model = model(), !model.isReleased else { return nil }
        return ImageReader.peekState(backend: UncheckedFabricView(model: model))
    }

    private func ready() -> Bool {
        if plan.kind.isRoguePeer {
            guard let link, link.deliveredCount >= plan.delay else { return false }
            return plan.kind != .replayedFrame || link.lastDeliveredFrame(direction) != nil
        }
        guard let state = fabricState() else { return false }
        let present = plan.kind == .commitRecord ? state == .complete : state == .metadataCommitted || state == .complete
        guard present else { return false }
        if layout == nil, let model = model() { layout = UncheckedFabricView.openImage(model: model, key: key)?.layout }
        guard layout != nil else { return false }
        // Counted once per availability, which the driver asks once per step: the same seed, the same step.
        stepsSinceReady += 1
        return stepsSinceReady > plan.delay
    }

    func availability() -> Availability {
        if fired { return .finished }
        return ready() ? .choices(["\(plan.kind.rawValue)"]) : .waiting(nil, "waiting for its moment")
    }

    func take(_ index: Int, rng: inout SeededGenerator) throws -> String? {
        precondition(!fired, "the attacker fires once")
        fired = true
        imageStateAtAttack = fabricState()
        switch plan.kind {
        case .forgedFrame:
            let bytes = (0..<(16 + 16 + rng.below(64))).map { _ in UInt8(truncatingIfNeeded: rng.below(256)) }
            link?.inject(Message.sealed(bytes: bytes).encoded(), kind: "forged sealed", direction: direction)
            return "forged a sealed frame of \(bytes.count) bytes \(direction.rawValue)"
        case .replayedFrame:
            guard let frame = link?.lastDeliveredFrame(direction) else { preconditionFailure("replay with nothing delivered") }
            link?.inject(frame, kind: "replayed", direction: direction)
            return "replayed a frame of \(frame.count) bytes \(direction.rawValue)"
        case .unsealedComplete:
            link?.inject(Message.complete(generation: generation).encoded(), kind: "unsealed complete", direction: .toSource)
            return "sent an unsealed complete to the source"
        case .headerCode, .metadata, .pageTable, .commitRecord:
            guard let model = model(), let layout else { preconditionFailure("FAM attack without an image") }
            let byteOffset: Int
            switch plan.kind {
            case .headerCode: byteOffset = ImageLayout.headerCodeOffset + rng.below(ImageLayout.codeByteCount)
            case .metadata: byteOffset = layout.metadata.offset + rng.below(max(1, layout.metadataByteCount))
            case .pageTable: byteOffset = layout.pageTable.offset + rng.below(max(1, 8 * layout.pageCount))
            default: byteOffset = layout.commitRecord.offset + rng.below(ImageLayout.commitRecordByteCount)
            }
            model.flipFabricBit(at: byteOffset, bit: rng.below(8))
            return "flipped a bit at byte \(byteOffset) (\(plan.kind.rawValue))"
        }
    }

    func abort(reason: String) {}
}
