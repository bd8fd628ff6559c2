// The fault handler lets the userfaultfd go once every dumped page is in. Closing our descriptor only
// releases the userfaultfd when no other copy is open, and until the release the process's registered
// mappings still send their faults and memory events to a userfaultfd no one reads: the process blocks
// for good (a copy held elsewhere: a debugger's pidfd_getfd, a child that inherited it). And while the
// release runs, Linux 6.18 retries a fault on a registered page inside the kernel without sleeping: a
// restored heapchurn spun for over 100 s that way (soft lockup) when the releasing process could not
// get its CPU. Both end when every mapping is unregistered before the userfaultfd is let go; this holds
// a copy of it through a real postcopy-fam migration of heapchurn (whose malloc_trim drops heap pages
// that it touches again after the release) and checks that nothing stays registered and that the
// process runs to its end.
import Engine
import Foundation
import Logging
import Oracles
import Sys
import Testing
@testable import Engine

extension ProcessTests {
    @Suite(.serialized) struct ReleaseTests {
        /// Takes copies of the target's userfaultfds as soon as its lazy memory exists.
        final class CopyTaker: @unchecked Sendable {
            let lock = NSLock()
            var copies: [Userfaultfd] = []
            var stopped = false
            let restorer: Restorer
            init(_ restorer: Restorer) { self.restorer = restorer }
            func take() {
                while true {  // bounded by `stop()`, which the test calls when the migration returned
                    lock.lock(); let done = stopped || !copies.isEmpty; lock.unlock()
                    if done { return }
                    if let memory = restorer.lazyMemory {
                        let taken = (try? memory.userfaultfd.copies()) ?? []
                        lock.lock(); copies = taken; lock.unlock()
                        return
                    }
                    usleep(200)
                }
            }
            func stop() { lock.lock(); stopped = true; lock.unlock() }
            func closeAll() { lock.lock(); copies.forEach { $0.close() }; copies = []; lock.unlock() }
        }

        /// The event half, without a migration: a thread whose MADV_DONTNEED met a registered range waits
        /// until its event is read or the userfaultfd released. With a copy held elsewhere, the
        /// unregistration alone leaves it waiting (heapchurn blocked that way in a fresh-clone CI run);
        /// completeQueuedEvents reads the event, and the thread goes on.
        @Test func anEventQueuedBeforeTheUnregistrationIsCompletedWhileACopyIsHeldElsewhere() throws {
            let userfaultfd = try Userfaultfd.ofThisProcess()
            defer { userfaultfd.close() }
            try userfaultfd.handshake(features: Userfaultfd.restoreFeatures)
            let region = try PrivateRegion(pageCount: 16)
            defer { region.unmap() }
            try userfaultfd.registerMissing(start: region.start, byteCount: UInt64(region.byteCount))
            let copy = try userfaultfd.copy()
            defer { copy.close() }

            let dropper = Dropper(region)
            let thread = Thread { dropper.drop() }
            thread.start()
            let processID = ProcessID(getpid())
            var waiting = false
            for _ in 0..<5000 where !waiting {  // at most 5 s for the thread to meet the registered range
                if let threadID = dropper.threadID { waiting = ProcFS.threadWait(processID, thread: threadID) == .userfault }
                if !waiting { usleep(1000) }
            }
            try #require(waiting, "madvise did not wait for its event to be read")
            try userfaultfd.unregister(start: region.start, byteCount: UInt64(region.byteCount))
            usleep(100_000)
            #expect(!dropper.isDone, "the unregistration alone completed the event (then this test shows nothing)")
            #expect(userfaultfd.hasEventInFlight(), "the kernel does not count the waiting event as in flight")

            TreeUserfaultfd(userfaultfd).completeQueuedEvents()
            var done = false
            for _ in 0..<5000 where !done { done = dropper.isDone; if !done { usleep(1000) } }
            #expect(done, "madvise still waits for its event after completeQueuedEvents")
            #expect(!userfaultfd.hasEventInFlight(), "an event counted in flight once completed")
            if !done { copy.close(); userfaultfd.close() }  // the release completes it
            while !dropper.isDone { usleep(1000) }  // bounded: released or read, the event is completed
        }

        /// Drops a region's pages with MADV_DONTNEED on its own thread.
        final class Dropper: @unchecked Sendable {
            let lock = NSLock()
            let region: PrivateRegion
            private var tid: ProcessID?
            private var done = false
            init(_ region: PrivateRegion) { self.region = region }
            var threadID: ProcessID? { lock.withLock { tid } }
            var isDone: Bool { lock.withLock { done } }
            func drop() {
                lock.withLock { tid = Spawn.currentThreadID() }
                region.dropPages()
                lock.withLock { done = true }
            }
        }

