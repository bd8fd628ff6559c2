// Issue 11 (real programs): POSIX timers, inotify watches, a sealed mapped memfd and SysV shared memory
// (kernobjects.c) migrate in every mode they can, with the state oracle comparing each, so that a loss
// fails the run; what cannot migrate is refused before the freeze, the program left running.
import Foundation
import Glibc
import Testing
@testable import Engine
import Oracles
import Sys

struct KernelObjectCase: Sendable, CustomTestStringConvertible {
    var arguments: [String]
    var mode: String
    var push = "on"
    var testDescription: String { "kernobjects \(mode)\(mode == "nonlive" ? "" : " push \(push)") \(arguments.joined(separator: " "))" }

    /// Where the run freezes: after 250 ms, or (inotify) at the exit of a system call that comes after a
    /// round read its events back, so that none is queued (an event queued at the freeze is refused).
    var freeze: [String] = ["--after-ms", "250"]

    static let all: [KernelObjectCase] = [
        KernelObjectCase(arguments: ["--rounds", "60", "--pause-us", "10000", "--with", "timers,seals,sysv"], mode: "nonlive"),
        KernelObjectCase(arguments: ["--rounds", "60", "--pause-us", "10000", "--with", "timers,seals,sysv"], mode: "postcopy-socket"),
        KernelObjectCase(arguments: ["--rounds", "60", "--pause-us", "10000", "--with", "timers,seals,sysv"], mode: "postcopy-socket", push: "off"),
        KernelObjectCase(arguments: ["--rounds", "60", "--pause-us", "10000", "--with", "timers,seals,sysv"], mode: "postcopy-fam"),
        KernelObjectCase(arguments: ["--rounds", "60", "--pause-us", "10000", "--with", "timers,seals,sysv"], mode: "postcopy-fam", push: "off"),
    ] + ["nonlive", "postcopy-socket", "postcopy-fam"].map { mode in
        // System call 110 is the nanosleep after round 10 (109 and 111 are its neighbours in the round).
        KernelObjectCase(arguments: ["--rounds", "30", "--pause-us", "10000", "--with", "inotify"], mode: mode,
                         freeze: ["--freeze-at-syscall", "110"])
    }
}

extension ProcessTests {
    @Suite(.serialized) struct KernelObjectTests {
        @Test(arguments: KernelObjectCase.all) func kernelObjectsSurviveMigration(_ migration: KernelObjectCase) throws {
            try migrateProgram("kernobjects-static", arguments: migration.arguments,
                               runOptions: ["--mode", migration.mode, "--push", migration.push] + migration.freeze,
                               timeout: .seconds(90)) { report, _ in
                expectMigratedAsReference(report)
            }
        }

