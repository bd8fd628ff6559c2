// Issue 11, item 5: the process context (cwd, umask, oom_score_adj, dumpable, THP-disable, sigaltstack,
// interval timers, membarrier registrations, madvise flags)
// survives a migration in every mode, with the state oracle comparing each field, so that a loss fails the
// run instead of passing it; what cannot be restored is refused before the freeze.
import Foundation
import Glibc
import Testing
@testable import Engine
import Oracles
import Sys

struct ContextCase: Sendable, CustomTestStringConvertible {
    var program: String
    var arguments: [String]
    var mode: String
    var push = "on"
    var testDescription: String { "\(program) \(mode)\(mode == "nonlive" ? "" : " push \(push)") \(arguments.joined(separator: " "))" }

    static let all: [ContextCase] = ["nonlive", "postcopy-socket", "postcopy-fam"].flatMap { mode in
        [ContextCase(program: "context-static", arguments: ["--rounds", "60", "--pause-us", "10000", "--umask", "027", "--oom", "345",
                                                            "--dumpable", "0", "--thp", "1", "--autodisarm", "0"], mode: mode),
         ContextCase(program: "context", arguments: ["--rounds", "60", "--pause-us", "10000", "--umask", "077", "--oom", "900",
                                                     "--dumpable", "0", "--thp", "3", "--autodisarm", "1", "--thread", "1"], mode: mode),
         // A SIGALRM every 5 ms must keep coming, and the CPU timers stay armed.
         ContextCase(program: "context-static", arguments: ["--rounds", "60", "--pause-us", "10000", "--itimers", "1", "--alarm-ms", "5"],
                     mode: mode),
         // Eight pages with a madvise flag each, and three membarrier registrations, checked every round.
         ContextCase(program: "context", arguments: ["--rounds", "60", "--pause-us", "10000", "--advise", "1"], mode: mode)]
    }.flatMap { migration in
        migration.mode == "nonlive" ? [migration] : [migration, ContextCase(program: migration.program, arguments: migration.arguments,
                                                                             mode: migration.mode, push: "off")]
    }
}

extension ProcessTests {
    @Suite(.serialized) struct ContextTests {
        @Test(arguments: ContextCase.all) func contextSurvivesMigration(_ migration: ContextCase) throws {
            try migrateProgram(migration.program, arguments: migration.arguments,
                               runOptions: ["--mode", migration.mode, "--push", migration.push, "--after-ms", "250"],
                               timeout: .seconds(90)) { report, _ in
                expectMigratedAsReference(report)
            }
        }

        /// A chrooted process comes back with its root (chroot once everything that opens by path is
        /// open), in every mode; the state oracle compares the root directory (the root holds no /proc,
        /// so the program is sleeper, which needs none).
        @Test(arguments: ["nonlive", "postcopy-socket", "postcopy-fam"]) func aChrootedProcessMigratesWithItsRoot(_ mode: String) throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let root = try ScratchDirectory(under: "/tmp")
            defer { root.remove() }
            try FileManager.default.copyItem(atPath: try TestPaths.testProgram("sleeper-static"), toPath: root.path("sleeper-static"))
            let arguments = ["--rounds", "30", "--sleep-ms", "20"]
            leftovers.expectProgram(["/sleeper-static"] + arguments)
            let report = try runAndJudge(leftovers: leftovers, directory: directory, runOptions: ["--mode", mode, "--after-ms", "250"],
                                         command: ["/usr/sbin/chroot", root.path, "/sleeper-static"] + arguments, timeout: .seconds(90))
            #expect(report.error == nil)
            #expect(report.programStatus == "exited with status 0")
            #expect(report.migratedChecksum != nil && report.migratedChecksum == report.referenceChecksum)
        }

