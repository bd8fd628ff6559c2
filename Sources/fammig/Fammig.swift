// The fammig command: parses flags, bootstraps logging, builds actors, picks the threaded driver and
// turns outcomes into exit codes (0 success, 1 oracle or program failure, 2 usage/environment/bad input).
import ArgumentParser
import Engine
import Foundation
import Logging
import Oracles
import Sys

@main
struct Fammig: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fammig",
        abstract: "Migrate a live Linux process between nodes through fabric-attached memory (FAM).",
        subcommands: [Checkpoint.self, Restore.self, Inspect.self, Run.self, Bench.self, Study.self, Source.self, Target.self, Launch.self, Pool.self,
                      GC.self])

    /// As ParsableCommand's, except that usage errors exit 2 (argument-parser's default is 64), the
    /// code this tool promises for every kind of bad input.
    static func main() {
        // Held for this process's whole life (gc knows a live owner by it); dropped by the kernel on SIGKILL.
        var ownerLock: FileLock?
        do {
            var command = try parseAsRoot()
            if !(command is GC) { ownerLock = Leftovers.claim() }
            try command.run()
            Leftovers.release(ownerLock)
        } catch {
            Leftovers.release(ownerLock)
            if exitCode(for: error) == .validationFailure {
                FileHandle.standardError.write(Data((fullMessage(for: error) + "\n").utf8))
                Foundation.exit(2)
            }
            exit(withError: error)
        }
    }
}

/// Options every command shares.
struct CommonOptions: ParsableArguments {
    @Flag(name: .shortAndLong, help: "Log engine steps to stderr.")
    var verbose = false

    @Option(help: "The oracles (state and page read-back before the resume and at every install): on, or off for production speed (default: on, except bench).")
    var oracles: Switch?

    /// The oracles the target side reports to, nil with --oracles off (or off by the command's default).
    func makeOracles(byDefault: Switch = .on) -> MigrationOracles? { (oracles ?? byDefault) == .on ? MigrationOracles() : nil }

    func bootstrapLogging() -> Logger {
        // FAMMIG_LOG=trace adds the fault path (every request and answer) to --verbose.
        let level: Logger.Level = verbose ? (ProcessInfo.processInfo.environment["FAMMIG_LOG"] == "trace" ? .trace : .debug) : .warning
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        return Logger(label: "fammig")
    }
}

/// A failure the command reports with its exit code, having already printed the message.
struct CommandFailure: Error {
    let code: Int32
}

func fail(_ message: String, code: Int32) -> ExitCode {
    FileHandle.standardError.write(Data(("fammig: " + message + "\n").utf8))
    return ExitCode(code)
}

func engineFailure(_ error: EngineError) -> ExitCode {
    fail("\(error)", code: error.isUsageOrEnvironment ? 2 : 1)
}

/// The image file: a new file under /dev/shm unless given.
func defaultFAMPath() -> String {
    "/dev/shm/fammig-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).img"
}

/// The executable the restorer starts (stopped at exec) and turns into the victim.
func stubPath() throws(ExitCode) -> String {
    // Named by /proc/self/exe in the child that execs it: this very executable, even if its file was
    // replaced (a rebuild) since this fammig started.
    guard (try? ProcFS.readLink("/proc/self/exe")) != nil else { throw fail("cannot read /proc/self/exe", code: 2) }
    return "/proc/self/exe"
}

func makeRealBackend(path: String) -> (Int) throws(ImageError) -> any FAMBackend {
    final class Made: @unchecked Sendable { var file = false }
    let made = Made()
    return { (byteCount) throws(ImageError) in
        // A second call replaces the file the first made (the dumper's estimate was too small).
        if made.file { unlink(path) }
        let backend = try RealFAM.create(path: path, byteCount: byteCount, prefault: true)
        made.file = true
        return backend
    }
}

