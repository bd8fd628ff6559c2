// Issue 12 item 1 (rest): each dumped mark holds its page's keyed code (HMAC-SHA256 under a sub-key of
// the migration key, bound to generation, address and the header code), so someone who can write FAM
// but does not hold the key cannot rewrite a page and make its mark vouch for it, not even before the
// commit record exists. Here a real migration (real victim, real FAM file, TCP on loopback, the
// production threaded driver) runs with a FAM writer that, as each mark is stored, rewrites that page of
// the victim's big buffer and recomputes its mark the way an unkeyed checksum is recomputed. Every
// install path must refuse it: nonlive (the restorer's batches), postcopy-fam with the pusher, and
// postcopy-fam with faults only; no forged page is ever installed, and no restored process runs on.
import Engine
import Foundation
import Logging
import Oracles
import Sys
import Testing
@testable import Engine

/// A FAM writer without the key, beside the source: whenever the source stores a mark of a page in
/// `forgedRange`, it changes one byte of that page and stores the page's unkeyed digest in the mark.
final class ForgingFAM: FAMBackend, @unchecked Sendable {
    private let inner: RealFAM
    private let generation: UInt64
    private let forgedRange: () -> Range<UInt64>?
    private let lock = Lock()
    private var forgedCount = 0
    var forgedPageCount: Int { lock.withLock { forgedCount } }

    init(_ inner: RealFAM, generation: UInt64, forgedRange: @escaping () -> Range<UInt64>?) {
        (self.inner, self.generation, self.forgedRange) = (inner, generation, forgedRange)
    }

    var byteCount: Int { inner.byteCount }
    var path: String? { inner.path }
    func store(_ bytes: [UInt8], at byteOffset: Int) { inner.store(bytes, at: byteOffset) }
    func storeFromProcess(processID: ProcessID, ranges: [ProcessReadRange]) throws(SyscallError) -> Int {
        try inner.storeFromProcess(processID: processID, ranges: ranges)
    }
    func flush(at byteOffset: Int, count: Int) { inner.flush(at: byteOffset, count: count) }
    func fence() { inner.fence() }
    func loadBytes(at byteOffset: Int, count: Int) -> [UInt8] { inner.loadBytes(at: byteOffset, count: count) }
    func loadUInt64(at byteOffset: Int) -> UInt64 { inner.loadUInt64(at: byteOffset) }
    func digest(at byteOffset: Int, count: Int, seed: UInt64) -> UInt64 { inner.digest(at: byteOffset, count: count, seed: seed) }

    func storeUInt64(_ value: UInt64, at byteOffset: Int) {
        inner.storeUInt64(value, at: byteOffset)
        guard value == ImageLayout.markTag(generation: generation),
              let (_, layout) = ImageLayout.decodeIgnoringState(inner.loadBytes(at: 0, count: ImageLayout.superblockEncodedByteCount),
                                                                fileByteCount: inner.byteCount),
              byteOffset >= layout.marks.offset + 8, byteOffset < layout.marks.offset + layout.marksByteCount,
              let range = forgedRange() else { return }
        let slot = (byteOffset - 8 - layout.marks.offset) / ImageLayout.markByteCount
        let address = inner.loadUInt64(at: layout.pageTable.offset + 8 * slot)
        guard range.contains(address) else { return }
        var page = inner.loadBytes(at: layout.pageOffset(slot: slot), count: ImageLayout.pageSize)
        page[123] ^= 0x5A
        inner.store(page, at: layout.pageOffset(slot: slot))
        inner.storeUInt64(SharedMapping.digest(of: page, seed: ImageDigestSeed.page(generation: generation, address: address)),
                          at: layout.markOffset(slot: slot))
        lock.withLock { forgedCount += 1 }
    }
}

extension ProcessTests {
    @Suite(.serialized) struct PageCodeTests {
        enum Path: String, CaseIterable, CustomTestStringConvertible {
            case nonlive, postcopyFAMWithPusher, postcopyFAMFaultsOnly
            var testDescription: String { rawValue }
            var mode: MigrationMode { self == .nonlive ? .nonlive : .postcopyFAM }
        }

        @Test(arguments: Path.allCases) func pageRewrittenWithoutTheKeyIsRefusedOnEveryInstallPath(path: Path) throws {
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
            let forged = try #require(buffer, "no anonymous mapping in the victim")
            try #require(forged.count >= 8 << 20, "the largest anonymous mapping is \(forged.count) bytes")

            let generation: UInt64 = 0x1C3
            let famPath = "/dev/shm/fammig-forge-\(getpid())-\(path.rawValue).img"
            defer { _ = try? SharedMapping.remove(path: famPath) }
            let forger = Box<ForgingFAM>()
            let oracles = MigrationOracles()
            let timeline = MigrationTimeline()
            var logger = Logger(label: "forge")
            logger.logLevel = .critical
            let makeBackend: (Int) throws(ImageError) -> any FAMBackend = { (byteCount) throws(ImageError) in
                unlink(famPath)  // a second call replaces the estimate's file
                let fam = ForgingFAM(try RealFAM.create(path: famPath, byteCount: byteCount, prefault: true), generation: generation) { forged }
                forger.value = fam
                return fam
            }
            let openBackend: () throws(ImageError) -> (any FAMBackend)? = { () throws(ImageError) in
                guard ProcFS.exists(famPath) else { return nil }
                return try RealFAM.open(path: famPath, writable: false)
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
            #expect((forger.value?.forgedPageCount ?? 0) > 0, "the forger changed no page")
            #expect(failure.contains("mark checksum"), "\(path): the migration did not stop on a forged page: '\(failure)'")
            // Each path names itself: the restorer's batch check, the pusher, the fault handler (with
            // the pusher on, a fault may reach a forged page first: either path is an install path).
            switch path {
            case .nonlive: #expect(!failure.contains("aborted:"), "\(failure)")
            case .postcopyFAMWithPusher: #expect(failure.contains("pusher installing") || failure.contains("fault handler"), "\(failure)")
            case .postcopyFAMFaultsOnly: #expect(failure.contains("fault handler"), "\(failure)")
            }
            // No forged page went in: every page installed matched the freeze digest.
            for verdict in oracles.verdicts where verdict.name == "pages" {
                #expect(verdict.passed, "\(path): \(verdict.detail)")
            }
            if let restored = targetNode.restorer.restoredProcessID {
                #expect(Spawn.endsSoon(restored, graceMilliseconds: 10_000), "\(path): the restored process runs on")
                let status = Spawn.killAndReap(restored)
                #expect(status != .exited(0), "\(path): the restored process ended as if nothing happened")
            }
        }
    }
}

/// A value set from inside an escaping closure.
final class Box<Value>: @unchecked Sendable {
    var value: Value?
}
