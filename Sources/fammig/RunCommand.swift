// `fammig run`: start a program, migrate it after a while, let it finish, and judge the migration with
// every oracle, including the end-to-end one (the final checksum of an unmigrated reference run).
import ArgumentParser
import Engine
import Foundation
import Logging
import Oracles
import Sys

extension MigrationMode: ExpressibleByArgument {}

enum Switch: String, ExpressibleByArgument, CaseIterable, Codable {
    case on, off
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Start a program, migrate it after a delay, let it finish, and check it with every oracle.",
        discussion: freezeRetryDiscussion)

    @Option(help: "The migration mode.")
    var mode: MigrationMode = .nonlive

    @Option(help: "Post-copy: push the remaining pages in the background (on) or install pages only on faults (off).")
    var push: Switch = .on

    @Option(help: "The FAM image file (default: a new file under /dev/shm, removed afterwards).")
    var fam: String?

    @Option(help: "A FAM pool (`fammig pool create`) to take the image's extent from, instead of a FAM file of its own.")
    var pool: String?

    @Option(help: "Milliseconds the program runs before it is migrated.")
    var afterMs: Int = 100

    @Option(help: "Freeze the program at the exit of its N-th system call (counted under ptrace, address randomisation off, as pid 1 of its own PID namespace) instead of after --after-ms: a repeatable freeze point for a program that knows nothing of fammig.")
    var freezeAtSyscall: Int?

    @Option(help: "Post-copy: seconds either node waits for the other once state has moved (\(MigrationPlan.defaultStallTimeoutSeconds) by default; as `source` and `target` take it): pages before the resume, a faulted page, the hand-over or commit record, acknowledgements, a send the other takes nothing of. The migration then fails naming the stall (exit 2).")
    var stallTimeout: Int32 = Int32(MigrationPlan.defaultStallTimeoutSeconds)

    @Option(help: "Also write the report as JSON to this file.")
    var json: String?

    @Flag(help: "Run the program as pid 1 of its own PID namespace and restore it into another one (two nodes on one machine; always on in post-copy modes, where victim and target live at once).")
    var nodeNamespaces = false

    @Flag(help: "Post-copy: put each node's socket in its own network namespace, joined by a veth pair (created and removed here).")
    var netns = false

    @Option(help: "With --netns: shape the veth pair to this rate with tc tbf, e.g. 10gbit or 500mbit (netem, for delay, is not in this kernel).",
            transform: parseLinkRate)
    var link: LinkRate?

    @Flag(help: "Skip the unmigrated reference run (no end-to-end oracle).")
    var noReference = false

    @OptionGroup var common: CommonOptions

    @Argument(parsing: .postTerminator, help: "The program and its arguments, after --.")
    var command: [String] = []

    mutating func validate() throws {
        guard let program = command.first else { throw ValidationError("Give the program to run after --, e.g. -- ./TestPrograms/build/memwalk --mib 4.") }
        guard access(program, X_OK) == 0, program.contains("/") else {
            throw ValidationError("\(program) is not an executable path; give its path (e.g. ./TestPrograms/build/memwalk).")
        }
        guard afterMs >= 0 else { throw ValidationError("--after-ms must be 0 or more.") }
        if stallTimeout < Int32(MigrationPlan.minimumStallTimeoutSeconds) || stallTimeout > 86_400 { throw ValidationError("--stall-timeout takes \(MigrationPlan.minimumStallTimeoutSeconds) to 86400 seconds.") }
        if let freezeAtSyscall, freezeAtSyscall < 1 { throw ValidationError("--freeze-at-syscall counts from 1.") }
        if let fam, ProcFS.exists(fam) { throw ValidationError("\(fam) already exists; pass a new path or remove it.") }
        if fam != nil && pool != nil { throw ValidationError("--fam and --pool are two places for the image: pass one.") }
        if link != nil && !netns { throw ValidationError("--link shapes the veth pair between the nodes: add --netns.") }
        if let pool, !ProcFS.exists(pool) { throw ValidationError("\(pool): no such pool; make it with `fammig pool create --pool \(pool) --mib N`.") }
    }

    func run() throws {
        let logger = common.bootstrapLogging()
        let program = absolutePath(command[0])
        let arguments = Array(command.dropFirst())
        let workDirectory = try makeWorkDirectory()
        let famPath = fam ?? defaultFAMPath()
        // A pool is mapped (and pre-faulted) once, like a node that keeps its FAM mapped.
        let storage: ImageStorage = try pool.map { .pool(try PoolFile.open(path: $0, prefault: true)) } ?? .file(famPath)
        let ownsFAMFile = fam == nil && pool == nil
        defer {
            if ownsFAMFile { _ = try? SharedMapping.remove(path: famPath) }
            removeWorkDirectory(workDirectory)
        }
        var report = RunReport(program: command, mode: mode.rawValue, afterMilliseconds: afterMs)
        // Killed (Ctrl-C, SIGTERM) at any point, fammig still removes its files; the processes it starts
        // are registered below as they appear.
        let workFiles = ["reference.out", "reference.err", "migrated.out", "migrated.err"].map { workDirectory + "/" + $0 }
        Spawn.cleanUpOnTermination(paths: (ownsFAMFile ? [famPath] : []) + workFiles + [workDirectory], processes: [])

        if !noReference {
            let reference = try runToCompletion(program: program, arguments: arguments, outputPath: workDirectory + "/reference.out",
                                                errorPath: workDirectory + "/reference.err")
            report.referenceChecksum = reference.checksum
            guard reference.status == .exited(0), reference.checksum != nil else {
                let errorText = (try? String(contentsOfFile: workDirectory + "/reference.err", encoding: .utf8)) ?? ""
                let code: Int32 = reference.status == .exited(2) ? 2 : 1
                throw fail("the unmigrated reference run \(reference.status) without a checksum line"
                           + (reference.outputProblem.map { " (\($0))" } ?? "") + ": \(errorText.split(separator: "\n").first ?? "(no stderr)")", code: code)
            }
        }

        let outputPath = workDirectory + "/migrated.out"
        let victim: ProcessID
        let separateNodes = nodeNamespaces || mode != .nonlive || freezeAtSyscall != nil
        do {
            // Registered for the termination clean-up as it starts, not after the wait below.
            victim = try Spawn.deferringTermination { () throws -> ProcessID in
                let victim: ProcessID
                if let freezeAtSyscall {
                    victim = try SyscallStops.startFrozen(atSyscall: freezeAtSyscall, path: program, arguments: arguments,
                                                          environment: ["PATH=/usr/bin:/bin"], standardOutputPath: outputPath,
                                                          standardErrorPath: workDirectory + "/migrated.err",
                                                          personality: 0x0040000, diesWithStarter: false,  // ADDR_NO_RANDOMIZE
                                                          limit: .seconds(600))
                } else if separateNodes {
                    victim = try Spawn.programInNewPIDNamespace(path: program, arguments: arguments, environment: ["PATH=/usr/bin:/bin"],
                                                                standardOutputPath: outputPath, standardErrorPath: workDirectory + "/migrated.err")
                } else {
                    victim = try Spawn.program(path: program, arguments: arguments, environment: ["PATH=/usr/bin:/bin"],
                                               standardOutputPath: outputPath, standardErrorPath: workDirectory + "/migrated.err")
                }
                Spawn.cleanUpOnTermination(paths: [], processes: [victim])
                Leftovers.recordOwnProcess(victim)
                return victim
            }
        } catch { throw fail("cannot start \(program): \(error)", code: 2) }
        if freezeAtSyscall == nil { usleep(UInt32(afterMs) * 1000) }
        if let status = try? Spawn.pollExit(victim) {
            throw fail("\(command[0]) \(status) before the migration at \(afterMs) ms; give it more work or lower --after-ms.", code: 2)
        }

        let timeline = MigrationTimeline()
        let oracles = common.makeOracles()
        let clock = MonotonicClock()
        let metrics = FaultMetrics()
        let nodes: Nodes
        let network: NodeNetwork?
        do { network = netns && mode != .nonlive ? try NodeNetwork(tag: getpid(), link: link) : nil } catch {
            Spawn.kill(victim)
            _ = try? Spawn.waitForExit(victim)
            throw fail("\(error)", code: 2)
        }
        defer { network?.remove() }
        do {
            nodes = try Nodes.make(mode: mode, push: push == .on, victim: victim, storage: storage, stubPath: try stubPath(),
                                   separateNodes: separateNodes, oracles: oracles, clock: clock, timeline: timeline,
                                   metrics: metrics, logger: logger, network: network, stallTimeoutSeconds: stallTimeout)
        } catch {
            Spawn.kill(victim)
            _ = try? Spawn.waitForExit(victim)
            throw fail("cannot connect the two nodes: \(error)", code: 2)
        }
        let restorer = nodes.restorer
        defer { nodes.close() }
        do {
            try ThreadedDriver(logger: logger).run(nodes.actors)
        } catch {
            // A program that ended by itself is reaped and named: its status and stderr say why, and its
            // PID, no longer ours, is never signalled.
            let ended = try? Spawn.pollExit(victim)
            if ended == nil {
                Spawn.kill(victim)
                _ = try? Spawn.waitForExit(victim)
            }
            report.verdicts = oracles?.verdicts ?? []
            report.error = "\(error)"
            try writeJSON(report)
            if let ended, restorer.restoredProcessID == nil {
                let errorText = (try? String(contentsOfFile: workDirectory + "/migrated.err", encoding: .utf8)) ?? ""
                let firstLine = errorText.split(separator: "\n").first.map(String.init) ?? "(no stderr)"
                throw fail("\(command[0]) \(ended) before the migration could freeze it (it still ran at \(afterMs) ms; its stderr: "
                           + "\(firstLine)); give it more work or lower --after-ms. The engine said: \(error)", code: 2)
            }
            throw engineFailure(error)
        }
        guard let restored = restorer.restoredProcessID else { preconditionFailure("restorer finished without a process") }
        Spawn.cleanUpOnTermination(paths: [], processes: [restored])
        Leftovers.recordOwnProcess(restored)
        let status: ExitStatus
        do { status = try Spawn.waitForExit(restored) } catch { throw fail("waiting for pid \(restored): \(error)", code: 1) }
        let checksum = lastChecksum(outputPath)
        report.fill(timeline: timeline)
        report.faultPaths = metrics.summaries
        report.faultCount = metrics.faultCount.load(ordering: .relaxed)
        report.zeroPageCount = metrics.zeroPageCount.load(ordering: .relaxed)
        report.tcpByteCount = nodes.transportByteCount
        report.famByteCount = mode.usesFAM ? report.pageCount * .pageSize : 0
        if mode != .nonlive { oracles?.recordLazyPageVerdict() }
        report.migratedChecksum = checksum
        report.programStatus = "\(status)"
        var verdicts = oracles?.verdicts ?? []
        // A failed self-check says why on its stderr, which is removed with the work directory: keep its first line.
        let failure = status == .exited(0) ? "" : ((try? String(contentsOfFile: workDirectory + "/migrated.err", encoding: .utf8))?
            .split(separator: "\n").first.map { ": " + $0 } ?? "")
        verdicts.append(OracleVerdict(name: "program", passed: status == .exited(0), detail: "\(status)\(failure)"))
        if !noReference {
            let same = checksum != nil && checksum == report.referenceChecksum
            verdicts.append(OracleVerdict(name: "end to end", passed: same,
                                          detail: "migrated \(checksum ?? "none"), reference \(report.referenceChecksum ?? "none")"))
            // The test programs' whole stdout is deterministic: the migrated run's must be the reference's.
            let sameOutput = FileManager.default.contentsEqual(atPath: outputPath, andPath: workDirectory + "/reference.out")
            verdicts.append(OracleVerdict(name: "output", passed: sameOutput,
                                          detail: sameOutput ? "stdout identical to the reference run" : "stdout differs from the reference run"))
        }
        report.verdicts = verdicts
        print(report.text)
        try writeJSON(report)
        if verdicts.contains(where: { !$0.passed }) { throw ExitCode(1) }
    }

    private func writeJSON(_ report: RunReport) throws {
        guard let json else { return }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        do { try writeReport(try encoder.encode(report), to: json) } catch {
            throw fail("cannot write \(json): \(error)", code: 2)
        }
    }

    private func runToCompletion(program: String, arguments: [String], outputPath: String, errorPath: String)
        throws -> (status: ExitStatus, checksum: String?, outputProblem: String?) {
        // Made here, so its identity is known before the program's stdout opens it (O_TRUNC keeps the inode).
        _ = FileManager.default.createFile(atPath: outputPath, contents: nil)
        let written = FileIdentity.of(path: outputPath)
        do {
            let processID = try Spawn.deferringTermination { () throws(SyscallError) -> ProcessID in
                let processID = try Spawn.program(path: program, arguments: arguments, environment: ["PATH=/usr/bin:/bin"],
                                                  standardOutputPath: outputPath, standardErrorPath: errorPath)
                Spawn.cleanUpOnTermination(paths: [], processes: [processID])
                Leftovers.recordOwnProcess(processID)
                return processID
            }
            let status = try Spawn.waitForExit(processID)
            let checksum = lastChecksum(outputPath)
            return (status, checksum, checksum == nil ? Self.outputProblem(outputPath, written: written) : nil)
        } catch { throw fail("cannot run \(program): \(error)", code: 2) }
    }

    /// Why a stdout file gives no checksum line: gone or replaced since the program started writing it,
    /// not text, or text without one (its size and last line).
    static func outputProblem(_ path: String, written: FileIdentity?) -> String {
        guard let now = FileIdentity.of(path: path) else { return "\(path) is gone" }
        if let written, written.inode != now.inode || written.device != now.device {
            return "\(path) was replaced while the program wrote it (inode \(written.inode), now \(now.inode))"
        }
        guard let bytes = try? ProcFS.readFile(path) else { return "\(path) cannot be read" }
        guard let text = String(validatingUTF8: bytes.map { CChar(bitPattern: $0) } + [0]) else {
            return "\(path) is not UTF-8 text (\(bytes.count) bytes)"
        }
        return "\(path) holds \(bytes.count) bytes, last line \"\(text.split(separator: "\n").last.map { String($0.prefix(80)) } ?? "")\""
    }
}

