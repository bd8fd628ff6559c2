// Issue 12 items 3 and 4: before the commit record the victim is the only copy of the process, so a
// source that dies then (SIGKILL included) must leave it running on as it was; after the commit record
// the image is the process and the victim dies with its source. The source's tracer seizes without
// PTRACE_O_EXITKILL, freezes the victim in a group-stop, and a guard process puts back what it changed
// (FrozenVictim.swift, Sys/SourceGuard.swift). On real processes: `fammig checkpoint` killed at named
// points (`--die-at`), killed from outside during a long dump, and a tracer lost in the middle of an
// injected query.
import Foundation
import Glibc
import Testing
@testable import Engine
import Sys

extension ProcessTests {
    @Suite(.serialized) struct SourceDeathTests {
        static let program = "memwalk-static"

        /// The unmigrated run's checksum of `arguments`.
        static func referenceChecksum(_ arguments: [String], program: String = SourceDeathTests.program) throws -> String {
            let reference = try runCommand(try TestPaths.testProgram(program), arguments, timeout: .seconds(120))
            let line = try #require(reference.standardOutput.split(separator: "\n").last { $0.hasPrefix("checksum=") })
            return String(line.dropFirst("checksum=".count))
        }

        /// Whether a thread of `tracer` (the tracer is a thread, TracerPid names it) traces `processID`.
        static func isTraced(_ processID: ProcessID, by tracer: ProcessID) -> Bool {
            guard let tracerThread = (try? ProcFS.status(processID))?["TracerPid"], tracerThread != "0" else { return false }
            return ProcFS.exists("/proc/\(tracer)/task/\(tracerThread)")
        }

        /// Guards of dead sources have done their work and exited. Only this build's fammig's: other
        /// clones and suites run guards of their own at the same time (torture's, a test runner's).
        static func guardProcesses() -> [ProcessID] {
            let fammig = (try? TestPaths.fammig()).map { URL(fileURLWithPath: $0).resolvingSymlinksInPath().path } ?? ""
            return allProcessIDs().filter {
                ((try? ProcFS.status($0))?["Name"]) == "fammig-guard" && (try? ProcFS.readLink("/proc/\($0)/exe")) == fammig
            }
        }

        /// A memwalk victim that fills its memory and then waits at its rendezvous (before walk step 2)
        /// until it gets SIGUSR2: however loaded the machine, it cannot end before the test did to it what
        /// it meant to ("pid N: no such process" when a victim of fixed work ended before its checkpoint).
        /// Its stdout matches a run without the rendezvous (TestPrograms/common.h).
        static func startAtRendezvous(_ arguments: [String], program: String = SourceDeathTests.program, directory: ScratchDirectory,
                                      leftovers: LeftoverCheck) throws -> SpawnedProgram {
            let path = try TestPaths.testProgram(program)
            let argumentVector = arguments + ["--rendezvous", "2"]
            let victim = leftovers.own(try SpawnedProgram(path, argumentVector, standardOutputPath: directory.path("victim.out"),
                                                          standardErrorPath: directory.path("victim.err")))
            leftovers.expectProgram([path] + argumentVector)
            try #require(pollUntil(timeout: .seconds(60)) { waitsAtRendezvous(victim.processID) }, "the victim never reached its rendezvous")
            return victim
        }

        /// In sigwaitinfo (rt_sigtimedwait, 128) and asleep: at its rendezvous.
        static func waitsAtRendezvous(_ processID: ProcessID) -> Bool {
            guard let syscall = try? String(contentsOfFile: "/proc/\(processID)/syscall", encoding: .utf8), syscall.hasPrefix("128 ") else { return false }
            return ((try? ProcFS.status(processID))?["State"] ?? "").hasPrefix("S")
        }

        /// The victim goes on as if nothing happened: not stopped, not traced, and, released from its
        /// rendezvous, it ends with the unmigrated checksum (memwalk checks every word it reads).
        static func expectRunsOnIntact(_ victim: SpawnedProgram, output: String, reference: String, _ what: String) throws {
            let unfrozen = pollUntil(timeout: .seconds(10)) {
                guard let status = try? ProcFS.status(victim.processID) else { return false }
                return status["TracerPid"] == "0" && !(status["State"] ?? "T").hasPrefix("T")
            }
            #expect(unfrozen, "\(what): the victim was left \((try? ProcFS.status(victim.processID))?["State"] ?? "gone")")
            _ = Glibc.kill(victim.processID.rawValue, SIGUSR2)
            #expect(try victim.waitForExit(timeout: .seconds(120)) == .exited(0), "\(what): the victim did not run to its end")
            #expect(lastChecksum(inFile: output) == reference, "\(what): the victim's run differs from the unmigrated one")
        }

