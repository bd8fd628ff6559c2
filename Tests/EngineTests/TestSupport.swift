// Why this file exists: MigrationTests and CLITests drive the real `fammig` executable and the real test
// programs as subprocesses, the way a user does. This file finds both, runs a command with a bounded wait
// (a hung migration must fail its test, not the whole run), and checks after each test that nothing of
// its own was left over: no victim or restored process, no FAM file, no `fammig run` directory.
import Foundation
import Glibc
import Sys
import Testing

/// Both process-driving suites run inside this one, one test at a time: migrations are timing-sensitive
/// on two cores, and each test's leftover check compares /dev/shm, /tmp and /proc before and after, which
/// says something only while no other fammig runs meanwhile.
@Suite(.serialized) enum ProcessTests {}

enum TestSupportError: Error, CustomStringConvertible {
    case fammigNotFound(searched: [String])
    case testProgramsNotBuilt(output: String)
    case timedOut(command: String, seconds: Int64)
    case cannotCreate(path: String)

    var description: String {
        switch self {
        case .fammigNotFound(let searched):
            "no fammig executable in \(searched.joined(separator: ", ")); build it (swift build) with the same scratch path as the tests."
        case .testProgramsNotBuilt(let output):
            "make -C TestPrograms failed:\n\(output)"
        case .timedOut(let command, let seconds):
            "\(command) still ran after \(seconds) s and was killed."
        case .cannotCreate(let path):
            "cannot create \(path)."
        }
    }
}

/// Where the package, the fammig executable and the test programs are.
enum TestPaths {
    /// The package root: this file is Tests/EngineTests/TestSupport.swift.
    static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

    static let testProgramDirectory = packageRoot + "/TestPrograms/build"

    /// The products directory (.build/x86_64-unknown-linux-gnu/debug, or under --scratch-path) holds the
    /// test bundle and the fammig executable, which `swift test` builds too. Bundle.main's path is that
    /// directory itself; the directory of /proc/self/exe is the fallback for other runners.
    static let productDirectories: [String] = {
        let executable = URL(fileURLWithPath: (try? ProcFS.readLink("/proc/self/exe")) ?? "/")
        return [Bundle.main.bundlePath, executable.deletingLastPathComponent().path]
    }()

    static func fammig() throws -> String {
        for directory in productDirectories where access(directory + "/fammig", X_OK) == 0 {
            // Resolved, because the restorer execs /proc/self/exe's target as its stub.
            return URL(fileURLWithPath: directory + "/fammig").resolvingSymlinksInPath().path
        }
        throw TestSupportError.fammigNotFound(searched: productDirectories)
    }

    /// `make -C TestPrograms -j2`, run once per test process: nil when it succeeded, else make's output.
    private static let testProgramBuildFailure: String? = {
        do {
            let outcome = try runCommand("/usr/bin/make", ["-C", packageRoot + "/TestPrograms", "-j2"], timeout: .seconds(120))
            return outcome.exitStatus == 0 ? nil : outcome.standardOutput + outcome.standardError
        } catch {
            return "\(error)"
        }
    }()

    /// The absolute path of a built test program, e.g. "memwalk-static".
    static func testProgram(_ name: String) throws -> String {
        if let output = testProgramBuildFailure { throw TestSupportError.testProgramsNotBuilt(output: output) }
        return testProgramDirectory + "/" + name
    }
}

// MARK: Running commands

/// How a finished command ended and what it printed.
struct CommandOutcome {
    var processID: ProcessID
    /// The exit code, or the signal number when `killedBySignal`.
    var exitStatus: Int32
    var killedBySignal: Bool
    var standardOutput: String
    var standardError: String
}

/// A process started with Foundation's `Process`, stdin from /dev/null and stdout/stderr into files.
final class StartedProcess {
    let process: Process
    /// argv as /proc/PID/cmdline shows it.
    let argumentVector: [String]
    let standardOutputPath: String?
    let standardErrorPath: String?