        /// mlock cannot be given back (locking again faults every page in, and post-copy's pages are not
        /// there yet): refused before the freeze, the program left running untouched (checkpoint), and by
        /// `run` in both post-copy modes (a source waits for its target before it looks at the process).
        @Test(arguments: ["nonlive", "postcopy-socket", "postcopy-fam"]) func aLockedMappingIsRefusedUntouched(_ mode: String) throws {
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = try TestPaths.testProgram("context-static")
            let arguments = ["--rounds", "400", "--pause-us", "20000", "--mlock", "1"]
            let outcome: CommandOutcome
            if mode == "nonlive" {
                let victim = leftovers.own(try SpawnedProgram(program, arguments, standardOutputPath: directory.path("out"),
                                                              standardErrorPath: directory.path("err")))
                #expect(pollUntil(timeout: .seconds(5)) { ((try? String(contentsOfFile: directory.path("out"), encoding: .utf8)) ?? "").contains("round 1/") })
                try requireVictimAlive(victim.processID)
                outcome = try leftovers.fammig("checkpoint", "--pid", "\(victim.processID)", "--fam", directory.path("image.fam"),
                                               "--key-file", directory.path("migration.key"))
                #expect(untouchedProblem(victim.processID) == nil, "\(untouchedProblem(victim.processID) ?? "")")
            } else {
                leftovers.expectProgram([program] + arguments)
                outcome = try leftovers.fammig(["run", "--mode", mode, "--", program] + arguments, timeout: .seconds(90))
            }
            #expect(outcome.exitStatus == 2 && !outcome.killedBySignal, "exit \(outcome.exitStatus): \(outcome.standardError)")
            #expect(outcome.standardError.contains("locked in memory (mlock)"), "\(outcome.standardError)")
        }

        /// A working directory that was deleted has no path to restore it by: refused before the freeze.
        @Test func deletedWorkingDirectoryIsRefused() throws {
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let workingDirectory = try ScratchDirectory(under: "/tmp")
            defer { workingDirectory.remove() }
            // A shell that moves into the directory, which is then removed under it; `exec sleep` keeps the cwd.
            let sleeper = leftovers.own(try SpawnedProgram("/bin/sh", ["-c", "cd \(workingDirectory.path) && exec /bin/sleep 30"],
                                                           standardOutputPath: directory.path("out"), standardErrorPath: directory.path("err")))
            #expect(pollUntil(timeout: .seconds(5)) {
                (try? ProcFS.readLink("/proc/\(sleeper.processID)/exe")) == "/usr/bin/sleep"
                    && (try? ProcFS.readLink("/proc/\(sleeper.processID)/cwd")) == workingDirectory.path
            })
            workingDirectory.remove()
            try requireVictimAlive(sleeper.processID)
            let outcome = try leftovers.fammig("checkpoint", "--pid", "\(sleeper.processID)", "--fam", directory.path("image.fam"),
                                               "--key-file", directory.path("migration.key"))
            #expect(outcome.exitStatus == 2 && !outcome.killedBySignal, "exit \(outcome.exitStatus): \(outcome.standardError)")
            #expect(outcome.standardError.contains("working directory \(workingDirectory.path) was deleted"), "\(outcome.standardError)")
            #expect(untouchedProblem(sleeper.processID) == nil, "\(untouchedProblem(sleeper.processID) ?? "")")
        }
    }
}

// MARK: The oracle and the image format, without processes

@Suite struct ContextStateTests {
    func contextState() -> ProcessState {
        var state = plausibleState(processID: ProcessID(4242), dataRange: 0x7f00_0000_0000..<0x7f00_0001_0000)
        state.context.workingDirectory = "/srv/work dir"
        state.context.rootDirectory = "/srv"
        state.context.fileCreationMask = 0o027
        state.context.oomScoreAdjustment = 345
        state.context.dumpable = 0
        state.context.transparentHugePagesDisabled = 3
        state.context.membarrierRegistrations = 0x150
        state.mappings[0].advice = [.dontFork, .wipeOnFork, .hugePage]
        state.threads[0].signalStack = SignalStack(address: 0x7f00_0000_4000, byteCount: 65536, flags: SignalStack.autoDisarmFlag)
        state.context.intervalTimers = [IntervalTimer(kind: .real, intervalMicroseconds: 5000, valueMicroseconds: 3000),
                                        IntervalTimer(kind: .virtual, intervalMicroseconds: 0, valueMicroseconds: 3_600_000_000),
                                        IntervalTimer(kind: .profiling, intervalMicroseconds: 0, valueMicroseconds: 0)]
        return state
    }

