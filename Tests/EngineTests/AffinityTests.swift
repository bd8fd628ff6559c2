// CPU affinity is migrated state: a victim's threads come back with the masks they had, in every mode,
// whatever the masks of the threads that restored them (the node commands once pinned every actor to
// CPU 0, and the restored process inherited it). The affinity program reports its masks at its end and
// folds them into its checksum, so the migrated run's checksum is the reference run's only when every
// mask came through.
import Foundation
import Glibc
import Testing
@testable import Engine
import Oracles
import Sys

/// The mask as a value: its spellings, the image encoding, the node that lacks the victim's CPUs, the oracle.
@Suite struct CPUSetTests {
    @Test func listsParseAndPrintAsTheKernelWritesThem() throws {
        #expect(CPUSet.parseList("0-1\n")?.cpus == [0, 1])
        #expect(CPUSet.parseList("0,2-3,64")?.cpus == [0, 2, 3, 64])
        #expect(CPUSet.parseList("0,2-3,64")?.description == "0,2-3,64")
        #expect(CPUSet.parseList("0,2-3,64")?.words == [0b1101, 1])
        for bad in ["", "3-1", "-1", "1-", "a", "0-1024", "1,,2"] { #expect(CPUSet.parseList(bad) == nil, "\(bad)") }
        #expect(CPUSet(words: [1, 0, 0]) == CPUSet(cpus: [0]))
        #expect(CPUSet(words: [UInt64](repeating: 1, count: 17)) == nil)
        #expect(CPUSet(cpus: [1024]) == nil)
        // The calling thread has a mask, and it is among the CPUs online.
        let own = try CPUSet.of(thread: Spawn.currentThreadID())
        let online = try #require(CPUSet.online())
        #expect(!own.isEmpty && own.intersection(online) == own)
    }

    @Test func eachThreadsMaskRoundTripsAndTheOracleNamesALostOne() throws {
        var state = plausibleState(processID: ProcessID(4242), dataRange: 0x7f00_0000_0000..<0x7f00_0001_0000)
        let online = try #require(CPUSet.online())
        state.threads[0].cpuAffinity = CPUSet(cpus: [online.cpus.last!])!
        let decoded = try ProcessState.decode(state.encoded())
        #expect(decoded == state)
        #expect(StateOracle.compare(checkpointed: state, restored: decoded).isEmpty)
        var lost = state
        lost.threads[0].cpuAffinity = online
        if online.cpus.count > 1 {
            #expect(StateOracle.compare(checkpointed: state, restored: lost).map(\.field) == ["thread 4242 CPU affinity"])
        }
        // Not recorded: nothing to set and nothing to expect.
        lost.threads[0].cpuAffinity = CPUSet(words: [])!
        #expect(StateOracle.compare(checkpointed: lost, restored: state).isEmpty)
        #expect(lost.threads[0].restoredAffinity(online: online) == nil)
    }

    @Test func aNodeWithoutTheVictimsCPUsGivesWhatItHas() {
        var thread = plausibleState(processID: ProcessID(7), dataRange: nil).threads[0]
        thread.cpuAffinity = CPUSet(cpus: [1, 5])!
        #expect(thread.restoredAffinity(online: CPUSet(cpus: [0, 1, 2, 3])) == CPUSet(cpus: [1]))
        #expect(thread.restoredAffinity(online: CPUSet(cpus: [0, 2])) == CPUSet(cpus: [0, 2]))
        #expect(thread.restoredAffinity(online: nil) == nil)
    }

    @Test func theDecoderRefusesAMaskSpelledWithTrailingZeroWords() throws {
        var writer = BinaryWriter()
        var thread = plausibleState(processID: ProcessID(7), dataRange: nil).threads[0]
        thread.cpuAffinity = CPUSet(cpus: [0])!
        thread.encode(into: &writer)
        var bytes = writer.bytes
        // The last field is the mask: count 1, one word. Make it count 2 with a zero word.
        let countOffset = bytes.count - 8 - 4
        bytes[countOffset] = 2
        bytes += [UInt8](repeating: 0, count: 8)
        var reader = BinaryReader(bytes)
        #expect(throws: ImageError.self) { _ = try ThreadState.decode(&reader) }
    }
}

struct AffinityCase: Sendable, CustomTestStringConvertible {
    var mode: String
    /// The main thread's mask and the second thread's (0: none), a bit per CPU.
    var cpus: UInt64
    var threadCPUs: UInt64
    /// What the program prints at its end, unmigrated.
    var expectedLine: String