    /// stdin from /dev/null, stdout and stderr into new files.
    convenience init(_ executable: String, _ arguments: [String], standardOutputPath: String, standardErrorPath: String) throws {
        for path in [standardOutputPath, standardErrorPath] where !FileManager.default.createFile(atPath: path, contents: nil) {
            throw TestSupportError.cannotCreate(path: path)
        }
        guard let output = FileHandle(forWritingAtPath: standardOutputPath),
              let error = FileHandle(forWritingAtPath: standardErrorPath) else {
            throw TestSupportError.cannotCreate(path: standardOutputPath)
        }
        // The child has its own copies once it runs; ours would only keep the files open.
        defer { try? output.close(); try? error.close() }
        try self.init(executable, arguments, standardOutput: output, standardError: error,
                      standardOutputPath: standardOutputPath, standardErrorPath: standardErrorPath)
    }

    /// stdin from /dev/null; `standardOutput` and `standardError` are a FileHandle or a Pipe.
    init(_ executable: String, _ arguments: [String], standardOutput: Any, standardError: Any,
         standardOutputPath: String? = nil, standardErrorPath: String? = nil) throws {
        guard let input = FileHandle(forReadingAtPath: "/dev/null") else { throw TestSupportError.cannotCreate(path: "/dev/null") }
        defer { try? input.close() }
        process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardInput = input
        process.standardOutput = standardOutput
        process.standardError = standardError
        argumentVector = [executable] + arguments
        self.standardOutputPath = standardOutputPath
        self.standardErrorPath = standardErrorPath
        try process.run()
    }

    var commandLine: String { argumentVector.joined(separator: " ") }

    var processID: ProcessID { ProcessID(process.processIdentifier) }

    /// Waits until the process ended and Foundation reaped it, calling `whileRunning` every 10 ms;
    /// kills it after `timeout`.
    func waitForExit(timeout: Duration, whileRunning: () -> Void = {}) throws -> CommandOutcome {
        guard pollUntil(timeout: timeout, { whileRunning(); return !process.isRunning }) else {
            kill()
            throw TestSupportError.timedOut(command: commandLine, seconds: timeout.components.seconds)
        }
        return CommandOutcome(
            processID: processID, exitStatus: process.terminationStatus,
            killedBySignal: process.terminationReason == .uncaughtSignal,
            standardOutput: standardOutputPath.flatMap { try? String(contentsOfFile: $0, encoding: .utf8) } ?? "",
            standardError: standardErrorPath.flatMap { try? String(contentsOfFile: $0, encoding: .utf8) } ?? "")
    }

    /// SIGKILL, then a bounded wait for Foundation to reap it. Safe to call when it already ended.
    func kill() {
        guard process.isRunning else { return }
        _ = Glibc.kill(process.processIdentifier, SIGKILL)
        _ = pollUntil(timeout: .seconds(5)) { !process.isRunning }
    }
}

/// A program started the way `fammig run` starts its victims (Sys's `Spawn.program`: stdin from /dev/null,
/// stdout and stderr into files, nothing else open). A victim needs exactly that, and Foundation's
/// `Process` cannot give it: its children inherit the test process's descriptors that lack FD_CLOEXEC.
final class SpawnedProgram {
    let processID: ProcessID
    let argumentVector: [String]
    let standardOutputPath: String
    private var exitStatus: Sys.ExitStatus?

    init(_ path: String, _ arguments: [String], standardOutputPath: String, standardErrorPath: String) throws {
        processID = try Spawn.program(path: path, arguments: arguments, environment: ["PATH=/usr/bin:/bin"],
                                      standardOutputPath: standardOutputPath, standardErrorPath: standardErrorPath)
        argumentVector = [path] + arguments
        self.standardOutputPath = standardOutputPath
    }

    /// Waits until it ended and reaps it; kills it after `timeout`.
    func waitForExit(timeout: Duration) throws -> Sys.ExitStatus {
        guard pollUntil(timeout: timeout, { reap() != nil }), let exitStatus else {
            kill()
            throw TestSupportError.timedOut(command: argumentVector.joined(separator: " "), seconds: timeout.components.seconds)
        }
        return exitStatus
    }

    /// SIGKILL and reap, bounded. Safe to call when it already ended.
    func kill() {
        guard reap() == nil else { return }
        Spawn.kill(processID)
        _ = pollUntil(timeout: .seconds(5)) { reap() != nil }
    }

    private func reap() -> Sys.ExitStatus? {
        if exitStatus == nil { exitStatus = try? Spawn.pollExit(processID) }
        return exitStatus
    }
}

