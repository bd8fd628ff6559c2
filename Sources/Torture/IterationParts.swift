// What an iteration is run with and gives back, the programs' start at their rendezvous, and the observer
// torture hands the engine: the parts Iteration.swift's one long function uses.
import Engine
import Foundation
import Logging
import Oracles
import Sys

/// Where an iteration finds its programs and puts its files.
public struct TortureEnvironment: Sendable {
    public var programDirectory: String
    /// The executable the restorer starts stopped at exec and turns into the target.
    public var stubPath: String
    public var workDirectory: String
    /// Real time the target may run without a fault or an exit before it counts as hung.
    public var targetRunLimit: Duration = .seconds(20)
    public var stepLimit = 400_000
    /// Wraps the source node's FAM view (torture's own tests break it on purpose to see the checker
    /// catch it); nil in campaigns.
    public var sourceFAMWrapper: (@Sendable (any FAMBackend) -> any FAMBackend)?

    public init(programDirectory: String, stubPath: String, workDirectory: String) {
        self.programDirectory = programDirectory
        self.stubPath = stubPath
        self.workDirectory = workDirectory
    }
}

/// One iteration's verdict.
public struct IterationResult: Sendable, Codable {
    public var scenario: Scenario
    public var passed: Bool
    /// Oracle failures, each naming its oracle; empty when passed.
    public var failures: [String]
    /// An environment problem (not a verdict on the engine): a program that cannot start, a full disk.
    public var environmentError: String?
    public var traceHash: String
    public var stepCount: Int
    /// completed, or how the migration ended otherwise.
    public var outcome: String
    /// When the nemesis killed the source: the image state the target could see then.
    public var killedAt: String?
    public var milliseconds: Double
    /// The schedule, when asked for.
    public var trace: [String]?
    /// Who moved at each step, with the trace (what `--schedule` replays).
    public var picks: [SchedulePick]?
    /// A failed iteration: the step at which the first oracle fired (an oracle that judges the end, at the
    /// last step), and which.
    public var oracleStep: Int?
    public var oracleName: String?
}

/// The reference output of each program configuration, computed once per campaign.
public final class ReferenceCache: @unchecked Sendable {
    private let lock = NSLock()
    private var outputs: [String: [UInt8]] = [:]
    /// Reference runs of workloads (Workload.swift).
    let workloads = WorkloadReferences()

    public init() {}

    func output(binary: String, arguments: [String], workDirectory: String, wait: RendezvousWait = .sigwait) throws -> [UInt8] {
        let key = ([binary] + arguments).joined(separator: " ")
        if let cached = lock.withLock({ outputs[key] }) { return cached }
        let path = workDirectory + "/reference.out"
        let processID = try startAtRendezvous(binary: binary, arguments: arguments, outputPath: path,
                                              errorPath: workDirectory + "/reference.err", wait: wait)
        Spawn.kill(processID, signal: wait.releaseSignal)
        let status = try Spawn.waitForExit(processID)
        guard status == .exited(0) else {
            throw TortureError.environment("the unmigrated reference run of \(key) \(status): \(firstLine(workDirectory + "/reference.err"))")
        }
        let bytes = try ProcFS.readFile(path)
        lock.withLock { outputs[key] = bytes }
        return bytes
    }
}

func firstLine(_ path: String) -> String {
    let text = (try? ProcFS.readText(path)) ?? ""
    return text.split(separator: "\n").first.map(String.init) ?? "(no stderr)"
}

/// Starts a test program as pid 1 of its own PID namespace, without address randomisation, and waits
/// until it blocks at its rendezvous (in rt_sigtimedwait for SIGUSR2, or the call `wait` names).
/// `repeatable` (no address randomisation) also makes it die with the thread that started it (PDEATHSIG).
func startAtRendezvous(binary: String, arguments: [String], outputPath: String, errorPath: String,
                       repeatable: Bool = true, wait: RendezvousWait = .sigwait) throws -> ProcessID {
    let noRandomisation: UInt32? = repeatable ? 0x0040000 : nil  // ADDR_NO_RANDOMIZE
    let processID: ProcessID
    do {
        processID = try Spawn.programInNewPIDNamespace(path: binary, arguments: arguments, environment: ["PATH=/usr/bin:/bin"],
                                                      standardOutputPath: outputPath, standardErrorPath: errorPath,
                                                      personality: noRandomisation)
    } catch { throw TortureError.environment("cannot start \(binary): \(error)") }
    let clock = ContinuousClock()
    let start = clock.now
    // A bound for a program that never gets there, not a speed check: at load 8 to 11 on two cores (five
    // builds and test runs beside the gate) `tree` took more than 10 s to have every process waiting,
    // and the gate reported an environment error for a regression seed that passes.
    while clock.now - start < rendezvousTimeLimit {
        if Spawn.hasEnded(processID) {
            let status = (try? Spawn.waitForExit(processID)).map { "\($0)" } ?? "ended"
            throw TortureError.environment("\(binary) \(arguments.joined(separator: " ")) \(status) before its rendezvous: \(firstLine(errorPath))")
        }
        if wait.isBlocked(processID, thread: processID), otherThreadsWait(processID) {
            return processID
        }
        usleep(100)
    }
    Spawn.kill(processID)
    _ = try? Spawn.waitForExit(processID)
    throw TortureError.environment("\(binary) never reached its rendezvous within \(rendezvousTimeLimit)")
}

/// How long a started program may take to reach its rendezvous (real time).
let rendezvousTimeLimit: Duration = .seconds(60)

/// Every thread but the main one sleeps in a futex wait (a worker waiting for the round the rendezvous
/// holds back). Until then a freeze would catch the workers wherever they are, and the image would
/// differ from run to run.
func otherThreadsWait(_ processID: ProcessID) -> Bool {
    guard let threads = try? ProcFS.threadIDs(processID) else { return false }
    for thread in threads where thread != processID {
        guard ProcFS.currentSyscall(processID, thread: thread) == SyscallNumber.futex,
              ProcFS.threadWait(processID, thread: thread) == .futex else { return false }
    }
    return true
}

/// The observer torture gives the engine: every oracle, plus a note of each installed page for the trace.
final class TortureObserver: MigrationObserver, @unchecked Sendable {
    /// The target runs only in its own steps, so the oracle may also read every installed page back.
    let oracles = MigrationOracles(readsBackInstalledPages: true)
    let notes = StepNotes()
    /// The driver's step, for the moment an oracle fires.
    var currentStep = 0
    /// The first oracle that failed during the schedule, and at which step.
    private(set) var firstFailure: (step: Int, oracle: String)?

    private func noteFailure() {
        guard firstFailure == nil, let failing = oracles.verdicts.first(where: { !$0.passed }) else { return }
        firstFailure = (currentStep, failing.name)
    }

    func victimFrozen(processID: ProcessID, state: ProcessState, pageAddresses: [UInt64]) throws {
        try oracles.victimFrozen(processID: processID, state: state, pageAddresses: pageAddresses)
    }

    func targetReady(processID: ProcessID, checkpointed: ProcessState, restored: ProcessState) throws {
        defer { noteFailure() }
        try oracles.targetReady(processID: processID, checkpointed: checkpointed, restored: restored)
    }

    func pagesInstalled(processID: ProcessID, address: UInt64, targetAddress: UInt64, byteCount: Int, installedBytes: [UInt8]?) throws {
        notes.noteInstalled(address)
        do {
            try oracles.pagesInstalled(processID: processID, address: address, targetAddress: targetAddress, byteCount: byteCount,
                                       installedBytes: installedBytes)
        } catch {
            noteFailure()
            throw error
        }
    }
}
