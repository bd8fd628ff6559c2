// The two nodes as two processes: `fammig source` (on the victim's node) and `fammig target` (on the node
// the process moves to), joined by TCP; and `fammig launch`, which starts a program as pid 1 of its own
// PID namespace so that both nodes can share one machine.
import ArgumentParser
import Engine
import Foundation
import Logging
import Oracles
import Sys

/// Kills this process at a point of the source's protocol: how tests show what a dead source leaves.
final class SourceNemesis: MigrationObserver, @unchecked Sendable {
    /// before-freeze: once the FAM file is made, before the victim is seized; frozen: once its state is
    /// read (every injected query done), before anything is dumped; before-commit: every page dumped
    /// and marked, before the commit record (postcopy-socket: every page acknowledged, before the
    /// hand-over); after-commit: right after it; target-done: as before-commit, once the target also said
    /// it installed every page (waited for up to 10 s): the window in which two live copies were possible.
    enum Moment: String, ExpressibleByArgument, CaseIterable {
        case beforeFreeze = "before-freeze", frozen, beforeCommit = "before-commit", afterCommit = "after-commit", targetDone = "target-done"
    }
    let moment: Moment
    /// The link to the target (node commands), read for its `complete` at target-done.
    let transport: (any Transport)?
    /// SIGKILL (a dead node), or SIGSTOP (a stalled one: it goes on if continued).
    let signal: Int32
    init(moment: Moment, transport: (any Transport)? = nil, signal: Int32 = SIGKILL) {
        self.moment = moment
        self.transport = transport
        self.signal = signal
    }
    /// To this very thread (raise: tgkill), so that it stops here: a SIGSTOP sent to the process is taken
    /// by its main thread, and the group-stop reaches this one only after it went on a little (a stall
    /// meant before the commit record came after it).
    private func strike() { _ = raise(signal) }
    /// The FAM maker, which dies right after its first FAM at `before-freeze`.
    func wrap(_ makeBackend: @escaping (Int) throws(ImageError) -> any FAMBackend) -> (Int) throws(ImageError) -> any FAMBackend {
        { [moment, signal] (byteCount) throws(ImageError) in
            let backend = try makeBackend(byteCount)
            if moment == .beforeFreeze { _ = raise(signal) }
            return backend
        }
    }
    func victimFrozen(processID: ProcessID, state: ProcessState, pageAddresses: [UInt64]) throws {
        if moment == .frozen { strike() }
    }
    func targetReady(processID: ProcessID, checkpointed: ProcessState, restored: ProcessState) throws {}
    func pagesInstalled(processID: ProcessID, address: UInt64, targetAddress: UInt64, byteCount: Int, installedBytes: [UInt8]?) throws {}
    func imageWillCommit() {
        if moment == .targetDone, let transport {
            // Its `complete` may have been taken by the dumper already (postcopy-socket ends its dump on it):
            // then none comes, and every page was acknowledged anyway.
            let deadline = ContinuousClock.now + .seconds(10)
            waiting: while ContinuousClock.now < deadline {
                guard transport.waitReadable(timeoutMilliseconds: 100) else { continue }
                do {
                    while let message = try transport.receive() {
                        if case .complete = message { break waiting }
                    }
                } catch { break waiting }  // the target went away: nothing more comes
            }
        }
        if moment == .beforeCommit || moment == .targetDone { strike() }
    }
    func imageCommitted() { if moment == .afterCommit { strike() } }
}

/// Where a restored process gets its PID: `--pid-namespace` of `target` and `restore`.
enum PIDNamespaceChoice: String, ExpressibleByArgument, CaseIterable {
    case shared, fresh
    var namespace: PIDNamespace { self == .fresh ? .fresh : .shared }
}

