// Issue 14 item 3: every page a target installs from FAM is checked against its mark and installed from
// one private copy, so a writer that changes the page between the check and the copy cannot slip a page
// in that no check saw. Here the target's FAM changes a byte of a page of the victim's big buffer the
// moment that page is read a second time (as if another writer on the fabric stored into it just after
// the first read). An installer that checks the page in FAM and then copies it from FAM again installs
// the changed page unchecked; one that checks and installs one copy never reads it twice. Either way
// the outcome must be one of the two honest ones: every installed page is the frozen one, or the
// migration stops on that page (target killed). Real victim, real FAM file, TCP on loopback, the
// production threaded driver, on each install path (nonlive batches, the pusher, faults only).
import Engine
import Foundation
import Logging
import Oracles
import Sys
import Testing
import Torture
@testable import Engine

/// How often each page slot of the victim's buffer was read from FAM by the target, across every backend
/// the target opened; the second read of a page finds it changed.
final class PageReadCounter: @unchecked Sendable {
    private let lock = Lock()
    private var reads: [Int: Int] = [:]
    private var changedCount = 0
    var changedPageCount: Int { lock.withLock { changedCount } }
    var readPageCount: Int { lock.withLock { reads.count } }

    /// Counts a read of `slot`; true when it is the page's second read (change it now).
    func noteRead(slot: Int) -> Bool {
        lock.withLock {
            reads[slot, default: 0] += 1
            if reads[slot] == 2 { changedCount += 1 }
            return reads[slot] == 2
        }
    }
}

/// The target's view of a real FAM file, with a writer beside it that changes a page of `changedRange`
/// right before the target reads that page for the second time.
final class SecondReadChangingFAM: ForwardingFAM, @unchecked Sendable {
    private let changedRange: Range<UInt64>
    private let counter: PageReadCounter
    private let lock = Lock()
    private var layout: ImageLayout?

    init(_ inner: RealFAM, changedRange: Range<UInt64>, counter: PageReadCounter) {
        (self.changedRange, self.counter) = (changedRange, counter)
        super.init(inner)
    }

    override func loadBytes(at byteOffset: Int, count: Int) -> [UInt8] {
        noteRead(at: byteOffset, count: count)
        return inner.loadBytes(at: byteOffset, count: count)
    }

    /// Every page of the changed range that `byteOffset..<byteOffset + count` covers is read once more.
    private func noteRead(at byteOffset: Int, count: Int) {
        lock.withLock {
            if layout == nil {
                layout = ImageLayout.decodeIgnoringState(inner.loadBytes(at: 0, count: ImageLayout.superblockEncodedByteCount),
                                                         fileByteCount: inner.byteCount)?.1
            }
            guard let layout, layout.pageCount > 0 else { return }
            let firstPage = layout.pageOffset(slot: 0)
            guard byteOffset + count > firstPage else { return }
            let first = max(0, (byteOffset - firstPage) / ImageLayout.pageSize)
            let last = min(layout.pageCount - 1, (byteOffset + count - 1 - firstPage) / ImageLayout.pageSize)
            guard first <= last else { return }
            for slot in first...last {
                let address = inner.loadUInt64(at: layout.pageTable.offset + 8 * slot)
                guard changedRange.contains(address), counter.noteRead(slot: slot) else { continue }
                var page = inner.loadBytes(at: layout.pageOffset(slot: slot), count: ImageLayout.pageSize)
                page[321] ^= 0xA5
                inner.store(page, at: layout.pageOffset(slot: slot))
            }
        }
    }
}

extension ProcessTests {
    @Suite(.serialized) struct CheckThenCopyTests {
        enum Path: String, CaseIterable, CustomTestStringConvertible {
            case nonlive, postcopyFAMWithPusher, postcopyFAMFaultsOnly
            var testDescription: String { rawValue }
            var mode: MigrationMode { self == .nonlive ? .nonlive : .postcopyFAM }
        }