        /// Starts kernobjects with `arguments`, waits for its first round, migrates it in `mode` (nonlive:
        /// `checkpoint`; post-copy: `source` and `target`), and expects a refusal naming `message`, before
        /// the freeze: no image, the program running untouched.
        func refusal(_ arguments: [String], mode: String, expecting message: String) throws {
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = leftovers.own(try SpawnedProgram(try TestPaths.testProgram("kernobjects-static"), arguments,
                                                           standardOutputPath: directory.path("out"), standardErrorPath: directory.path("err")))
            #expect(pollUntil(timeout: .seconds(5)) { ((try? String(contentsOfFile: directory.path("out"), encoding: .utf8)) ?? "").contains("round 1 ok") })
            let famPath = directory.path("image.fam"), keyPath = directory.path("migration.key")
            try requireVictimAlive(program.processID)
            let outcome: CommandOutcome
            if mode == "nonlive" {
                outcome = try leftovers.fammig("checkpoint", "--pid", "\(program.processID)", "--fam", famPath, "--key-file", keyPath)
            } else {
                let port = 21000 + Int(getpid() % 2000)
                let source = leftovers.own(try StartedProcess(try TestPaths.fammig(),
                                                              ["source", "--pid", "\(program.processID)", "--mode", mode, "--listen", "127.0.0.1:\(port)",
                                                               "--key-file", keyPath, "--fam", famPath],
                                                              standardOutputPath: directory.path("source.out"), standardErrorPath: directory.path("source.err")))
                #expect(waitForKeyFile(keyPath), "the source wrote no key file")
                let target = try leftovers.fammig(["target", "--mode", mode, "--connect", "127.0.0.1:\(port)", "--key-file", keyPath, "--fam", famPath],
                                                  timeout: .seconds(60))
                #expect(target.exitStatus != 0, "the target restored something: \(target.standardOutput)")
                outcome = try source.waitForExit(timeout: .seconds(30))
            }
            #expect(outcome.exitStatus == 2 && !outcome.killedBySignal, "exit \(outcome.exitStatus): \(outcome.standardError)")
            #expect(outcome.standardError.contains(message), "\(outcome.standardError)")
            #expect(outcome.standardError.contains("left running untouched"), "\(outcome.standardError)")
            #expect(!FileManager.default.fileExists(atPath: famPath))
            #expect(untouchedProblem(program.processID) == nil, "\(untouchedProblem(program.processID) ?? "")")
            program.kill()
        }

        /// Inotify events queued at the freeze (system call 105 is in the middle of a round's file changes)
        /// cannot be read without taking them from the victim: refused right after the freeze, the victim
        /// let go untouched, and it ends as an unmigrated run does.
        @Test func queuedInotifyEventsAreRefused() throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = try TestPaths.testProgram("kernobjects-static")
            let arguments = ["--rounds", "30", "--pause-us", "10000", "--with", "inotify"]
            leftovers.expectProgram([program] + arguments)
            let outcome = try leftovers.fammig(["run", "--mode", "nonlive", "--freeze-at-syscall", "105", "--json", directory.path("report.json"), "--"]
                                               + [program] + arguments, timeout: .seconds(60))
            #expect(outcome.exitStatus == 2 && !outcome.killedBySignal, "exit \(outcome.exitStatus): \(outcome.standardError)")
            #expect(outcome.standardError.contains("of events queued, which cannot be read without taking them from the process"), "\(outcome.standardError)")
            #expect(outcome.standardError.contains("left running untouched"), "\(outcome.standardError)")
        }

        /// A victim in an IPC namespace of its own, as in a container: its segment is read in that namespace
        /// (/proc/sysvipc/shm lists the reader's; it was refused as "not listed"), and the restored process
        /// gets a fresh one, in which the state oracle finds the segment again under its ID.
        @Test(arguments: ["nonlive", "postcopy-fam", "postcopy-socket"])
        func sysvSegmentOfAVictimInItsOwnIPCNamespaceMigrates(_ mode: String) throws {
            try migrateProgram("kernobjects-static", arguments: ["--rounds", "60", "--pause-us", "10000", "--with", "sysv"],
                               runOptions: ["--mode", mode, "--after-ms", "250"], timeout: .seconds(90),
                               launcher: ["/usr/bin/unshare", "--ipc"]) { report, _ in
                expectMigratedAsReference(report)
            }
        }

        /// A descriptor on a /proc file names a process of this node by PID: refused before the freeze (it
        /// was taken for a regular file and reopened by its path, /proc/<the victim's PID>/status, on restore).
        @Test func aDescriptorOnAProcFileIsRefused() throws {
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = leftovers.own(try SpawnedProgram("/bin/sh", ["-c", "exec 7</proc/self/status; exec /bin/sleep 30"],
                                                           standardOutputPath: directory.path("out"), standardErrorPath: directory.path("err")))
            #expect(pollUntil(timeout: .seconds(5)) { (try? ProcFS.readLink("/proc/\(program.processID)/exe")) == "/usr/bin/sleep" })
            try expectCheckpointRefusedUntouched(program.processID, saying: "a file of /proc", directory: directory, leftovers: leftovers)
            program.kill()
        }