    @Test func contextRoundTripsThroughTheImageEncoding() throws {
        let state = contextState()
        let decoded = try ProcessState.decode(state.encoded())
        #expect(decoded == state)
        #expect(decoded.context.workingDirectory == "/srv/work dir")
        #expect(decoded.threads[0].signalStack.byteCount == 65536)
        #expect(decoded.mappings[0].advice == [.dontFork, .wipeOnFork, .hugePage])
        try decoded.validate(pageAddresses: [], path: "test")
    }

    /// An image asking for a flag the restorer cannot give (mlock, mseal) or does not know is refused.
    @Test func adviceTheRestorerCannotGiveIsRefusedByTheDecoder() {
        for advice in [MappingAdvice.locked, .sealed, MappingAdvice(rawValue: 1 << 15)] {
            var state = contextState()
            state.mappings[0].advice = advice
            #expect(throws: ImageError.self) { try ProcessState.decode(state.encoded()) }
        }
    }

    /// VmFlags' mnemonics map to the flags, whatever else the line holds.
    @Test func adviceIsReadFromVmFlagsMnemonics() {
        #expect(MappingAdvice(mnemonics: "rd wr mr mw me dc ac wf um uw".split(separator: " ")) == [.dontFork, .wipeOnFork])
        #expect(MappingAdvice(mnemonics: ["rd", "lo", "sl", "nr"]) == [.locked, .sealed])
        #expect(MappingAdvice(mnemonics: [String]()) == [])
    }

    /// Each lost field is named by the oracle (the oracle can fail).
    @Test func oracleNamesEachLostContextField() {
        let checkpointed = contextState()
        let losses: [(String, (inout ProcessState) -> Void)] = [
            ("working directory", { $0.context.workingDirectory = "/" }),
            ("root directory", { $0.context.rootDirectory = "/" }),
            ("umask", { $0.context.fileCreationMask = 0o022 }),
            ("oom_score_adj", { $0.context.oomScoreAdjustment = 0 }),
            ("dumpable", { $0.context.dumpable = 1 }),
            ("THP disable", { $0.context.transparentHugePagesDisabled = 0 }),
            ("membarrier registrations", { $0.context.membarrierRegistrations = 0x10 }),
            ("memory layout", { $0.mappings[0].advice = [.dontFork, .hugePage] }),
            ("memory layout", { $0.mappings[0].mayWrite = false; $0.mappings[0].writable = false }),
            ("thread 4242 sigaltstack", { $0.threads[0].signalStack = .disabled }),
            ("interval timer virtual time left", { $0.context.intervalTimers[1].valueMicroseconds = 0 }),
            ("interval timer virtual time left", { $0.context.intervalTimers[1].valueMicroseconds = 1_000_000_000 }),
            ("interval timer real interval", { $0.context.intervalTimers[0].intervalMicroseconds = 0 }),
            ("interval timer profiling armed", { $0.context.intervalTimers[2].valueMicroseconds = 10 }),
        ]
        #expect(StateOracle.compare(checkpointed: checkpointed, restored: checkpointed).isEmpty)
        for (field, lose) in losses {
            var restored = checkpointed
            lose(&restored)
            #expect(StateOracle.compare(checkpointed: checkpointed, restored: restored).map(\.field) == [field])
        }
    }

