// Every test program of the full suite (issue 6) migrated in every mode through `fammig run`: each part
// of process state it exercises must come through with every oracle passing and the unmigrated run's
// whole output.
import Foundation
import Testing

struct SuiteCase: Sendable, CustomTestStringConvertible {
    var program: String
    var arguments: [String]
    var mode: String
    var push: String

    var testDescription: String { "\(program) \(mode)\(mode == "nonlive" ? "" : " push \(push)")" }

    /// Each program runs about a second; the migration comes at 150 ms.
    static let programs: [(String, [String])] = [
        ("heapchurn-static", ["--rounds", "300", "--pause-us", "3000"]),
        ("deepstack-static", ["--rounds", "40", "--pause-us", "25000"]),
        ("holes-static", ["--steps", "400", "--pause-us", "2500"]),
        ("sparse-static", ["--reserve-gib", "4", "--steps", "60000", "--batch", "1000", "--pause-us", "20000"]),
        ("filemaps-static", ["--rounds", "200"]),
        ("vectors-static", ["--rounds", "100", "--pause-us", "10000"]),
        ("blocked-static", ["--rounds", "60"]),
        ("kvstore-static", ["--report-ms", "0"]),
        ("threads-static", ["--rounds", "100", "--pause-us", "10000"]),
        ("threads", ["--rounds", "100", "--pause-us", "10000"]),
    ]

    static let all: [SuiteCase] = programs.flatMap { program, arguments in
        [("nonlive", "on"), ("postcopy-socket", "on"), ("postcopy-socket", "off"), ("postcopy-fam", "on"), ("postcopy-fam", "off")]
            .map { SuiteCase(program: program, arguments: arguments, mode: $0.0, push: $0.1) }
    }
}

extension ProcessTests {
    @Suite(.serialized) struct ProgramSuiteTests {
        @Test(arguments: SuiteCase.all) func everyProgramInEveryMode(_ migration: SuiteCase) throws {
            try migrateProgram(migration.program, arguments: migration.arguments,
                               runOptions: ["--mode", migration.mode, "--push", migration.push, "--after-ms", "150"],
                               timeout: .seconds(120)) { report, _ in
                expectMigratedAsReference(report)
            }
        }

        /// A shared file mapping made read-only between rounds, from a file opened for writing: the
        /// kernel lets the program make it writable again (VmFlags "mw"), so the restore must map it from
        /// an open for writing too (it mapped it read-only before: mprotect then failed with EACCES).
        @Test(arguments: ["nonlive", "postcopy-socket", "postcopy-fam"]) func aSharedFileMappingMadeReadOnlyMayWriteAgain(_ mode: String) throws {
            try migrateProgram("filemaps-static", arguments: ["--rounds", "40", "--pause-us", "20000", "--shared", "1",
                                                             "--read-only-between", "1", "--shm-dir", "/tmp"],
                               runOptions: ["--mode", mode, "--after-ms", "250"], timeout: .seconds(120)) { report, _ in
                #expect(report.migratedChecksum != nil && report.migratedChecksum == report.referenceChecksum)
            }
        }
    }
}