        /// Each thread's state and wait channel, said when the process is blocked.
        static func threadWaits(_ processID: ProcessID) -> String {
            let threads = (try? ProcFS.threadIDs(processID)) ?? []
            return threads.map { thread in
                let wchan = (try? String(contentsOfFile: "/proc/\(processID.rawValue)/task/\(thread.rawValue)/wchan", encoding: .utf8)) ?? "?"
                return "thread \(thread.rawValue): \(ProcFS.threadWait(processID, thread: thread)) in \(wchan)"
            }.joined(separator: "; ")
        }

        @Test func aCopyOfTheUserfaultfdHeldElsewhereLeavesNothingRegisteredAfterTheRelease() throws {
            let program = try TestPaths.testProgram("heapchurn-static")
            let scratch = try ScratchDirectory(under: "/tmp")
            defer { scratch.remove() }
            let victim = try Spawn.program(path: program, arguments: ["--rounds", "1000", "--pause-us", "3000"], environment: [],
                                           standardOutputPath: scratch.path("migrated.out"), standardErrorPath: "/dev/null")
            defer { _ = Spawn.killAndReap(victim) }
            usleep(200_000)

            let generation: UInt64 = 0x14D
            let famPath = "/dev/shm/fammig-release-\(getpid()).img"
            defer { _ = try? SharedMapping.remove(path: famPath) }
            let oracles = MigrationOracles()
            oracles.expectLazyPages()
            let timeline = MigrationTimeline()
            var logger = Logger(label: "release")
            logger.logLevel = .critical
            let makeBackend: (Int) throws(ImageError) -> any FAMBackend = { (byteCount) throws(ImageError) in
                unlink(famPath)
                return try RealFAM.create(path: famPath, byteCount: byteCount, prefault: true)
            }
            let openBackend: () throws(ImageError) -> (any FAMBackend)? = { () throws(ImageError) in
                guard ProcFS.exists(famPath) else { return nil }
                return try RealFAM.open(path: famPath, writable: true)
            }
            let listener = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
            let targetSide = try TCPTransport.connect(to: listener.endpoint, timeoutMilliseconds: 5000)
            defer { targetSide.close() }
            let sourceSide = try #require(try TCPTransport.accept(on: listener, timeoutMilliseconds: 5000))
            defer { sourceSide.close() }
            listener.close()
            let channel = try SecureChannel.establishBoth(source: sourceSide, target: targetSide, key: testKey,
                                                          agreement: ChannelAgreement(mode: .postcopyFAM, generation: generation))
            let plan = MigrationPlan(mode: .postcopyFAM, push: true, generation: generation, key: testKey, batchPageCount: 64)
            try requireVictimAlive(victim)
            let sourceNode = try Migration.source(plan, victim: victim, ports: SourcePorts(
                makeBackend: makeBackend, transport: channel.source, observer: oracles, clock: MonotonicClock(), timeline: timeline, logger: logger))
            let targetNode = try Migration.target(plan, ports: TargetPorts(
                openBackend: openBackend, transport: channel.target, stubPath: try TestPaths.fammig(), observer: oracles, clock: MonotonicClock(),
                timeline: timeline, logger: logger, processIDWait: .seconds(60), imageWait: .seconds(30)))

            let taker = CopyTaker(targetNode.restorer)
            let thread = Thread { taker.take() }
            thread.start()
            defer { taker.closeAll() }
            try ThreadedDriver(logger: logger, deadline: .seconds(60)).run(sourceNode.actors + targetNode.actors)
            taker.stop()
            while !thread.isFinished { usleep(1000) }  // bounded: take() returns once stopped
            try #require(!taker.copies.isEmpty, "no copy of the userfaultfd was taken before the release")
            let restored = try #require(targetNode.restorer.restoredProcessID)
            defer { _ = Spawn.killAndReap(restored) }
            #expect(targetNode.restorer.lazyMemory?.isReleased == true)

            // Our copies keep the userfaultfd alive: only an unregistration can have cleared the flags.
            // 1000 rounds of at least 3 ms each: the process still runs when its smaps is read here.
            let flags = try #require(try? ProcFS.smapsFlags(restored), "the restored heapchurn ended before its smaps was read")
            let registered = flags.filter { $0.value.contains("um") || $0.value.contains("uw") }.keys.sorted()
            #expect(registered.isEmpty, "still registered after the release: \(registered.map { hex($0) })")
            // heapchurn drops heap pages and touches them again: registered, those faults would wait forever.
            let ended = Spawn.endsSoon(restored, graceMilliseconds: 30_000)
            #expect(ended, "the restored heapchurn is blocked: \(Self.threadWaits(restored))")
            if ended { #expect(try Spawn.waitForExit(restored) == .exited(0), "the restored heapchurn did not end well") }
            for verdict in oracles.verdicts where verdict.name == "pages" {
                #expect(verdict.passed, "\(verdict.detail)")
            }
        }
    }
}