/// Runs a command to its end with stdin from /dev/null; output goes through files so a chatty command
/// can never block on a full pipe.
func runCommand(_ executable: String, _ arguments: [String], timeout: Duration = .seconds(60)) throws -> CommandOutcome {
    let directory = try ScratchDirectory(under: "/tmp")
    defer { directory.remove() }
    let started = try StartedProcess(executable, arguments, standardOutputPath: directory.path("stdout"),
                                     standardErrorPath: directory.path("stderr"))
    return try started.waitForExit(timeout: timeout)
}

/// Polls `condition` every 10 ms until it holds (true) or `timeout` passes (false).
func pollUntil(timeout: Duration, _ condition: () -> Bool) -> Bool {
    let clock = ContinuousClock()
    let deadline = clock.now + timeout
    while !condition() {
        if clock.now >= deadline { return false }
        usleep(10_000)
    }
    return true
}

/// Private anonymous pages of this process (mmap), for a test that registers them with its own
/// userfaultfd; unmapped by `unmap()`.
final class PrivateRegion: @unchecked Sendable {
    let start: UInt64
    let byteCount: Int
    private var mapped = true

    init(pageCount: Int) throws {
        byteCount = pageCount * 4096
        guard let region = mmap(nil, byteCount, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), region != MAP_FAILED else {
            throw TestSupportError.cannotCreate(path: "an anonymous mapping of \(pageCount) pages")
        }
        start = UInt64(UInt(bitPattern: region))
    }

    /// MADV_DONTNEED over the whole region (registered with EVENT_REMOVE, it waits for its event's reader).
    func dropPages() { _ = madvise(UnsafeMutableRawPointer(bitPattern: UInt(start)), byteCount, MADV_DONTNEED) }

    func unmap() {
        if mapped { munmap(UnsafeMutableRawPointer(bitPattern: UInt(start)), byteCount); mapped = false }
    }
}

/// A fresh directory (mkdtemp) for one test's files, removed with everything in it by `remove()`.
/// Its name starts with "fammigtest-", never with the "fammig-" or "fammig-run-" of fammig's own files.
struct ScratchDirectory {
    let path: String

    init(under parent: String) throws {
        var template = Array("\(parent)/fammigtest-XXXXXX".utf8CString)
        guard let created = mkdtemp(&template) else { throw TestSupportError.cannotCreate(path: parent + "/fammigtest-XXXXXX") }
        path = String(cString: created)
    }

    func path(_ name: String) -> String { path + "/" + name }

    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

// MARK: Processes seen through /proc

/// What /proc says about a PID.
enum ProcessLife: Equatable {
    case running
    /// Ended but not reaped; `exitCode` is stat field 52 decoded (nil when killed by a signal).
    case zombie(exitCode: Int32?)
    case gone
}

func processLife(_ processID: ProcessID) -> ProcessLife {
    guard let state = ProcFS.state(processID) else { return .gone }
    guard state.hasEnded else { return .running }
    // Field 52, the last (it ends with the newline), is the waitpid status word while nobody reaped it.
    let lastField = (try? ProcFS.statFields(processID))?[52]?.trimmingCharacters(in: .whitespacesAndNewlines)
    guard let word = lastField.flatMap({ Int32($0) }), word & 0x7f == 0 else { return .zombie(exitCode: nil) }
    return .zombie(exitCode: (word >> 8) & 0xff)
}

/// The arguments in /proc/PID/cmdline; empty for zombies, kernel threads and vanished processes.
func commandLineArguments(_ processID: ProcessID) -> [String] {
    guard let text = try? ProcFS.readText("/proc/\(processID)/cmdline") else { return [] }
    return text.split(separator: "\0").map(String.init)
}

func allProcessIDs() -> Set<ProcessID> {
    Set(((try? ProcFS.directoryEntries("/proc")) ?? []).compactMap { Int32($0).map(ProcessID.init(rawValue:)) })
}

/// The last `checksum=` value a test program printed into `path`.
func lastChecksum(inFile path: String) -> String? {
    guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return nil }
    return text.split(separator: "\n").last { $0.hasPrefix("checksum=") }.map { String($0.dropFirst("checksum=".count)) }
}

// MARK: Leftovers