/// `--link RATE`: tc's own notation, checked before anything starts.
func parseLinkRate(_ text: String) throws -> LinkRate {
    guard let rate = LinkRate(text) else {
        throw ValidationError("--link takes a rate as tc writes it: a whole number and bit, kbit, mbit, gbit or tbit (at least 8kbit), e.g. 10gbit.")
    }
    return rate
}

/// The value of the last `checksum=` line a test program printed.
func lastChecksum(_ path: String) -> String? {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
    return text.split(separator: "\n").last { $0.hasPrefix("checksum=") }.map { String($0.dropFirst("checksum=".count)) }
}

func absolutePath(_ path: String) -> String {
    path.hasPrefix("/") ? path : FileManager.default.currentDirectoryPath + "/" + path
}

func makeWorkDirectory() throws -> String {
    // The owner's PID in the name: `fammig gc` removes the directory once that owner is gone.
    var template = Array("/tmp/fammig-run-\(getpid())-XXXXXX".utf8CString)
    guard let result = mkdtemp(&template) else { throw fail("cannot create a directory under /tmp", code: 2) }
    return String(cString: result)
}

func removeWorkDirectory(_ path: String) {
    try? FileManager.default.removeItem(atPath: path)
}

struct RunReport: Codable {
    var program: [String]
    var mode: String
    var afterMilliseconds: Int
    var referenceChecksum: String?
    var migratedChecksum: String?
    var programStatus: String?
    var prepareMilliseconds: Double?
    var freezeMilliseconds: Double?
    var pageDumpMilliseconds: Double?
    var dumpMilliseconds: Double?
    var restoreMilliseconds: Double?
    var downtimeMilliseconds: Double?
    var busyMilliseconds: Double?
    var totalMilliseconds: Double?
    var oracleMilliseconds: Double?
    var pageCount = 0
    var faultCount = 0
    var zeroPageCount = 0
    var tcpByteCount = 0
    var faultPaths: [FaultMetrics.PathSummary] = []
    var famByteCount = 0
    var verdicts: [OracleVerdict] = []
    var error: String?

