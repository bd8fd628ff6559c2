// A victim that ends just as the checkpoint starts is reported as gone ("no such process"), not as the
// PTRACE_SEIZE EPERM its zombie answers with (seen by issue 13's benchmarks, migrating a short run).
@testable import Engine
import Sys
import Testing

@Suite struct EndedVictimTests {
    @Test func aZombieVictimIsNoSuchProcess() throws {
        let child = try Spawn.program(path: "/bin/true", arguments: [], environment: [], standardOutputPath: "/dev/null",
                                      standardErrorPath: "/dev/null")
        defer { _ = try? Spawn.waitForExit(child) }
        #expect(pollUntil(timeout: .seconds(10)) { (try? ProcFS.status(child))?["State"]?.hasPrefix("Z") == true })
        #expect {
            _ = try FrozenVictim.freeze(child)
        } throws: { error in
            guard let error = error as? CheckpointError, case .noSuchProcess(let processID) = error else { return false }
            return processID == child
        }
    }
}