    /// A timer may run on (or expire, its signal then pending) between the restore and the oracle's
    /// reading; a one-shot timer that is simply off was lost, not expired.
    @Test func oracleAllowsWhatTimersDoMeanwhile() {
        let checkpointed = contextState()
        var ranOn = checkpointed
        ranOn.context.intervalTimers[0].valueMicroseconds = 1000   // 2 ms later
        ranOn.context.intervalTimers[1].valueMicroseconds += 4000  // setitimer's extra tick
        #expect(StateOracle.compare(checkpointed: checkpointed, restored: ranOn).isEmpty)
        var reloaded = checkpointed
        reloaded.context.intervalTimers[0].valueMicroseconds = 4500  // expired and reloaded; SIGALRM pending
        reloaded.sharedPendingSignals.append(PendingSignal(shared: true, siginfo: [14] + Array(repeating: 0, count: 127)))
        #expect(StateOracle.compare(checkpointed: checkpointed, restored: reloaded).isEmpty)
        // ITIMER_REAL re-arms only when its SIGALRM is taken: expired in a stopped process, it shows 0 left.
        var awaitingDequeue = reloaded
        awaitingDequeue.context.intervalTimers[0].valueMicroseconds = 0
        #expect(StateOracle.compare(checkpointed: checkpointed, restored: awaitingDequeue).isEmpty)
        // Read with 1 us left, it expired before the pending signals were read: SIGALRM pending too.
        var firedAfterItsRead = checkpointed
        firedAfterItsRead.context.intervalTimers[0].valueMicroseconds = 1
        firedAfterItsRead.sharedPendingSignals.append(PendingSignal(shared: true, siginfo: [14] + Array(repeating: 0, count: 127)))
        #expect(StateOracle.compare(checkpointed: checkpointed, restored: firedAfterItsRead).isEmpty)
        var periodicLost = checkpointed
        periodicLost.context.intervalTimers[0].valueMicroseconds = 0
        #expect(StateOracle.compare(checkpointed: checkpointed, restored: periodicLost).map(\.field) == ["interval timer real time left"])

        var oneShot = checkpointed
        oneShot.context.intervalTimers[0] = IntervalTimer(kind: .real, intervalMicroseconds: 0, valueMicroseconds: 3000)
        var lost = oneShot
        lost.context.intervalTimers[0].valueMicroseconds = 0
        #expect(StateOracle.compare(checkpointed: oneShot, restored: lost).map(\.field) == ["interval timer real time left"])
        var expired = lost
        expired.sharedPendingSignals.append(PendingSignal(shared: true, siginfo: [14] + Array(repeating: 0, count: 127)))
        #expect(StateOracle.compare(checkpointed: oneShot, restored: expired).isEmpty)
        // An extra SIGALRM with no timer that could have sent it is a mismatch.
        var stray = checkpointed
        stray.context.intervalTimers[0] = IntervalTimer(kind: .real, intervalMicroseconds: 0, valueMicroseconds: 0)
        var strayRestored = stray
        strayRestored.sharedPendingSignals.append(PendingSignal(shared: true, siginfo: [14] + Array(repeating: 0, count: 127)))
        #expect(StateOracle.compare(checkpointed: stray, restored: strayRestored).map(\.field) == ["shared pending signals"])
    }

    /// What the restorer could not set is refused when the image is read, before any process exists.
    @Test func unrestorableContextIsRejected() {
        let cases: [(String, (inout ProcessState) -> Void)] = [
            ("is not an absolute path", { $0.context.workingDirectory = "relative/dir" }),
            ("holds a NUL byte", { $0.context.workingDirectory = "/tmp/a\u{0}b" }),
            ("beyond 0o777", { $0.context.fileCreationMask = 0o1777 }),
            ("outside -1000...1000", { $0.context.oomScoreAdjustment = 1001 }),
            ("is not 0 or 1", { $0.context.dumpable = 2 }),
            ("is not 0, 1 or 3", { $0.context.transparentHugePagesDisabled = 2 }),
            ("is not inside user space", { $0.threads[0].signalStack.address = AddressSpace.userSpaceEnd - 4096 }),
            ("smaller than MINSIGSTKSZ", { $0.threads[0].signalStack.byteCount = 1024 }),
            ("flags sigaltstack does not take", { $0.threads[0].signalStack.flags = 4 }),
            ("disabled but not empty", { $0.threads[0].signalStack = SignalStack(address: 0x1000, byteCount: 0, flags: SignalStack.disableFlag) }),
            ("not real, virtual, profiling", { $0.context.intervalTimers.removeLast() }),
            ("beyond setitimer's range", { $0.context.intervalTimers[0].valueMicroseconds = UInt64.max }),
        ]
        for (reason, damage) in cases {
            var state = contextState()
            damage(&state)
            do {
                let decoded = try ProcessState.decode(state.encoded())
                try decoded.validate(pageAddresses: [], path: "test")
                Issue.record("accepted a state whose context \(reason)")
            } catch {
                #expect("\(error)".contains(reason), "\(error)")
            }
        }
    }

    /// A state encoded by an earlier format (2, 3) is refused by its version, not misread.
    @Test(arguments: [UInt8(2), 3]) func previousEncodingIsRefusedByVersion(_ version: UInt8) {
        var bytes = contextState().encoded()
        bytes[0] = version
        #expect(throws: ImageError.self) { try ProcessState.decode(bytes) }
    }
}
