// "Has this child ended?" must answer from its exit alone. waitid reports a traced child's unread stop
// whatever the options ask for ("traditionally we see ptrace'd stopped tasks regardless of options"),
// and a stop taken for an end made the fault handler finish before the restored process ran: it let go
// of the userfaultfd with pages missing, and the process read zeros (ret to address 0, SIGSEGV; seeds
// 0xa710e5f7f07b8175 and 0x6d276bfa377656c9, and the kernel log's "segfault at 0 ip 0 sp 7fffffffe…").
import Sys
import Testing

@Suite struct ProcessEndTests {
    @Test func aTracedChildInAnUnreadStopHasNotEnded() throws {
        let child = try Spawn.program(path: "/bin/sleep", arguments: ["30"], environment: [], standardOutputPath: "/dev/null",
                                      standardErrorPath: "/dev/null")
        defer { _ = Spawn.killAndReap(child) }
        let tracee = try Tracee.seize(child)
        try tracee.interrupt()
        #expect(pollUntil(timeout: .seconds(10)) { (try? ProcFS.status(child))?["State"]?.hasPrefix("t") == true })
        #expect(!Spawn.hasEnded(child))
        #expect(!Spawn.hasEnded(child), "asked twice: the stop is still unread")
        Spawn.kill(child)
        #expect(pollUntil(timeout: .seconds(10)) { Spawn.hasEnded(child) })
    }
}