    init(program: [String], mode: String, afterMilliseconds: Int) {
        self.program = program
        self.mode = mode
        self.afterMilliseconds = afterMilliseconds
    }

    /// Times exclude what the oracles spent reading (they run inside the freeze and before the resume).
    mutating func fill(timeline: MigrationTimeline) {
        let freezeOracle = Double(timeline.counter(MigrationTimeline.freezeOracleNanoseconds)) / 1e6
        let targetOracle = Double(timeline.counter(MigrationTimeline.targetOracleNanoseconds)) / 1e6
        prepareMilliseconds = milliseconds(timeline.span(from: .started, to: .freezeRequested))
        freezeMilliseconds = milliseconds(timeline.span(from: .freezeRequested, to: .frozen))
        pageDumpMilliseconds = milliseconds(timeline.span(from: .metadataCommitted, to: .dumpCommitted))
        dumpMilliseconds = milliseconds(timeline.span(from: .frozen, to: .dumpCommitted)).map { $0 - freezeOracle }
        restoreMilliseconds = milliseconds(timeline.span(from: .restoreStarted, to: .targetResumed)).map { $0 - targetOracle }
        downtimeMilliseconds = milliseconds(timeline.span(from: .frozen, to: .targetResumed)).map { $0 - freezeOracle - targetOracle }
        busyMilliseconds = milliseconds(timeline.span(from: .started, to: .victimReleased)).map { $0 - freezeOracle }
        totalMilliseconds = milliseconds(timeline.span(from: .started, to: .lastPageInstalled)
                                         ?? timeline.span(from: .started, to: .targetResumed)).map { $0 - freezeOracle - targetOracle }
        oracleMilliseconds = freezeOracle + targetOracle
        pageCount = timeline.counter("pagesDumped")
    }