/// What one test started, checked for leftovers by `finish()` (cf. NIO's `EmbeddedChannel.finish()`).
///
/// Other sessions may run fammig on the same machine meanwhile, so a leftover counts only when it can be
/// told apart from theirs, and only ours is ever killed or removed: a process whose whole command line
/// is one this test started (programs get absolute paths and test-specific arguments), a FAM file with
/// the PID of a fammig this test ran in its name (fammig's default is /dev/shm/fammig-PID-N.img), a run
/// directory that a child of our fammig wrote its output into. Other new FAM files with fammig's
/// default names and /tmp/fammig-run-* directories are reported only while no other fammig process is
/// alive, since theirs cannot be told apart from ours by name.
final class LeftoverCheck {
    private let famFilesBefore: Set<String>
    private let runDirectoriesBefore: Set<String>
    private let processIDsBefore: Set<ProcessID>
    private var fammigProcessIDs: [ProcessID] = []
    /// The run directories seen in use by children of our fammig runs.
    private(set) var ourRunDirectories: Set<String> = []
    private var commandLines: [[String]] = []
    private var killers: [() -> Void] = []

    init() {
        famFilesBefore = Set(Self.famFileNames())
        runDirectoriesBefore = Set(Self.runDirectoryNames())
        processIDsBefore = allProcessIDs()
    }

    /// Runs the fammig under test to its end.
    func fammig(_ arguments: [String], timeout: Duration = .seconds(60)) throws -> CommandOutcome {
        let directory = try ScratchDirectory(under: "/tmp")
        defer { directory.remove() }
        let started = try StartedProcess(try TestPaths.fammig(), arguments, standardOutputPath: directory.path("stdout"),
                                         standardErrorPath: directory.path("stderr"))
        fammigProcessIDs.append(started.processID)
        return try started.waitForExit(timeout: timeout) { noteRunDirectories(of: started.processID) }
    }

    /// Notes the /tmp/fammig-run-* directory the children of `fammigProcessID` (reference run, victim,
    /// restored process) write their output into.
    private func noteRunDirectories(of fammigProcessID: ProcessID) {
        let taskDirectory = "/proc/\(fammigProcessID)/task"
        for task in (try? ProcFS.directoryEntries(taskDirectory)) ?? [] {
            let children = (try? ProcFS.readText("\(taskDirectory)/\(task)/children")) ?? ""
            for child in children.split(separator: " ") {
                for descriptor in [1, 2] {
                    guard let target = try? ProcFS.readLink("/proc/\(child)/fd/\(descriptor)"), target.hasPrefix("/tmp/fammig-run-"),
                          let name = target.split(separator: "/").dropFirst().first else { continue }
                    ourRunDirectories.insert(String(name))
                }
            }
        }
    }

    func fammig(_ arguments: String..., timeout: Duration = .seconds(60)) throws -> CommandOutcome {
        try fammig(arguments, timeout: timeout)
    }

    /// A process this test started: `finish()` kills it if it still runs.
    func own(_ process: StartedProcess) -> StartedProcess {
        killers.append(process.kill)
        return process
    }

    func own(_ program: SpawnedProgram) -> SpawnedProgram {
        killers.append(program.kill)
        return program
    }

    /// A program some fammig starts (or restores) with exactly this argument vector.
    func expectProgram(_ argumentVector: [String]) {
        commandLines.append(argumentVector)
    }