    var testDescription: String { "\(mode): \(expectedLine)" }
    var arguments: [String] { ["--cpus", "\(cpus)", "--thread-cpus", "\(threadCPUs)", "--rounds", "60", "--sleep-ms", "25"] }

    static let all: [AffinityCase] = ["nonlive", "postcopy-socket", "postcopy-fam"].flatMap { mode in
        [AffinityCase(mode: mode, cpus: 0b11, threadCPUs: 0, expectedLine: "affinity main=0-1"),
         AffinityCase(mode: mode, cpus: 0b10, threadCPUs: 0, expectedLine: "affinity main=1"),
         AffinityCase(mode: mode, cpus: 0b10, threadCPUs: 0b01, expectedLine: "affinity main=1 thread=0")]
    }
}

extension ProcessTests {
    @Suite(.serialized) struct AffinityTests {
        @Test(arguments: AffinityCase.all) func victimKeepsItsCPUMasks(_ migration: AffinityCase) throws {
            try #require(Spawn.onlineCPUCount >= 2, "one CPU: no mask to tell apart")
            let program = try TestPaths.testProgram("affinity-static")
            // The program's own report, unmigrated: the masks it asked for are the masks it ends with.
            let reference = try runCommand(program, migration.arguments)
            #expect(reference.exitStatus == 0)
            #expect(reference.standardOutput.contains(migration.expectedLine + "\n"), "\(reference.standardOutput)")
            let referenceChecksum = try #require(reference.standardOutput.split(separator: "\n").last.map { String($0.dropFirst("checksum=".count)) })
            try migrateProgram("affinity-static", arguments: migration.arguments,
                               runOptions: ["--mode", migration.mode, "--after-ms", "300"], timeout: .seconds(90)) { report, _ in
                #expect(report.migratedChecksum == referenceChecksum)
            }
        }

        /// `fammig source` and `fammig target` as two processes: the restored process is made by the
        /// target's restorer thread and must still get the victim's mask (all CPUs here), not the thread's.
        @Test(arguments: ["postcopy-fam", "postcopy-socket"]) func nodeCommandsKeepTheMask(_ mode: String) throws {
            try #require(Spawn.onlineCPUCount >= 2, "one CPU: no mask to tell apart")
            let program = try TestPaths.testProgram("affinity-static")
            let arguments = ["--cpus", "3", "--thread-cpus", "2", "--rounds", "200", "--sleep-ms", "25"]
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let launched = try LaunchedVictim.launch(program, arguments, directory: directory, leftovers: leftovers)
            #expect(launched.referenceOutput.contains("affinity main=0-1 thread=1\n"), "\(launched.referenceOutput)")
            let famPath = "/dev/shm/fammig-affinity-\(getpid()).img"
            defer { try? FileManager.default.removeItem(atPath: famPath) }
            let victimHandle = try ProcessHandle(launched.processID)  // never a kill of a PID reused since
            defer { victimHandle.kill() }
            usleep(300_000)

            let port = 19000 + Int(getpid() % 2000)
            let keyPath = directory.path("migration.key")
            let (sourceArguments, targetArguments) = twoNodeArguments(mode: mode, victim: launched.processID, port: port,
                                                                      keyPath: keyPath, famPath: famPath)
            try requireVictimAlive(launched.processID)
            let source = try startSource(sourceArguments, directory: directory, leftovers: leftovers)
            #expect(waitForKeyFile(keyPath), "the source wrote no key file")
            let target = try leftovers.fammig(targetArguments, timeout: .seconds(60))
            let sourceOutcome = try source.waitForExit(timeout: .seconds(30))
            #expect(target.exitStatus == 0, "target: \(target.standardOutput) \(target.standardError) source: \(sourceOutcome.standardError)")
            #expect(sourceOutcome.exitStatus == 0, "source: \(sourceOutcome.standardError)")
            #expect(launched.restoredProcessFinished(), "the restored process never printed its checksum")
            let output = (try? String(contentsOfFile: launched.outputPath, encoding: .utf8)) ?? ""
            #expect(output.contains("affinity main=0-1 thread=1\n"), "\(output)")
            #expect(lastChecksum(inFile: launched.outputPath).map { "checksum=" + $0 } == launched.referenceChecksum)
        }
    }
}
