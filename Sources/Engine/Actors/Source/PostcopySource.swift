// Why this file exists: what the source strategies of both post-copy modes share (Migration/Modes): which
// pages a post-copy target needs before it resumes (dumped or sent first), and the link to the target
// with the page requests that come over it (PostcopySource).
import Logging
import Sys

extension Dumper {
    /// Runs of slots a post-copy target installs before it resumes (LazyMemory's rule, seen from the
    /// source): pages outside the memory it registers lazily (private file pages, which userfaultfd
    /// cannot register on ext4), memfd pages, and the rseq areas the kernel writes at registration. A
    /// hint: the target still asks for any such page that is not marked when it looks.
    /// A tree's: every process's, tagged with its ordinal as its page addresses are.
    static func slotsNeededBeforeResume(_ state: ProcessState, pageAddresses: [UInt64]) -> [Range<Int>] {
        var ranges: [Range<UInt64>] = []
        for (ordinal, process) in state.liveProcesses {
            func add(_ range: Range<UInt64>) {
                ranges.append(TreePageAddress.tagged(range.lowerBound, ordinal: ordinal)..<TreePageAddress.tagged(range.upperBound, ordinal: ordinal))
            }
            for mapping in process.mappings {
                switch mapping.kind {
                case .anonymous where !mapping.shared, .heap where !mapping.shared, .stack where !mapping.shared: continue
                case .sharedMemory(let object) where object.memfdName == nil: continue
                default: add(mapping.start..<mapping.end)
                }
            }
            for rseq in process.threads.compactMap(\.rseq) {
                let firstPage = rseq.address & ~UInt64(ImageLayout.pageSize - 1)
                add(firstPage..<((rseq.address + UInt64(max(rseq.byteCount, 1)) + UInt64(ImageLayout.pageSize) - 1) & ~UInt64(ImageLayout.pageSize - 1)))
            }
        }
        var runs: [Range<Int>] = []
        for range in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) {
            // pageAddresses is sorted: the slots of a range are one run.
            let first = firstSlot(notBelow: range.lowerBound, in: pageAddresses)
            let end = firstSlot(notBelow: range.upperBound, in: pageAddresses)
            guard first < end else { continue }
            if let last = runs.last, last.upperBound >= first {
                runs[runs.count - 1] = last.lowerBound..<max(last.upperBound, end)
            } else {
                runs.append(first..<end)
            }
        }
        return runs
    }
}

/// The source side of both post-copy modes: the link to the target and the requests that come over it.
/// postcopy-socket also counts what it sent and what the target acknowledged (its push window).
class PostcopySource {
    let link: any Transport
    /// Slots the target asked for, served before the background order.
    var prioritySlots: [Int] = []
    /// The background order's next candidate slot.
    var backgroundCursor = 0
    /// The target said it needs nothing more.
    var targetDone = false
    /// `complete`s the target sent: the first says it needs nothing more, the second that it holds the
    /// process (its watchdog disarmed).
    var targetCompleteCount = 0
    /// The link ended after the target's first `complete` (an end before it is an error at once), and how.
    var linkEnded = false
    var linkEnding: TransportError?
    /// When the target was last heard from (any frame): a postcopy-socket source waiting on it gives up
    /// after the stall timeout.
    var lastHeard: Duration = .zero
    /// postcopy-socket flow: bytes of `pages` sent, and how many of them the target says it took in.
    var sentPageByteCount: UInt64 = 0
    var acknowledgedPageByteCount: UInt64 = 0

    init(transport: any Transport) { link = transport }

    var transport: (any Transport)? { link }
    var usesFAM: Bool { true }
    /// A tree's pages are each read from its own process (Dumper.splitByProcess).
    var migratesTrees: Bool { true }
    var pipelinesCopies: Bool { false }

    /// How the requests that arrived in one step change the push chunk (postcopy-socket only).
    func requestsTaken(requestArrived: Bool, acknowledgementAdvanced: Bool, batchPageCount: Int) {}

    /// At most this many frames are taken off the transport per step, so a peer that floods requests
    /// cannot keep the dumper from its own work; the rest wait for the next step.
    static let maximumFramesPerStep = 1 << 12

    /// Takes the target's page requests off the transport (without waiting).
    func receiveRequests(_ dumper: Dumper) throws(EngineError) {
        var requestArrived = false
        var acknowledgementAdvanced = false
        defer { requestsTaken(requestArrived: requestArrived, acknowledgementAdvanced: acknowledgementAdvanced, batchPageCount: dumper.batchPageCount) }
        for _ in 0..<Self.maximumFramesPerStep {
            let message: Message?
            do { message = try link.receive() } catch {
                if targetDone { linkEnded = true; linkEnding = error; return }
                // A frame that does not open is not the target's end: someone else is on the wire.
                if case .malformed = error { throw .aborted("the channel from the target was refused (\(error))") }
                throw .aborted("the target node went away: \(error)")
            }
            guard let message else { return }
            lastHeard = dumper.clock.now()
            switch message {
            case .pageRequest(let address):
                dumper.logger.trace("request arrived", metadata: ["address": "\(hex(address))", "us": "\(nanoseconds(dumper.clock.now()) / 1000)"])
                guard let slot = slotIndex(of: address, in: dumper.pageAddresses) else {
                    throw .aborted("the target asked for page \(hex(address)), which the victim never touched")
                }
                prioritySlots.append(slot)
                requestArrived = true
            case .received(let pageByteCount):
                guard pageByteCount <= sentPageByteCount else {
                    throw .aborted("the target acknowledged \(pageByteCount) bytes of pages, more than the \(sentPageByteCount) sent")
                }
                if pageByteCount > acknowledgedPageByteCount { acknowledgementAdvanced = true }
                acknowledgedPageByteCount = max(acknowledgedPageByteCount, pageByteCount)
            case .complete:
                targetDone = true
                targetCompleteCount += 1
            case .abort(let reason):
                throw .aborted("the target aborted: \(reason)")
            default:
                dumper.logger.debug("dumper ignores \(message)")
            }
        }
    }
}