        enum Point: String, CaseIterable, CustomTestStringConvertible {
            case beforeFreeze = "before-freeze", frozen, beforeCommit = "before-commit", afterCommit = "after-commit"
            var testDescription: String { rawValue }
        }

        /// The one body of the kill-the-source tests: a victim at its rendezvous, a `fammig checkpoint` of
        /// it that `kill` ends (given the checkpoint's arguments, it returns once the checkpoint is dead).
        /// Before the commit record the victim runs on intact; after it (`committed`) the victim is dead
        /// and the image restores it to the same end. No guard is left either way.
        static func checkpointKilled(_ arguments: [String], program: String = SourceDeathTests.program, committed: Bool = false, _ what: String,
                                     kill: (_ checkpointArguments: [String], _ directory: ScratchDirectory, _ leftovers: LeftoverCheck) throws -> Void) throws {
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let reference = try referenceChecksum(arguments, program: program)
            let victim = try startAtRendezvous(arguments, program: program, directory: directory, leftovers: leftovers)
            let output = directory.path("victim.out")
            let imagePath = directory.path("image.fam"), keyPath = directory.path("migration.key")
            try kill(["checkpoint", "--pid", "\(victim.processID)", "--fam", imagePath, "--key-file", keyPath], directory, leftovers)
            if committed {
                #expect(try victim.waitForExit(timeout: .seconds(10)) == .killed(signal: SIGKILL), "\(what): the victim outlived its committed image")
                // A tree's members, orphaned by the killed root, are reaped by init a moment later: their PIDs
                // are free only then.
                var restore = try leftovers.fammig("restore", "--fam", imagePath, "--key-file", keyPath)
                for _ in 0..<20 where restore.exitStatus == 2 && restore.standardError.contains("is still in use") {
                    usleep(250_000)
                    restore = try leftovers.fammig("restore", "--fam", imagePath, "--key-file", keyPath)
                }
                try #require(restore.exitStatus == 0, "restore failed: \(restore.standardError)")
                _ = Glibc.kill(victim.processID.rawValue, SIGUSR2)
                #expect(pollUntil(timeout: .seconds(120)) { processLife(victim.processID) != .running }, "the restored process did not end")
                #expect(lastChecksum(inFile: output) == reference, "the restored run differs from the unmigrated one")
            } else {
                try expectRunsOnIntact(victim, output: output, reference: reference, what)
            }
            #expect(pollUntil(timeout: .seconds(10)) { guardProcesses().isEmpty }, "a source guard is left: \(guardProcesses())")
        }

        /// `fammig checkpoint --die-at POINT` SIGKILLs itself there.
        @Test(arguments: Point.allCases) func checkpointKilledAtAPoint(point: Point) throws {
            try Self.checkpointKilled(["--mib", "32", "--steps", "40000", "--pause-us", "100"], committed: point == .afterCommit, point.rawValue) {
                arguments, _, leftovers in
                let checkpoint = try leftovers.fammig(arguments + ["--die-at", point.rawValue])
                #expect(checkpoint.killedBySignal, "checkpoint did not die at \(point): \(checkpoint.standardError)")
            }
        }

        /// Item 4: a process tree (workers in their own group and session, a grandchild, a threaded child,
        /// zombies) whose checkpoint dies at each point. Its members are frozen without a group-stop; at
        /// these points no injected query is half-way, so the kernel's detach leaves each running as it
        /// was, and the root, continued by its guard, checks every worker's answers to the end (after the
        /// commit record the tree dies and its image restores it whole).
        @Test(arguments: Point.allCases) func aTreeCheckpointKilledAtAPoint(point: Point) throws {
            try Self.checkpointKilled(["--rounds", "60", "--pause-us", "1000"], program: "tree-static", committed: point == .afterCommit,
                                      "tree \(point.rawValue)") { arguments, _, leftovers in
                let checkpoint = try leftovers.fammig(arguments + ["--die-at", point.rawValue])
                #expect(checkpoint.killedBySignal, "checkpoint did not die at \(point): \(checkpoint.standardError)")
            }
        }

