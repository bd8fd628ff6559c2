// Whole migrations of the real test programs through `fammig run`: the run's own oracles must all pass,
// the migrated program must end with the unmigrated run's checksum, and nothing may be left behind.
import Foundation
import Glibc
import Testing

/// The part of `fammig run --json` these tests read.
struct MigrationReport: Decodable {
    struct Verdict: Decodable {
        var name: String
        var passed: Bool
        var detail: String
    }

    var verdicts: [Verdict]
    var referenceChecksum: String?
    var migratedChecksum: String?
    var programStatus: String?
    var pageCount: Int
    var downtimeMilliseconds: Double?
    var error: String?
}

/// One program, its arguments and when to migrate it.
struct MigrationCase: Sendable, CustomTestStringConvertible {
    var program: String
    var arguments: [String]
    var afterMilliseconds: Int
    var minimumPageCount: Int
    /// Frozen at this system call's exit instead of after `afterMilliseconds`: for a case whose page count
    /// must not depend on how far a loaded machine let the program get.
    var freezeAtSyscall: Int? = nil

    var testDescription: String {
        "\(program) \(arguments.joined(separator: " ")) " + (freezeAtSyscall.map { "at system call \($0)" } ?? "after \(afterMilliseconds) ms")
    }
    var runOptions: [String] { freezeAtSyscall.map { ["--freeze-at-syscall", "\($0)"] } ?? ["--after-ms", "\(afterMilliseconds)"] }

    // Each program runs about 2.5 s, so a migration at 300 ms has 8x slack. memwalk fills 256 MiB before
    // its first pause (a nanosleep every 500 steps), and its 80th system call is one of those pauses
    // (static or dynamic, ~10 or ~40 calls start it): every one of the 65536 region pages is present
    // and must be dumped. A time (800 ms) was too short on a CI machine at load 14.
    static let all: [MigrationCase] = ["memwalk-static", "memwalk"].flatMap { program in
        [MigrationCase(program: program, arguments: ["--mib", "4", "--steps", "50000", "--pause-us", "25000"],
                       afterMilliseconds: 300, minimumPageCount: 1024),
         MigrationCase(program: program, arguments: ["--mib", "256", "--steps", "50000", "--pause-us", "25000"],
                       afterMilliseconds: 0, minimumPageCount: 65536, freezeAtSyscall: 80)]
    } + ["sleeper-static", "sleeper"].map {
        MigrationCase(program: $0, arguments: ["--rounds", "50", "--sleep-ms", "50"], afterMilliseconds: 300, minimumPageCount: 1)
    } + ["signals-static", "signals"].map {
        MigrationCase(program: $0, arguments: ["--rounds", "250", "--pause-us", "10000"], afterMilliseconds: 300, minimumPageCount: 1)
    } + ["seccomp-static", "seccomp", "caps-static", "caps"].map {
        // Filters, no_new_privs, dropped capabilities and a lowered RLIMIT_CORE must all survive.
        MigrationCase(program: $0, arguments: ["--rounds", "120", "--pause-us", "20000"], afterMilliseconds: 300, minimumPageCount: 1)
    } + [MigrationCase(program: "caps", arguments: ["--rounds", "120", "--pause-us", "20000", "--try-regain-at", "60"],
                       afterMilliseconds: 300, minimumPageCount: 1)]
}

/// `fammig run RUNOPTIONS --json … -- COMMAND` under `leftovers`: it must exit 0 with every verdict
/// passed, the registers and state, pages, program, end-to-end and output oracles among them. Returns
/// its report.
func runAndJudge(leftovers: LeftoverCheck, directory: ScratchDirectory, runOptions: [String], command: [String],
                 timeout: Duration) throws -> MigrationReport {
    let jsonPath = directory.path("report.json")
    let outcome = try leftovers.fammig(["run"] + runOptions + ["--json", jsonPath, "--"] + command, timeout: timeout)
    #expect(outcome.exitStatus == 0 && !outcome.killedBySignal, "fammig run failed:\n\(outcome.standardOutput)\n\(outcome.standardError)")
    let report = try JSONDecoder().decode(MigrationReport.self, from: Data(contentsOf: URL(fileURLWithPath: jsonPath)))
    let failed = report.verdicts.filter { !$0.passed }.map { "\($0.name): \($0.detail)" }
    #expect(failed.isEmpty, "failed verdicts: \(failed)")
    let names = Set(report.verdicts.map(\.name))
    for required in ["registers and state", "pages", "program", "end to end", "output"] {
        #expect(names.contains(required), "no \"\(required)\" verdict among \(names.sorted())")
    }
    return report
}