func openRealBackend(path: String) -> () throws(ImageError) -> (any FAMBackend)? {
    { () throws(ImageError) in
        guard ProcFS.exists(path) else { return nil }
        // Only an image no one else could have written: ours, and writable by nobody else.
        return try RealFAM.openTrusted(path: path)
    }
}

/// What every command that freezes a process says about a freeze that finds more than its preflight did.
let freezeRetryDiscussion = """
    What cannot migrate is refused before the freeze, the process left running untouched. A descriptor or \
    mapping that only the freeze finds (one opened and closed again each round) is taken for a \
    moment's: the process is let go untouched and frozen again, at most \(Dumper.freezeRetryLimit) times, \
    4 ms later, then 8, 16, 32, 64 ms; the refusal stands only if the last freeze still finds it. A \
    preflight that finds a descriptor it refuses looks again after the same waits (both count together).
    """

struct Checkpoint: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Checkpoint a running process into a FAM image (nonlive) and kill it.",
        discussion: freezeRetryDiscussion)

    @Option(help: "The PID of the process to checkpoint.")
    var pid: Int32

    @Option(help: "The FAM image file to create (it must not exist).")
    var fam: String?

    @Option(help: "A FAM pool (`fammig pool create`) to keep the image in, as an extent that waits for its restore (instead of --fam).")
    var pool: String?

    @OptionGroup var keySink: KeySinkOptions

    @Flag(help: "Let the process run on after the checkpoint instead of killing it.")
    var leaveRunning = false

    @Option(help: "Testing: kill this fammig at this point of the checkpoint (before-freeze, frozen, before-commit, after-commit).")
    var dieAt: SourceNemesis.Moment?

    @OptionGroup var common: CommonOptions

    func validate() throws {
        guard (fam == nil) != (pool == nil) else { throw ValidationError("pass where the image goes: --fam FILE or --pool POOL (one of them).") }
    }

    func run() throws {
        let logger = common.bootstrapLogging()
        if let fam, ProcFS.exists(fam) { throw fail("\(fam) already exists; pass a new path or remove it.", code: 2) }
        let poolPath = pool
        let opened = try poolPath.map { try PoolFile.open(path: $0, prefault: true) }
        let key = try keySink.create()
        let poolImage = opened.map { PoolImage(pool: $0, key: key) }
        let timeline = MigrationTimeline()
        let nemesis = dieAt.map { SourceNemesis(moment: $0) }
        let makeBackend = poolImage?.makeBackend() ?? makeRealBackend(path: fam ?? "")
        let source = try Migration.source(MigrationPlan(mode: .nonlive, key: key), victim: ProcessID(pid), ports: SourcePorts(
            makeBackend: nemesis?.wrap(makeBackend) ?? makeBackend, transport: nil, observer: nemesis, clock: MonotonicClock(),
            timeline: timeline, logger: logger, release: leaveRunning ? .leaveRunning : .kill))
        do {
            try ThreadedDriver(logger: logger).run(source.actors)
            // Committed: the extent outlives this process, until a restore claims it.
            try poolImage?.keepSourceExtent()
        } catch {
            if let fam { _ = try? SharedMapping.remove(path: fam) }
            poolImage?.release()
            keySink.removeCreated()
            if let error = error as? PoolError { throw fail("\(error)", code: 2) }
            throw engineFailure(error as? EngineError ?? .aborted("\(error)"))
        }
        let pages = timeline.counter("pagesDumped")
        print("checkpointed pid \(pid) into \(fam ?? "the pool \(poolPath ?? "")"): \(pages) pages (\(pages * .pageSize) bytes)"
              + ", frozen for \(format(timeline.span(from: .frozen, to: .victimReleased)))"
              + (leaveRunning ? "; the process runs on" : "; the process was killed"))
    }
}