        /// kill -9 from outside, while a 256 MiB dump is under way (the victim is frozen by then and the
        /// dump takes far longer than the kill).
        @Test func checkpointKilledDuringTheDump() throws {
            try Self.checkpointKilled(["--mib", "256", "--steps", "60000", "--pause-us", "100"], "killed during the dump") {
                arguments, directory, leftovers in
                let checkpoint = leftovers.own(try StartedProcess(try TestPaths.fammig(), arguments, standardOutputPath: directory.path("checkpoint.out"),
                                                                  standardErrorPath: directory.path("checkpoint.err")))
                let victimProcessID = ProcessID(Int32(arguments[2])!)
                try #require(pollUntil(timeout: .seconds(30)) { Self.isTraced(victimProcessID, by: checkpoint.processID) }, "checkpoint never seized the victim")
                _ = Glibc.kill(checkpoint.processID.rawValue, SIGKILL)
                #expect(pollUntil(timeout: .seconds(10)) { !checkpoint.process.isRunning })
            }
        }

        /// The worst moment: the tracer dies half-way through an injected query, with the victim's code at
        /// rip overwritten, its registers set for another syscall, every signal blocked and a scratch
        /// mapping made. The kernel's detach is what Dumper.loseTracer does; the guard puts back what it
        /// logged, and the victim runs on to the unmigrated end.
        @Test func aTracerLostInTheMiddleOfAnInjectedQueryLeavesTheVictimIntact() throws {
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let arguments = ["--mib", "16", "--steps", "20000", "--pause-us", "200"]
            let reference = try Self.referenceChecksum(arguments)
            let victim = try Self.startAtRendezvous(arguments, directory: directory, leftovers: leftovers)
            let output = directory.path("victim.out")
            let frozen = try FrozenVictim.freeze(victim.processID)
            let tracee = frozen.tracee
            let registers = try tracee.registers()
            let mask = try tracee.signalMask()
            let memory = try ProcessMemory(victim.processID, writable: true)
            defer { memory.close() }
            let code = try memory.read(at: registers.rip, byteCount: syscallTrapInstruction.count)
            let scratch = try #require(AddressSpace.freeRange(byteCount: 4 * .pageSize,
                                                              avoiding: try ProcFS.maps(victim.processID).map { ($0.start, $0.end) }))
            frozen.sourceGuard.recordThread(tracee.processID, registers: registers, signalMask: mask)
            frozen.sourceGuard.recordCode(code, at: registers.rip)
            frozen.sourceGuard.recordScratch(address: scratch, byteCount: 4 * .pageSize)
            try tracee.setSignalMask(~UInt64(0))
            try memory.write(syscallTrapInstruction, at: registers.rip)
            let injector = SyscallInjector(tracee: tracee, instructionAddress: registers.rip, template: registers)
            injector.endsAtSyscallExit = true
            try injector.call("mmap(scratch)", Syscall.mmap, scratch, 4 * .pageSize, 7, 0x22 | 0x100000, UInt64.max, 0)
            // Registers set for the next call, as when the tracer dies between two injections.
            var changed = registers
            (changed.rax, changed.rdi, changed.rip) = (39, 0, registers.rip)
            try tracee.setRegisters(changed)

            frozen.loseTracer()
            #expect(!(try ProcFS.maps(victim.processID)).contains { $0.start <= scratch && scratch < $0.end }, "the scratch mapping is left in the victim")
            try Self.expectRunsOnIntact(victim, output: output, reference: reference, "lost in an injection")
        }
    }
}