        /// A POSIX message queue's descriptor shows as "/name" (its path in the mqueue file system): it was
        /// taken for a regular file of that path, so the checkpoint killed the victim and the restore then
        /// found no /name (or would have opened another file of that name). Refused before the freeze: a
        /// descriptor reopened by path must be the file its path names here.
        @Test func aPOSIXMessageQueueIsRefusedUntouched() throws {
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = leftovers.own(try SpawnedProgram(try TestPaths.testProgram("kernobjects-static"),
                                                           ["--rounds", "400", "--pause-us", "20000", "--with", "mqueue"],
                                                           standardOutputPath: directory.path("out"), standardErrorPath: directory.path("err")))
            #expect(pollUntil(timeout: .seconds(5)) {
                ((try? ProcFS.descriptors(program.processID)) ?? []).contains { (try? ProcFS.readLink("/proc/\(program.processID)/fd/\($0)"))?.hasPrefix("/fammig-kernobjects-") == true }
            })
            try requireVictimAlive(program.processID)
            try expectCheckpointRefusedUntouched(program.processID, saying: "a POSIX message queue", directory: directory, leftovers: leftovers)
        }

        /// `fammig checkpoint` of `victim` is exit 2 naming `reason`, writes no image, and leaves it untouched.
        private func expectCheckpointRefusedUntouched(_ victim: ProcessID, saying reason: String, directory: ScratchDirectory,
                                                      leftovers: LeftoverCheck, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let famPath = directory.path("image.fam"), keyPath = directory.path("migration.key")
            let outcome = try leftovers.fammig("checkpoint", "--pid", "\(victim)", "--fam", famPath, "--key-file", keyPath)
            #expect(outcome.exitStatus == 2 && !outcome.killedBySignal, "exit \(outcome.exitStatus): \(outcome.standardError)", sourceLocation: sourceLocation)
            #expect(outcome.standardError.contains(reason), "\(outcome.standardError)", sourceLocation: sourceLocation)
            #expect(outcome.standardError.contains("left running untouched"), "\(outcome.standardError)", sourceLocation: sourceLocation)
            #expect(!FileManager.default.fileExists(atPath: famPath), sourceLocation: sourceLocation)
            #expect(untouchedProblem(victim) == nil, "\(untouchedProblem(victim) ?? "")", sourceLocation: sourceLocation)
        }

        /// A SysV segment not marked for removal would outlive the process at the source: refused.
        @Test func sysvSegmentThatOutlivesTheProcessIsRefused() throws {
            let key = 0x6661_0000 + Int32(getpid() & 0xffff)
            defer { removeSysVSegment(key: key) }
            try refusal(["--rounds", "400", "--pause-us", "20000", "--with", "sysvkey", "--shm-key", "\(key)"], mode: "nonlive",
                        expecting: "is not marked for removal, so it would outlive the process")
        }
    }
}

