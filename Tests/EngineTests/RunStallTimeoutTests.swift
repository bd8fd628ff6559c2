// `fammig run --stall-timeout`: the wait for the other node once state has moved, as `source` and `target`
// take it (it had only the 30 s default): a post-copy run with a short one migrates as with the default,
// and a value outside 2...86400 is refused before anything starts.
import Foundation
import Testing
import Sys

extension ProcessTests {
    @Suite(.serialized) struct RunStallTimeoutTests {
        @Test(arguments: ["postcopy-socket", "postcopy-fam"]) func runMigratesWithAShortStallTimeout(_ mode: String) throws {
            try migrateProgram("sleeper", arguments: ["--rounds", "40", "--sleep-ms", "10"],
                               runOptions: ["--mode", mode, "--stall-timeout", "5", "--after-ms", "100"], timeout: .seconds(90)) { report, _ in
                expectMigratedAsReference(report)
            }
        }

        @Test(arguments: ["1", "86401"]) func runRefusesAStallTimeoutOutOfRange(_ seconds: String) throws {
            let outcome = try runCommand(try TestPaths.fammig(), ["run", "--mode", "postcopy-socket", "--stall-timeout", seconds, "--",
                                                                  try TestPaths.testProgram("sleeper")])
            #expect(outcome.exitStatus != 0)
            #expect(outcome.standardError.contains("--stall-timeout takes 2 to 86400 seconds."), "\(outcome.standardError)")
        }
    }
}