    var text: String {
        func ms(_ value: Double?) -> String { value.map { String(format: "%.2f ms", $0) } ?? "n/a" }
        var lines = [
            "migration   \(mode) of \(program.joined(separator: " ")) after \(afterMilliseconds) ms",
            "prepare     \(ms(prepareMilliseconds)) (before the freeze: checks, FAM file allocated and pre-faulted)",
            "freeze      \(ms(freezeMilliseconds))",
            "dump        \(ms(dumpMilliseconds)) (pages alone: \(ms(pageDumpMilliseconds)))",
            "restore     \(ms(restoreMilliseconds))",
            "downtime    \(ms(downtimeMilliseconds))",
            "busy        \(ms(busyMilliseconds))",
            "total       \(ms(totalMilliseconds))",
            "pages       \(pageCount) (\(famByteCount) bytes through FAM, \(tcpByteCount) bytes over TCP)",
        ]
        if faultCount > 0 || !faultPaths.isEmpty {
            lines.append("faults      \(faultCount) (\(zeroPageCount) never-touched pages zero-filled)")
            for path in faultPaths {
                lines.append(String(format: "  %-13@ %6d  median %8.1f us  p99 %8.1f us  max %8.1f us", path.path as NSString,
                                    path.count, path.medianMicroseconds, path.p99Microseconds, path.maxMicroseconds))
            }
        }
        for verdict in verdicts {
            lines.append("oracle      \(verdict.name): \(verdict.passed ? "PASS" : "FAIL") (\(verdict.detail))")
        }
        return lines.joined(separator: "\n")
    }
}

/// Writes a report (`--json`) with mode 0644 whatever the umask: under umask 0 it would be 0666, and
/// anyone could rewrite the figures or verdicts another tool reads from it.
func writeReport(_ data: Data, to path: String) throws {
    try PrivateFile.write(path: path, bytes: Array(data), mode: 0o644)
}