struct Restore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Restore a process from a committed FAM image, with its old PID, and let it run.")

    @Option(help: "The FAM image file the source node wrote (owned by this user, writable by no one else).")
    var fam: String?

    @Option(help: "The FAM pool the checkpoint kept its image in (instead of --fam); the extent is freed once the process runs.")
    var pool: String?

    @OptionGroup var keySource: KeySourceOptions

    @Option(help: "shared: the old PID in this node's PID namespace; fresh: pid 1 of a new namespace (a victim started by `fammig launch`).")
    var pidNamespace: PIDNamespaceChoice = .shared

    @OptionGroup var common: CommonOptions

    func validate() throws {
        guard (fam == nil) != (pool == nil) else { throw ValidationError("pass where the image is: --fam FILE or --pool POOL (one of them).") }
    }

    func run() throws {
        let logger = common.bootstrapLogging()
        if let fam, !ProcFS.exists(fam) { throw fail("\(fam): no such file; pass the image the checkpoint wrote.", code: 2) }
        let key = try keySource.read()
        let poolImage = try pool.map { PoolImage(pool: try PoolFile.open(path: $0, prefault: true), key: key) }
        let openBackend = poolImage?.openBackend() ?? openRealBackend(path: fam ?? "")
        let source = fam ?? "the pool \(pool ?? "")"
        let timeline = MigrationTimeline()
        let oracles = common.makeOracles()
        let target = try Migration.target(MigrationPlan(mode: .nonlive, key: key), ports: TargetPorts(
            openBackend: openBackend, transport: nil, stubPath: try stubPath(), observer: oracles, clock: MonotonicClock(),
            timeline: timeline, logger: logger, pidNamespace: pidNamespace.namespace, processIDWait: .seconds(2)))
        let restorer = target.restorer
        do {
            // An image that is not committed is an error here, not something to wait for.
            guard let backend = try openBackend() else {
                throw ImageError.pool("\(source) holds no image made with this key; pass the key file the checkpoint wrote.")
            }
            _ = try ImageReader.open(backend: backend, key: key, requireComplete: true)
            try ThreadedDriver(logger: logger).run(target.actors)
        } catch let error as ImageError {
            // Nothing destroyed that cannot be restored: a kept image stays kept for another try.
            try? poolImage?.keepTargetExtent()
            throw fail("\(error)", code: 2)
        } catch let error as EngineError {
            try? poolImage?.keepTargetExtent()
            throw engineFailure(error)
        }
        poolImage?.release()
        print("restored pid \(restorer.restoredProcessID.map { "\($0)" } ?? "?") from \(source) in \(format(timeline.span(from: .restoreStarted, to: .targetResumed)))")
    }
}

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Verify a FAM image's checksums and authentication codes and print what it holds.")

    @Option(help: "The FAM image file to inspect (owned by this user, writable by no one else).")
    var fam: String

    @OptionGroup var keySource: KeySourceOptions

    @OptionGroup var common: CommonOptions

    func run() throws {
        _ = common.bootstrapLogging()
        guard ProcFS.exists(fam) else { throw fail("\(fam): no such file; pass an image file.", code: 2) }
        let key = try keySource.read()
        do {
            let reader = try ImageReader.open(backend: RealFAM.openTrusted(path: fam), key: key, requireComplete: true)
            // What restore would refuse, inspect reports too.
            let state = try reader.checkedProcessState()
            for line in ImageSummary(reader: reader).lines { print(line) }
            for line in StateSummary.lines(state) { print(line) }
        } catch {
            throw fail("\(error)", code: 2)
        }
    }
}

func format(_ duration: Duration?) -> String {
    guard let duration else { return "n/a" }
    let milliseconds = Double(duration.components.seconds) * 1000 + Double(duration.components.attoseconds) / 1e15
    return String(format: "%.2f ms", milliseconds)
}

func milliseconds(_ duration: Duration?) -> Double? {
    guard let duration else { return nil }
    return Double(duration.components.seconds) * 1000 + Double(duration.components.attoseconds) / 1e15
}
