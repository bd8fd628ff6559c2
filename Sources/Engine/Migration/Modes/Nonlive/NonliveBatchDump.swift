// nonlive's source strategy: the whole dump while the victim is frozen, batch by batch.
import Sys

/// nonlive: every page into FAM in batches while the victim is frozen, each copied in one step and
/// sealed in the next, the next batch read from the victim while this one is sealed.
final class NonliveBatchDump: SourcePageStrategy {
    var usesFAM: Bool { true }
    var migratesTrees: Bool { true }
    var pipelinesCopies: Bool { true }
    var transport: (any Transport)? { nil }

    func writeMetadata(_ dumper: Dumper, state: ProcessState, metadata: [UInt8]) throws(EngineError) {
        try dumper.createImage(metadata: metadata) { _ throws(SyscallError) in }
    }

    func waitingWhileDumping(_ dumper: Dumper) -> NextAction? { nil }

    func dump(_ dumper: Dumper, nextSlot: Int) throws(EngineError) -> DumpProgress {
        try dumper.copy(nextSlot..<min(nextSlot + dumper.batchPageCount, dumper.pageAddresses.count))
        return .stay
    }

    func sealed(_ dumper: Dumper, slots: Range<Int>) -> DumpProgress {
        slots.upperBound == dumper.pageAddresses.count ? .done : .next(slots.upperBound)
    }
}