        @Test(arguments: Path.allCases) func pageChangedBetweenCheckAndCopyIsNeverInstalled(path: Path) throws {
            let program = try TestPaths.testProgram("memwalk-static")
            let arguments = ["--mib", "8", "--steps", "60000", "--pause-us", "20000"]
            let scratch = try ScratchDirectory(under: "/tmp")
            defer { scratch.remove() }
            let victim = try Spawn.program(path: program, arguments: arguments, environment: [],
                                           standardOutputPath: scratch.path("migrated.out"), standardErrorPath: "/dev/null")
            defer { _ = Spawn.killAndReap(victim) }
            usleep(300_000)

            // The victim's 8 MiB buffer: its largest anonymous mapping, read from /proc before the freeze.
            let mappings = try #require(try? ProcFS.readFile("/proc/\(victim.rawValue)/maps")).split(separator: UInt8(ascii: "\n"))
            let buffer = mappings.compactMap { line -> Range<UInt64>? in
                let text = String(decoding: line, as: UTF8.self)
                let fields = text.split(separator: " ", omittingEmptySubsequences: true)
                guard fields.count == 5, fields[1].hasPrefix("rw"), let dash = fields[0].firstIndex(of: "-"),
                      let start = UInt64(fields[0][..<dash], radix: 16), let end = UInt64(fields[0][fields[0].index(after: dash)...], radix: 16)
                else { return nil }
                return start..<end
            }.max { $0.count < $1.count }
            let changedRange = try #require(buffer, "no anonymous mapping in the victim")
            try #require(changedRange.count >= 8 << 20, "the largest anonymous mapping is \(changedRange.count) bytes")

            let generation: UInt64 = 0x14C
            let famPath = "/dev/shm/fammig-check-copy-\(getpid())-\(path.rawValue).img"
            defer { _ = try? SharedMapping.remove(path: famPath) }
            let counter = PageReadCounter()
            let oracles = MigrationOracles()
            let timeline = MigrationTimeline()
            var logger = Logger(label: "check-copy")
            logger.logLevel = .critical
            let makeBackend: (Int) throws(ImageError) -> any FAMBackend = { (byteCount) throws(ImageError) in
                unlink(famPath)  // a second call replaces the estimate's file
                return try RealFAM.create(path: famPath, byteCount: byteCount, prefault: true)
            }
            let openBackend: () throws(ImageError) -> (any FAMBackend)? = { () throws(ImageError) in
                guard ProcFS.exists(famPath) else { return nil }
                return SecondReadChangingFAM(try RealFAM.open(path: famPath, writable: true), changedRange: changedRange, counter: counter)
            }
            var transports: [any Transport] = []
            defer { transports.forEach { $0.close() } }
            var sourceLink: (any Transport)?, targetLink: (any Transport)?
            if path.mode.isPostcopy {
                let listener = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
                defer { listener.close() }
                let targetSide = try TCPTransport.connect(to: listener.endpoint, timeoutMilliseconds: 5000)
                transports.append(targetSide)
                let sourceSide = try #require(try TCPTransport.accept(on: listener, timeoutMilliseconds: 5000))
                transports.append(sourceSide)
                let channel = try SecureChannel.establishBoth(source: sourceSide, target: targetSide, key: testKey,
                                                              agreement: ChannelAgreement(mode: path.mode, generation: generation))
                (sourceLink, targetLink) = (channel.source, channel.target)
                oracles.expectLazyPages()
            }
            let plan = MigrationPlan(mode: path.mode, push: path == .postcopyFAMWithPusher, generation: generation, key: testKey, batchPageCount: 64)
            try requireVictimAlive(victim)
            let sourceNode = try Migration.source(plan, victim: victim, ports: SourcePorts(
                makeBackend: makeBackend, transport: sourceLink, observer: oracles, clock: MonotonicClock(), timeline: timeline, logger: logger))
            let targetNode = try Migration.target(plan, ports: TargetPorts(
                openBackend: openBackend, transport: targetLink, stubPath: try TestPaths.fammig(), observer: oracles, clock: MonotonicClock(),
                timeline: timeline, logger: logger, processIDWait: .seconds(60), imageWait: .seconds(30)))

            var failure = ""
            do {
                try ThreadedDriver(logger: logger, deadline: .seconds(60)).run(sourceNode.actors + targetNode.actors)
            } catch {
                failure = "\(error)"
            }
            #expect(counter.readPageCount > 0, "\(path): the target read no page of the victim's buffer")
            // A page read twice was changed in between: only a check of the copy that went in catches it.
            if counter.changedPageCount > 0 {
                #expect(failure.contains("mark checksum"), "\(path): \(counter.changedPageCount) pages changed between two reads, and the migration went on: '\(failure)'")
            } else {
                #expect(failure.isEmpty, "\(path): \(failure)")
            }
            // Whatever went in is the frozen page.
            for verdict in oracles.verdicts where verdict.name == "pages" {
                #expect(verdict.passed, "\(path): \(verdict.detail)")
            }
            if let restored = targetNode.restorer.restoredProcessID {
                if failure.isEmpty {
                    #expect(try Spawn.waitForExit(restored) == .exited(0), "\(path): the restored process did not end well")
                } else if targetNode.restorer.lazyMemory?.isComplete == true {
                    // Every page went in from a checked copy before another installer's second read saw the
                    // change (the pusher and the fault handler both read the run): the process is whole (the
                    // pages oracle above passed), and the fault handler lets a complete process run on.
                    _ = Spawn.killAndReap(restored)
                } else {
                    #expect(Spawn.endsSoon(restored, graceMilliseconds: 10_000), "\(path): the restored process runs on")
                    _ = Spawn.killAndReap(restored)
                }
            }
        }
    }
}