@Suite struct KernelObjectStateTests {
    func objectState() -> ProcessState {
        var state = plausibleState(processID: ProcessID(4242), dataRange: 0x7f00_0000_0000..<0x7f00_0001_0000)
        state.context.posixTimers = [
            PosixTimer(id: 0, clock: 1, notification: .signal, signal: 10, value: 0xa11ce, valueNanoseconds: 1_000_000, intervalNanoseconds: 2_000_000),
            PosixTimer(id: 2, clock: 0, notification: .none, signal: 1, value: 2, valueNanoseconds: 3_000_000_000_000),
            PosixTimer(id: 4, clock: 0, notification: .thread(ProcessID(4242)), signal: 26, value: 4, valueNanoseconds: 3_000_000_000_000,
                       intervalNanoseconds: 1_800_000_000_000),
            PosixTimer(id: 5, clock: 7, notification: .signal, signal: 23, value: 5),
        ]
        let sealed = SharedMemory(object: 0, memfdName: "fammig-sealed", byteCount: 4 * 4096, seals: 0x17, mode: 0o640, userID: 1000, groupID: 100)
        let segment = SharedMemory(object: 1, memfdName: nil, byteCount: 5 * 4096,
                                   sysv: SysVSegment(identifier: 31, byteCount: 5 * 4096, mode: 0o640, userID: 0, groupID: 0, markedForRemoval: true))
        state.mappings += [
            Mapping(start: 0x7f10_0000_0000, end: 0x7f10_0000_4000, readable: true, writable: true, executable: false, shared: true,
                    fileOffset: 0, kind: .sharedMemory(sealed)),
            Mapping(start: 0x7f10_0001_0000, end: 0x7f10_0001_5000, readable: true, writable: true, executable: false, shared: true,
                    fileOffset: 0, kind: .sharedMemory(segment)),
        ]
        state.mappings.sort { $0.start < $1.start }
        return state
    }

    @Test func kernelObjectsRoundTripThroughTheImageEncoding() throws {
        let state = objectState()
        let decoded = try ProcessState.decode(state.encoded())
        #expect(decoded == state)
        try decoded.validate(pageAddresses: [0x7f10_0000_0000, 0x7f10_0001_0000], path: "test")
    }

    /// Each loss the state oracle must name: a timer gone, one re-armed with its full time, another clock,
    /// a seal lost, a SysV segment with another ID.
    @Test func oracleNamesEachLoss() {
        let checkpointed = objectState()
        #expect(StateOracle.compare(checkpointed: checkpointed, restored: checkpointed).isEmpty)
        let cases: [(String, (inout ProcessState) -> Void)] = [
            ("POSIX timers", { $0.context.posixTimers.removeLast() }),
            ("POSIX timer 2 time left", { $0.context.posixTimers[1].valueNanoseconds += 10_000_000_000 }),
            ("POSIX timer 2 time left", { $0.context.posixTimers[1].valueNanoseconds = 0 }),
            ("POSIX timer 4", { $0.context.posixTimers[2].clock = 1 }),
            ("POSIX timer 4", { $0.context.posixTimers[2].notification = .signal }),
            ("POSIX timer 0", { $0.context.posixTimers[0].value = 1 }),
            ("memory layout", { state in
                let index = state.mappings.firstIndex { $0.start == 0x7f10_0000_0000 }!
                state.mappings[index].kind = .sharedMemory(SharedMemory(object: 0, memfdName: "fammig-sealed", byteCount: 4 * 4096, seals: 0x16,
                                                                        mode: 0o640, userID: 1000, groupID: 100))
            }),
            ("memory layout", { state in
                let index = state.mappings.firstIndex { $0.start == 0x7f10_0000_0000 }!
                state.mappings[index].kind = .sharedMemory(SharedMemory(object: 0, memfdName: "fammig-sealed", byteCount: 4 * 4096, seals: 0x17))
            }),
            ("memory layout", { state in
                let index = state.mappings.firstIndex { $0.start == 0x7f10_0001_0000 }!
                state.mappings[index].kind = .sharedMemory(SharedMemory(object: 1, memfdName: nil, byteCount: 5 * 4096,
                    sysv: SysVSegment(identifier: 32, byteCount: 5 * 4096, mode: 0o640, userID: 0, groupID: 0, markedForRemoval: true)))
            }),
        ]
        for (field, damage) in cases {
            var restored = checkpointed
            damage(&restored)
            let fields = StateOracle.compare(checkpointed: checkpointed, restored: restored).map(\.field)
            #expect(fields.contains(field), "\(field): \(fields)")
        }
    }