extension ProcessTests {
    /// Issue 12 item 5: a FAM file truncated under a restore is exit 2 naming the file, never a crash, and
    /// no half-restored process is left running (the stub is traced with EXITKILL until it is whole).
    @Suite(.serialized) struct TruncatedUnderARestoreTests {
        @Test func anImageTruncatedWhileItIsRestoredIsExitTwoAndNoProcess() throws {
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            // At its rendezvous until the test releases it: it cannot end before the checkpoint looks at it.
            let victim = try SourceDeathTests.startAtRendezvous(["--mib", "256", "--steps", "100000", "--pause-us", "100"],
                                                                directory: directory, leftovers: leftovers)
            let output = directory.path("victim.out")
            let imagePath = directory.path("image.fam"), keyPath = directory.path("migration.key")
            let checkpoint = try leftovers.fammig("checkpoint", "--pid", "\(victim.processID)", "--fam", imagePath, "--key-file", keyPath)
            try #require(checkpoint.exitStatus == 0, "checkpoint failed: \(checkpoint.standardError)")
            #expect(try victim.waitForExit(timeout: .seconds(10)) == .killed(signal: SIGKILL))

            let restore = leftovers.own(try StartedProcess(try TestPaths.fammig(), ["restore", "--fam", imagePath, "--key-file", keyPath],
                                                           standardOutputPath: directory.path("restore.out"),
                                                           standardErrorPath: directory.path("restore.err")))
            // As soon as the restored process exists (its layout is being built, 256 MiB of pages to go).
            let spawned = pollUntil(timeout: .seconds(60)) {
                SourceDeathTests.isTraced(victim.processID, by: restore.processID) || !restore.process.isRunning
            }
            try #require(spawned, "the restore never started the process")
            try #require(truncate(imagePath, off_t(4096)) == 0)
            let outcome = try restore.waitForExit(timeout: .seconds(60))
            #expect(!outcome.killedBySignal, "the restore crashed: \(outcome.standardError)")
            if outcome.exitStatus == 0 {
                // It had read every page before the cut: then the process is whole.
                _ = Glibc.kill(victim.processID.rawValue, SIGUSR2)
                #expect(pollUntil(timeout: .seconds(120)) { processLife(victim.processID) != .running })
                #expect(lastChecksum(inFile: output) != nil, "a restore that succeeded left a process that did not finish")
            } else {
                #expect(outcome.exitStatus == 2, "restore: exit \(outcome.exitStatus): \(outcome.standardError)")
                #expect(outcome.standardError.contains(imagePath) && outcome.standardError.contains("changed size"), "\(outcome.standardError)")
                #expect(pollUntil(timeout: .seconds(10)) { processLife(victim.processID) != .running },
                        "a half-restored process runs on after the failed restore")
            }
        }
    }
}

extension ProcessTests {
    /// Found with the source's guard: an injected query that ended at an int3 with every signal blocked
    /// made the kernel force its SIGTRAP through, resetting the victim's SIGTRAP action to SIG_DFL
    /// (force_sig_info: blocked or ignored means reset) before rt_sigaction read it. The source's
    /// queries now end at their syscall's exit stop: the action survives the checkpoint, in the image
    /// and in a victim that runs on.
    @Suite(.serialized) struct SignalActionTests {
        static let trapBit: UInt64 = 1 << 4  // SIGTRAP is signal 5

        static func caught(_ processID: ProcessID) -> UInt64? {
            ((try? ProcFS.status(processID))?["SigCgt"]).flatMap { UInt64($0, radix: 16) }
        }

        @Test func aSIGTRAPHandlerSurvivesTheCheckpointAndTheRestore() throws {
            let directory = try ScratchDirectory(under: "/dev/shm")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let python = "/usr/bin/python3"
            try #require(access(python, X_OK) == 0, "this test needs \(python)")
            let script = "import signal,time; signal.signal(signal.SIGTRAP, lambda *a: None); print('ready', flush=True); time.sleep(30)"
            let output = directory.path("victim.out")
            let victim = leftovers.own(try SpawnedProgram(python, ["-c", script], standardOutputPath: output,
                                                          standardErrorPath: directory.path("victim.err")))
            leftovers.expectProgram([python, "-c", script])
            try #require(pollUntil(timeout: .seconds(20)) { ((try? String(contentsOfFile: output, encoding: .utf8)) ?? "").contains("ready") })
            try #require((Self.caught(victim.processID) ?? 0) & Self.trapBit != 0, "python did not catch SIGTRAP")

            let keptPath = directory.path("kept.fam"), keptKey = directory.path("kept.key")
            let kept = try leftovers.fammig("checkpoint", "--pid", "\(victim.processID)", "--fam", keptPath, "--key-file", keptKey, "--leave-running")
            try #require(kept.exitStatus == 0, "checkpoint --leave-running: \(kept.standardError)")
            #expect((Self.caught(victim.processID) ?? 0) & Self.trapBit != 0, "the checkpoint reset the victim's SIGTRAP action")

            let imagePath = directory.path("image.fam"), keyPath = directory.path("migration.key")
            let checkpoint = try leftovers.fammig("checkpoint", "--pid", "\(victim.processID)", "--fam", imagePath, "--key-file", keyPath)
            try #require(checkpoint.exitStatus == 0, "checkpoint: \(checkpoint.standardError)")
            #expect(try victim.waitForExit(timeout: .seconds(10)) == .killed(signal: SIGKILL))
            let restore = try leftovers.fammig("restore", "--fam", imagePath, "--key-file", keyPath)
            try #require(restore.exitStatus == 0, "restore: \(restore.standardError)")
            #expect((Self.caught(victim.processID) ?? 0) & Self.trapBit != 0, "the restored process lost its SIGTRAP action")
            Spawn.kill(victim.processID)
            #expect(pollUntil(timeout: .seconds(10)) { processLife(victim.processID) != .running }, "the restored process did not go")
        }
    }
}