struct Source: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The source node of a post-copy migration: freeze PID, then serve the target that connects.",
        discussion: freezeRetryDiscussion)

    @Option(help: "The PID of the process to migrate.")
    var pid: Int32

    @Option(help: "The migration mode: postcopy-socket or postcopy-fam (nonlive is `checkpoint` and `restore`).")
    var mode: MigrationMode

    @Option(help: "The FAM image file to create (postcopy-fam; it must not exist).")
    var fam: String?

    @Option(help: "postcopy-fam: a FAM pool (`fammig pool create`) both nodes map, to take the image's extent from instead of --fam.")
    var pool: String?

    @Option(help: "Where to wait for the target node, as IPV4:PORT (only that address is bound).")
    var listen: String

    @OptionGroup var keySink: KeySinkOptions

    @Option(help: "postcopy-socket: push the remaining pages in the background (on) or send pages only on request (off).")
    var push: Switch = .on

    @Option(help: "Seconds to wait for a target node that proves the key. A connection that does not complete the handshake within \(SecureChannel.handshakeTimeoutMilliseconds / 1000) s, or proves another key, is refused, and the source waits for the next one.")
    var acceptTimeout: Int32 = 30

    @Option(help: "Seconds to wait for the target once state has moved (\(MigrationPlan.defaultStallTimeoutSeconds) by default): for its page requests and acknowledgements, for a send it takes nothing of, and for its word that it holds the process. Before the target holds it the victim then runs on; while the hand-over is in doubt it is left stopped.")
    var stallTimeout: Int32 = Int32(MigrationPlan.defaultStallTimeoutSeconds)

    @Option(help: "Testing: kill this source node at this point of the protocol (before-freeze, frozen, before-commit, after-commit, target-done: every page in at the target, before the commit record or hand-over).")
    var dieAt: SourceNemesis.Moment?

    @Option(help: "Testing: stop this source node (SIGSTOP, as a stalled node) at this point of the protocol (as --die-at's).")
    var stallAt: SourceNemesis.Moment?

    @OptionGroup var common: CommonOptions

    func validate() throws {
        if !mode.isPostcopy { throw ValidationError("the node commands migrate post-copy; a nonlive migration is `fammig checkpoint` then `fammig restore`.") }
        if mode == .postcopyFAM && fam == nil && pool == nil { throw ValidationError("postcopy-fam needs --fam PATH, the FAM file both nodes map, or --pool PATH.") }
        if dieAt != nil && stallAt != nil { throw ValidationError("--die-at and --stall-at are two ends for this node: pass one.") }
        if fam != nil && pool != nil { throw ValidationError("--fam and --pool are two places for the image: pass one.") }
        if let fam, ProcFS.exists(fam) { throw ValidationError("\(fam) already exists; pass a new path or remove it.") }
        do { _ = try Endpoint(parsing: listen) } catch { throw ValidationError("--listen: \(error)") }
        if stallTimeout < Int32(MigrationPlan.minimumStallTimeoutSeconds) || stallTimeout > 86_400 { throw ValidationError("--stall-timeout takes \(MigrationPlan.minimumStallTimeoutSeconds) to 86400 seconds.") }
    }

    func run() throws {
        let logger = common.bootstrapLogging()
        let endpoint = try! Endpoint(parsing: listen)
        guard ProcFS.isAlive(ProcessID(pid)) else { throw fail("pid \(pid): no such process; pass the PID of a running process.", code: 2) }
        let key = try keySink.create()
        // Mapped and pre-faulted before anything else, as a node keeps its pool mapped.
        let poolImage = try pool.map { PoolImage(pool: try PoolFile.open(path: $0, prefault: true), key: key) }
        let removeKeyFile = { keySink.removeCreated() }
        let transport: SecureTransport
        do {
            let listener = try TCPTransport.listen(on: endpoint)
            defer { listener.close() }
            FileHandle.standardError.write(Data("fammig source: listening on \(listener.endpoint)\n".utf8))
            // The first connection is not trusted for being first: only a peer that proves the key is the
            // target. Anyone else is refused, and the real target can still connect.
            let deadline = ContinuousClock.now + .seconds(Int64(acceptTimeout))
            var secured: SecureTransport?
            while secured == nil {
                let left = deadline - ContinuousClock.now
                guard left > .zero, let accepted = try TCPTransport.accept(on: listener, timeoutMilliseconds: Int32(max(1, left.components.seconds * 1000 + 1)),
                                                                           stallTimeoutMilliseconds: stallTimeout * 1000) else {
                    removeKeyFile()
                    throw fail("no target node that holds the key connected to \(endpoint) within \(acceptTimeout) s; start `fammig target --connect \(endpoint)` with this key.", code: 2)
                }
                do {
                    secured = try SecureChannel.establish(over: accepted, role: .source, key: key,
                                                          agreement: ChannelAgreement(mode: mode, generation: MigrationPlan.singleGeneration),
                                                          nonce: SecureChannel.randomNonce())
                } catch {
                    accepted.close()
                    FileHandle.standardError.write(Data("fammig source: refused a connection: \(error)\n".utf8))
                }
            }
            transport = secured!
        } catch let error as TransportError {
            removeKeyFile()
            throw fail("\(error)", code: 2)
        }
        defer { transport.close() }
        // The target claims the extent once the metadata is committed; what it never claimed goes back.
        defer { poolImage?.release() }
        let timeline = MigrationTimeline()
        let famPath = fam ?? ""
        let nemesis = dieAt.map { SourceNemesis(moment: $0, transport: transport) }
            ?? stallAt.map { SourceNemesis(moment: $0, transport: transport, signal: SIGSTOP) }
        let makeBackend = poolImage?.makeBackend() ?? makeRealBackend(path: famPath)
        let plan = MigrationPlan(mode: mode, push: push == .on, key: key, stallTimeout: .seconds(Int64(stallTimeout)),
                                 imageIdentity: transport.imageIdentity)
        let source = try Migration.source(plan, victim: ProcessID(pid),
                                           ports: SourcePorts(makeBackend: nemesis?.wrap(makeBackend) ?? makeBackend, transport: transport,
                                                              observer: nemesis, clock: MonotonicClock(),
                                                              timeline: timeline, logger: logger))
        do {
            try ThreadedDriver(logger: logger).run(source.actors)
        } catch {
            try? transport.send(.abort(reason: "\(error)"))
            if let fam { _ = try? SharedMapping.remove(path: fam) }
            removeKeyFile()
            throw engineFailure(error)
        }
        print("source: pid \(pid) migrated (\(mode.rawValue)); busy \(format(timeline.span(from: .started, to: .victimReleased))), "
              + "downtime starts at the freeze, \(timeline.counter("pagesDumped")) pages, \(transport.bytesSent) bytes sent over TCP")
    }
}

