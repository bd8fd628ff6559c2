// TracerPin: an actor thread runs its ptrace-heavy steps on its tracee's CPU, and gets back exactly the
// CPU mask it had; the tracee's own mask is never touched.
import Foundation
import Sys
import Testing

@Suite struct TracerPinTests {
    /// The Cpus_allowed_list line of a thread's (or process's) status, e.g. "0-1".
    static func allowedCPUs(_ path: String) throws -> String {
        let text = try String(contentsOfFile: path, encoding: .utf8)
        let line = try #require(text.split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") })
        return line.dropFirst("Cpus_allowed_list:".count).trimmingCharacters(in: .whitespaces)
    }

    @Test func pinsTheCallingThreadToTheTraceesCPUAndGivesItsMaskBack() throws {
        try #require(Spawn.onlineCPUCount > 1, "one CPU: a pin changes nothing to see")
        let tracee = try Spawn.program(path: "/bin/sleep", arguments: ["10"], environment: [],
                                       standardOutputPath: "/dev/null", standardErrorPath: "/dev/null")
        defer { _ = Spawn.killAndReap(tracee) }
        // Asleep, so the CPU it last ran on (stat field 39) stays put while the test reads it twice.
        for _ in 0..<10_000 where (try? ProcFS.statFields(tracee)[3]) != "S" { usleep(1000) }
        try #require(try ProcFS.statFields(tracee)[3] == "S", "sleep(1) never went to sleep")
        let threadStatus = "/proc/self/task/\(Spawn.currentThreadID())/status"
        let before = try Self.allowedCPUs(threadStatus)
        let traceeBefore = try Self.allowedCPUs("/proc/\(tracee)/status")
        var pin = TracerPin()
        pin.pin(near: tracee)
        #expect(pin.isPinned)
        let traceeCPU = try #require(try ProcFS.statFields(tracee)[39])
        #expect(try Self.allowedCPUs(threadStatus) == traceeCPU)
        pin.pin(near: tracee)  // a second pin keeps the first one's saved mask
        pin.release()
        #expect(!pin.isPinned)
        #expect(try Self.allowedCPUs(threadStatus) == before)
        #expect(try Self.allowedCPUs("/proc/\(tracee)/status") == traceeBefore)
        pin.release()  // nothing saved: nothing changes
        #expect(try Self.allowedCPUs(threadStatus) == before)
    }
}