    /// Records an issue for each leftover of ours, then kills and removes it.
    func finish(sourceLocation: SourceLocation = #_sourceLocation) {
        var leftoverProcesses: [String] = []
        for processID in allProcessIDs().subtracting(processIDsBefore).sorted() where processLife(processID) == .running {
            let arguments = commandLineArguments(processID)
            guard commandLines.contains(arguments) else { continue }
            leftoverProcesses.append("\(processID): \(arguments.joined(separator: " "))")
            _ = kill(processID.rawValue, SIGKILL)
        }
        #expect(leftoverProcesses.isEmpty, "processes left running: \(leftoverProcesses)", sourceLocation: sourceLocation)
        for kill in killers { kill() }

        let ourFAMFiles = Self.famFileNames().filter { name in
            fammigProcessIDs.contains { name.hasPrefix("fammig-\($0)-") }
        }.sorted()
        #expect(ourFAMFiles.isEmpty, "FAM files left in /dev/shm: \(ourFAMFiles)", sourceLocation: sourceLocation)
        for name in ourFAMFiles { try? FileManager.default.removeItem(atPath: "/dev/shm/" + name) }

        let ourLeftRunDirectories = Self.runDirectoryNames().filter(ourRunDirectories.contains).sorted()
        #expect(ourLeftRunDirectories.isEmpty, "fammig run directories left in /tmp: \(ourLeftRunDirectories)", sourceLocation: sourceLocation)
        for name in ourLeftRunDirectories { try? FileManager.default.removeItem(atPath: "/tmp/" + name) }

        // Looked for around the listing, so that a fammig that started or ended meanwhile is seen.
        guard !otherFammigIsAlive() else { return }
        let newFAMFiles = Self.famFileNames().filter { !famFilesBefore.contains($0) && !ourFAMFiles.contains($0) }.sorted()
        let newRunDirectories = Self.runDirectoryNames().filter {
            !runDirectoriesBefore.contains($0) && !ourLeftRunDirectories.contains($0)
        }.sorted()
        guard !otherFammigIsAlive() else { return }
        // A run directory is named after the fammig that made it (/tmp/fammig-run-PID-XXXXXX): one whose
        // owner still lives, or that its owner removed meanwhile, is not left behind. (Another session's
        // short run could start after the first look for live fammigs and end before the second, its
        // directory seen in between; CI once failed four tests on such directories.)
        let leftRunDirectories = newRunDirectories.filter { name in
            guard ProcFS.exists("/tmp/" + name) else { return false }
            let owner = name.dropFirst("fammig-run-".count).prefix(while: \.isNumber)
            guard let ownerID = Int32(owner) else { return true }
            return processLife(ProcessID(rawValue: ownerID)) != .running
        }
        #expect(newFAMFiles.isEmpty, "FAM files left in /dev/shm: \(newFAMFiles)", sourceLocation: sourceLocation)
        #expect(leftRunDirectories.isEmpty, "fammig run directories left in /tmp: \(leftRunDirectories)", sourceLocation: sourceLocation)
    }

    /// Whether a fammig process runs that this test did not start (those of ours have all ended here).
    private func otherFammigIsAlive() -> Bool {
        allProcessIDs().contains { processID in
            guard !fammigProcessIDs.contains(processID), processLife(processID) == .running,
                  let executable = try? ProcFS.readLink("/proc/\(processID)/exe") else { return false }
            // Any build's fammig, also one rebuilt meanwhile ("fammig (deleted)"); not fammigPackageTests.xctest.
            let name = URL(fileURLWithPath: executable).lastPathComponent
            return name == "fammig" || name.hasPrefix("fammig ")
        }
    }

    /// The names fammig gives FAM files by default: fammig-PID-N.img. Other suites, which may run
    /// meanwhile, name theirs otherwise (fammig-imagetest-*, fammig-seam-*) and remove them themselves.
    private static func famFileNames() -> [String] {
        ((try? ProcFS.directoryEntries("/dev/shm")) ?? []).filter { name in
            let parts = name.split(separator: "-", omittingEmptySubsequences: false)
            return parts.count == 3 && parts[0] == "fammig" && parts[1].allSatisfy(\.isNumber) && !parts[1].isEmpty
                && parts[2].hasSuffix(".img") && parts[2].dropLast(4).allSatisfy(\.isNumber) && parts[2].count > 4
        }
    }

    private static func runDirectoryNames() -> [String] {
        ((try? ProcFS.directoryEntries("/tmp")) ?? []).filter { $0.hasPrefix("fammig-run-") }
    }
}

/// The bytes of `value`, little endian (as the image stores its words).
func littleEndianBytes<Word: FixedWidthInteger>(_ value: Word) -> [UInt8] {
    (0..<(Word.bitWidth / 8)).map { UInt8(truncatingIfNeeded: value >> ($0 * 8)) }
}

/// Removes the SysV shared memory segment of `key`, if a test left one (the fence of tidy's rule 6: the
/// engine never removes a segment by key, so Sys has no call for it).
func removeSysVSegment(key: Int32) {
    let identifier = shmget(key, 0, 0)
    if identifier >= 0 { _ = shmctl(identifier, IPC_RMID, nil) }
}