struct Target: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The target node of a post-copy migration: connect to the source, restore the process, serve its faults.")

    @Option(help: "The migration mode (the source's): postcopy-socket or postcopy-fam.")
    var mode: MigrationMode

    @Option(help: "The FAM image file the source writes (postcopy-fam).")
    var fam: String?

    @Option(help: "postcopy-fam: the FAM pool the source takes the image's extent from (instead of --fam).")
    var pool: String?

    @Option(help: "The source node, as IPV4:PORT.")
    var connect: String

    @OptionGroup var keySource: KeySourceOptions

    @Option(help: "postcopy-fam: install the remaining pages from FAM in the background (on) or only on faults (off).")
    var push: Switch = .on

    @Option(help: "shared: the old PID in this node's PID namespace; fresh: pid 1 of a new namespace (a victim started by `fammig launch`).")
    var pidNamespace: PIDNamespaceChoice = .shared

    @Option(help: "Seconds to keep trying to reach the source, then to wait for its handshake (a source busy refusing another peer answers late), and then for the process state or image it sends.")
    var connectTimeout: Int32 = 30

    @Option(help: "Seconds to wait for the source once state has moved (\(MigrationPlan.defaultStallTimeoutSeconds) by default): for the pages needed before the resume, for a page the restored process faulted on, for a send it takes nothing of, and, with every page in, for the commit record (postcopy-fam) or the source's last word (postcopy-socket). Then the restored process is killed and the target exits 2. postcopy-socket: until the process is this node's, it also lives on a lease of half this time: a target node stopped (or starved) that long has its process killed by its watchdog, before its source lets the victim run on, and exits 2 once it runs again. Give both nodes one stall timeout.")
    var stallTimeout: Int32 = Int32(MigrationPlan.defaultStallTimeoutSeconds)

    @OptionGroup var common: CommonOptions

    func validate() throws {
        if !mode.isPostcopy { throw ValidationError("the node commands migrate post-copy; a nonlive migration is `fammig checkpoint` then `fammig restore`.") }
        if mode == .postcopyFAM && fam == nil && pool == nil { throw ValidationError("postcopy-fam needs --fam PATH, the FAM file the source writes, or --pool PATH.") }
        if fam != nil && pool != nil { throw ValidationError("--fam and --pool are two places for the image: pass one.") }
        do { _ = try Endpoint(parsing: connect) } catch { throw ValidationError("--connect: \(error)") }
        if stallTimeout < Int32(MigrationPlan.minimumStallTimeoutSeconds) || stallTimeout > 86_400 { throw ValidationError("--stall-timeout takes \(MigrationPlan.minimumStallTimeoutSeconds) to 86400 seconds.") }
    }

    func run() throws {
        let logger = common.bootstrapLogging()
        let key = try keySource.read()
        let poolImage = try pool.map { PoolImage(pool: try PoolFile.open(path: $0, prefault: true), key: key) }
        // Freed when the target is done with it (every page in, or the process gone), or failed.
        defer { poolImage?.release() }
        let transport: SecureTransport
        do {
            let connection = try TCPTransport.connect(to: try Endpoint(parsing: connect), timeoutMilliseconds: connectTimeout * 1000,
                                                      stallTimeoutMilliseconds: stallTimeout * 1000)
            do {
                transport = try SecureChannel.establish(over: connection, role: .target, key: key,
                                                        agreement: ChannelAgreement(mode: mode, generation: MigrationPlan.singleGeneration),
                                                        nonce: SecureChannel.randomNonce(), timeoutMilliseconds: connectTimeout * 1000)
            } catch {
                connection.close()
                throw error
            }
        } catch {
            throw fail("\(error)", code: 2)
        }
        defer { transport.close() }
        let timeline = MigrationTimeline()
        let metrics = FaultMetrics()
        let clock = MonotonicClock()
        let oracles = common.makeOracles()
        oracles?.expectLazyPages()
        var plan = MigrationPlan(mode: mode, push: push == .on, key: key, stallTimeout: .seconds(Int64(stallTimeout)),
                                 imageIdentity: transport.imageIdentity)
        // postcopy-socket: half the stall timeout, so that a node stopped that long loses its process
        // before its source, which waits the whole stall timeout for a word from it, lets the victim run
        // on. A postcopy-fam source waits for no word: it commits, and this copy becomes the process
        // (killing it then would leave none running), so that mode has no lease.
        if mode == .postcopySocket { plan.targetLease = .milliseconds(Int64(stallTimeout) * 500) }
        let target = try Migration.target(plan,
                                          ports: TargetPorts(openBackend: poolImage?.openBackend() ?? openRealBackend(path: fam ?? "/nonexistent"),
                                                             transport: transport, stubPath: try stubPath(), observer: oracles, clock: clock,
                                                             timeline: timeline, metrics: metrics, logger: logger,
                                                             pidNamespace: pidNamespace.namespace, imageWait: .seconds(Int64(connectTimeout))))
        let restorer = target.restorer
        do {
            try ThreadedDriver(logger: logger).run(target.actors)
        } catch {
            if let restored = restorer.restoredProcessID { Spawn.kill(restored); _ = try? Spawn.waitForExit(restored) }
            throw engineFailure(error)
        }
        let restored = restorer.restoredProcessID.map { "\($0)" } ?? "?"
        print("target: restored pid \(restored); downtime from resume: restore \(format(timeline.span(from: .restoreStarted, to: .targetResumed))), "
              + "\(metrics.faultCount.load(ordering: .relaxed)) faults")
        for summary in metrics.summaries {
            print(String(format: "  %@: %d, median %.1f us, p99 %.1f us", summary.path as NSString, summary.count,
                         summary.medianMicroseconds, summary.p99Microseconds))
        }
    }
}

struct Launch: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a program as pid 1 of its own PID namespace (a node of its own), stdout to a file; print its PID.")

    @Option(help: "The file the program's stdout goes to (stdin is /dev/null).")
    var output: String

    @Argument(parsing: .postTerminator, help: "The program and its arguments, after --.")
    var command: [String] = []

    func validate() throws {
        guard let program = command.first, program.contains("/"), access(program, X_OK) == 0 else {
            throw ValidationError("give the program's path after --, e.g. -- ./TestPrograms/build/sleeper.")
        }
    }

    func run() throws {
        do {
            let processID = try Spawn.programInNewPIDNamespace(path: absolutePath(command[0]), arguments: Array(command.dropFirst()),
                                                               environment: ["PATH=/usr/bin:/bin"], standardOutputPath: output,
                                                               standardErrorPath: output + ".err")
            print(processID)
        } catch { throw fail("cannot start \(command[0]): \(error)", code: 2) }
    }
}