/// Migrates test program `name` with `fammig run RUNOPTIONS` (see `runAndJudge`) in a scratch directory,
/// with a leftover check that expects the program (the victim and the process restored from it keep its
/// command line); `judge` sees the report before the leftovers are judged.
/// `launcher` goes before the program on `fammig run`'s command line (e.g. `unshare --ipc`, which execs it).
func migrateProgram(_ name: String, arguments: [String], runOptions: [String], timeout: Duration, launcher: [String] = [],
                    judge: (MigrationReport, LeftoverCheck) throws -> Void) throws {
    let program = try TestPaths.testProgram(name)
    let directory = try ScratchDirectory(under: "/tmp")
    defer { directory.remove() }
    let leftovers = LeftoverCheck()
    defer { leftovers.finish() }
    leftovers.expectProgram([program] + arguments)
    let report = try runAndJudge(leftovers: leftovers, directory: directory, runOptions: runOptions,
                                 command: launcher + [program] + arguments, timeout: timeout)
    try judge(report, leftovers)
}

/// What every migration that must end as its reference run expects of the report: no error, the restored
/// program exited 0 with the reference run's checksum, and no verdict failed.
func expectMigratedAsReference(_ report: MigrationReport, sourceLocation: SourceLocation = #_sourceLocation) {
    let failed = report.verdicts.filter { !$0.passed }
    #expect(report.error == nil, sourceLocation: sourceLocation)
    #expect(report.programStatus == "exited with status 0", "\(failed)", sourceLocation: sourceLocation)
    #expect(report.migratedChecksum != nil && report.migratedChecksum == report.referenceChecksum, sourceLocation: sourceLocation)
    #expect(failed.isEmpty, "\(failed)", sourceLocation: sourceLocation)
}

extension ProcessTests {
    @Suite(.serialized) struct MigrationTests {
        @Test func addressSpaceRandomizationIsOn() throws {
            // Same PID and same addresses mean something only when the kernel would otherwise move them.
            let setting = try String(contentsOfFile: "/proc/sys/kernel/randomize_va_space", encoding: .utf8)
            #expect(setting.trimmingCharacters(in: .whitespacesAndNewlines) == "2")
        }

        @Test(arguments: MigrationCase.all) func migratedRunMatchesReference(_ migration: MigrationCase) throws {
            try migrateProgram(migration.program, arguments: migration.arguments,
                               runOptions: migration.runOptions, timeout: .seconds(90)) { report, leftovers in
                #expect(report.error == nil)
                #expect(report.programStatus == "exited with status 0")
                let referenceChecksum = try #require(report.referenceChecksum)
                #expect(referenceChecksum.count == 16 && referenceChecksum.allSatisfy(\.isHexDigit))
                #expect(report.migratedChecksum == referenceChecksum)
                #expect(report.pageCount >= migration.minimumPageCount)
                let downtime = try #require(report.downtimeMilliseconds)
                #expect(downtime > 0 && downtime.isFinite)
                // Else the check that the run removed its work directory would check nothing.
                #expect(leftovers.ourRunDirectories.count == 1, "run directories seen: \(leftovers.ourRunDirectories)")
            }
        }

        /// The seccomp filter still kills the restored process when it makes its forbidden syscall
        /// (round 60 of 120; the migration happens at about round 15).
        @Test(arguments: ["seccomp-static", "seccomp"]) func seccompFilterIsEnforcedAfterRestore(_ name: String) throws {
            let program = try TestPaths.testProgram(name)
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let arguments = ["--rounds", "120", "--pause-us", "20000", "--violate-at", "60"]
            leftovers.expectProgram([program] + arguments)
            let jsonPath = directory.path("report.json")
            let outcome = try leftovers.fammig(["run", "--no-reference", "--after-ms", "300", "--json", jsonPath, "--", program] + arguments,
                                               timeout: .seconds(90))
            #expect(outcome.exitStatus == 1, "the program's death must fail the run: \(outcome.standardError)")
            let report = try JSONDecoder().decode(MigrationReport.self, from: Data(contentsOf: URL(fileURLWithPath: jsonPath)))
            #expect(report.programStatus == "killed by signal \(SIGSYS)")
            #expect(report.migratedChecksum == nil)
            let passed = Set(report.verdicts.filter(\.passed).map(\.name))
            #expect(passed.isSuperset(of: ["registers and state", "pages"]))
        }
    }
}