    /// A periodic timer may have expired between its restore and the read-back: its time left wraps
    /// within its period, and its signal may be pending once more.
    @Test func oracleAllowsAPeriodicTimerThatFired() {
        var checkpointed = objectState()
        checkpointed.sharedPendingSignals = [PendingSignal(shared: true, siginfo: [10] + [UInt8](repeating: 0, count: 127))]
        var restored = checkpointed
        restored.context.posixTimers[0].valueNanoseconds = 1_900_000
        restored.sharedPendingSignals += checkpointed.sharedPendingSignals
        #expect(StateOracle.compare(checkpointed: checkpointed, restored: restored).isEmpty)
        restored.sharedPendingSignals = []
        #expect(StateOracle.compare(checkpointed: checkpointed, restored: restored).map(\.field) == ["shared pending signals"])
    }

    @Test func timerListParsesAndRefuses() throws {
        let text = """
        ID: 4
        signal: 26/0000000000000004
        notify: signal/tid.77
        ClockID: 0
        ID: 0
        signal: 10/00000000000a11ce
        notify: signal/pid.77
        ClockID: 1
        ID: 2
        signal: 1/0000000000000002
        notify: none/pid.77
        ClockID: 0

        """
        let timers = try PosixTimerReader.parse(text) { $0 == ProcessID(77) ? ProcessID(1) : nil }
        #expect(timers.map(\.id) == [0, 2, 4])
        #expect(timers[0] == PosixTimer(id: 0, clock: 1, notification: .signal, signal: 10, value: 0xa11ce))
        #expect(timers[1].notification == .none)
        #expect(timers[2].notification == .thread(ProcessID(1)))
        let refused: [(String, String)] = [
            ("ID: 1\nsignal: 10/0\nnotify: signal/pid.77\nClockID: 2\n", "runs on clock 2"),
            ("ID: 1\nsignal: 10/0\nnotify: signal/tid.78\nClockID: 1\n", "which is not one of its threads"),
            ("ID: 1\nsignal: 10/0\nnotify: thread/pid.77\nClockID: 1\n", "notifies by thread/pid.77"),
            ("ID: 1\nsignal: 10/0\n", "ends in the middle of timer 1"),
            ("ID: x\n", "is not understood"),
        ]
        for (text, reason) in refused {
            do {
                _ = try PosixTimerReader.parse(text) { $0 == ProcessID(77) ? ProcessID(1) : nil }
                Issue.record("accepted \(text)")
            } catch let refusal as PosixTimerReader.TimerRefusal {
                #expect(refusal.reason.contains(reason), "\(refusal.reason)")
            }
        }
    }

    @Test func inconsistentKernelObjectsAreRejected() {
        let cases: [(String, (inout ProcessState) -> Void)] = [
            ("out of order or repeated", { $0.context.posixTimers.swapAt(0, 1) }),
            ("has clock 2", { $0.context.posixTimers[0].clock = 2 }),
            ("which the process does not have", { $0.context.posixTimers[2].notification = .thread(ProcessID(9)) }),
            ("beyond timer_settime's range", { $0.context.posixTimers[1].valueNanoseconds = .max }),
            ("signals 0", { $0.context.posixTimers[0].signal = 0 }),
            ("not a whole attach of a SysV segment marked for removal", { state in
                let index = state.mappings.firstIndex { $0.start == 0x7f10_0001_0000 }!
                state.mappings[index].kind = .sharedMemory(SharedMemory(object: 1, memfdName: nil, byteCount: 5 * 4096,
                    sysv: SysVSegment(identifier: 31, byteCount: 5 * 4096, mode: 0o640, userID: 0, groupID: 0, markedForRemoval: false)))
            }),
        ]
        for (reason, damage) in cases {
            var state = objectState()
            damage(&state)
            do {
                let decoded = try ProcessState.decode(state.encoded())
                try decoded.validate(pageAddresses: [], path: "test")
                Issue.record("accepted a state: \(reason)")
            } catch {
                #expect("\(error)".contains(reason), "\(error)")
            }
        }
    }
}
