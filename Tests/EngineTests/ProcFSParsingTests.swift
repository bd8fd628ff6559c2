// ProcFS's parsing of /proc text, after trimmingSpaces became a byte scan and isKilledOrEnded a
// three-line parse (torture asks the latter before every step): the same answers as before, on real
// processes of this machine.
import Foundation
import Sys
import Testing

extension ProcessTests {
    @Suite(.serialized) struct ProcFSParsingTests {
        @Test(arguments: [("  a b\t", "a b"), ("\t\t", ""), ("", ""), ("x", "x"), (" \tS (sleeping)  ", "S (sleeping)"), ("é  ", "é")])
        func trimmingSpacesDropsOnlyOuterSpacesAndTabs(_ input: String, _ expected: String) {
            #expect(Substring(input).trimmingSpaces() == expected)
        }

        @Test func isKilledOrEndedTellsALiveProcessFromAKilledOne() throws {
            let own = ProcessID(rawValue: getpid())
            #expect(!ProcFS.isKilledOrEnded(own))
            #expect(try ProcFS.status(own)["State"]?.isEmpty == false)
            let child = try Spawn.program(path: "/bin/sleep", arguments: ["60"], environment: [],
                                          standardOutputPath: "/dev/null", standardErrorPath: "/dev/null")
            #expect(!ProcFS.isKilledOrEnded(child))
            Spawn.kill(child)
            // The kill is recorded at once (pending SIGKILL, or already a zombie), before anyone reaps it.
            #expect(ProcFS.isKilledOrEnded(child))
            _ = try Spawn.waitForExit(child)
            #expect(ProcFS.isKilledOrEnded(child))
        }
    }
}
