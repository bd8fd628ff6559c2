// Why this file exists: torture on a program of the user's, one that knows nothing of fammig
// (`torture --workload 'CMD ARGS' [--check 'CMD']`). It has no rendezvous, so it is frozen at the exit of
// its N-th system call, counted under ptrace (Sys/SyscallStops.swift); N comes from the seed, within the
// count the unmigrated reference run made (or from --freeze-at-syscall), so a seed names one freeze point
// and gives one trace. Every oracle judges it as it judges the catalog's programs; end to end, its stdout
// and exit status must be the reference run's, or the user's check command must accept the run.
import Foundation
import Sys

public enum Workload {
    /// The program name a workload scenario carries.
    public static let programName = "workload"

    /// How long a traced run (reference or up to the freeze) may take.
    static let runLimit: Duration = .seconds(60)

    /// The command's words: split on blanks, with '…' and "…" quoting (no other shell syntax).
    public static func words(_ command: String) -> [String] {
        var words: [String] = []
        var current = ""
        var inWord = false
        var quote: Character?
        for character in command {
            if let open = quote {
                if character == open { quote = nil } else { current.append(character) }
            } else if character == "'" || character == "\"" {
                quote = character
                inWord = true
            } else if character == " " || character == "\t" || character == "\n" {
                if inWord { words.append(current) }
                current = ""
                inWord = false
            } else {
                current.append(character)
                inWord = true
            }
        }
        if inWord { words.append(current) }
        return words
    }

    /// Quoted for a shell (and for `words`), so that a replay command can be pasted.
    public static func shellQuoted(_ text: String) -> String {
        "'" + text.replacingOccurrences(of: "'", with: "'\"'\"'") + "'"
    }

    public enum CommandError: Error, CustomStringConvertible {
        case empty
        case notFound(String)
        case unterminatedQuote(String)

        public var description: String {
            switch self {
            case .empty: "--workload needs a command, e.g. --workload 'sha256sum /etc/services'."
            case .notFound(let name): "no executable \(name) (looked in /usr/bin, /bin, /usr/local/bin); give its path."
            case .unterminatedQuote(let command): "unterminated quote in \(command)."
            }
        }
    }

    /// The command with its program made an absolute path (looked up in /usr/bin:/bin:/usr/local/bin).
    public static func resolve(_ command: String) throws(CommandError) -> String {
        guard command.filter({ $0 == "'" }).count % 2 == 0, command.filter({ $0 == "\"" }).count % 2 == 0 else {
            throw .unterminatedQuote(command)
        }
        var parts = words(command)
        guard let program = parts.first else { throw .empty }
        let candidates = program.contains("/") ? [program] : ["/usr/bin", "/bin", "/usr/local/bin"].map { $0 + "/" + program }
        guard let found = candidates.first(where: { candidate in
            var isDirectory: ObjCBool = false
            return access(candidate, X_OK) == 0 && FileManager.default.fileExists(atPath: candidate, isDirectory: &isDirectory) && !isDirectory.boolValue
        }) else { throw .notFound(program) }
        parts[0] = found.hasPrefix("/") ? found : FileManager.default.currentDirectoryPath + "/" + found
        return parts.map { $0.contains(where: { " \t\n'\"".contains($0) }) ? shellQuoted($0) : $0 }.joined(separator: " ")
    }

    /// The system call (1-based) a seed freezes a workload at, among the `count` its reference run made:
    /// never the last one (exit_group has no exit stop). Drawn from a generator of its own.
    public static func freezeSyscall(seed: UInt64, count: Int) -> Int {
        var generator = SeededGenerator(seed: seed ^ 0x5359_5343_414C_4C53)
        return 1 + generator.below(max(1, count - 1))
    }

    /// The environment every run of a workload gets (the reference, the victim): nothing of ours.
    static let environment = ["PATH=/usr/bin:/bin", "LC_ALL=C"]

    /// ADDR_NO_RANDOMIZE: one layout every run, so the same seed freezes the same pages.
    static let personality: UInt32 = 0x0040000

    /// Starts the victim, frozen at the exit of system call `syscall`.
    static func startFrozen(binary: String, arguments: [String], syscall: Int, outputPath: String, errorPath: String) throws -> ProcessID {
        do {
            let processID = try SyscallStops.startFrozen(atSyscall: syscall, path: binary, arguments: arguments, environment: environment,
                                                         standardOutputPath: outputPath, standardErrorPath: errorPath,
                                                         personality: personality, diesWithStarter: true, limit: runLimit)
            // Threads the counter did not follow would run on, and their own calls would move the freeze point.
            let threads = (try? ProcFS.threadIDs(processID)) ?? []
            guard threads.count == 1 else {
                _ = Spawn.killAndReap(processID)
                throw TortureError.environment("\(binary) has \(threads.count) threads at system call \(syscall): a workload must be single-threaded")
            }
            return processID
        } catch let error as SyscallStopError {
            throw TortureError.environment("\(error)")
        }
    }

    /// Runs the user's check command with the migrated run's output and status in its environment.
    /// nil when it accepts the run (exit 0), else why not.
    static func runCheck(_ command: String, outputPath: String, referencePath: String, status: ExitStatus?, workDirectory: String) -> String? {
        let statusText: String
        switch status {
        case .exited(let code)?: statusText = "\(code)"
        case .killed(let signal)?: statusText = "signal \(signal)"
        case nil: statusText = "none"
        }
        do {
            let processID = try Spawn.program(path: "/bin/sh", arguments: ["-c", command],
                                              environment: environment + ["FAMMIG_OUTPUT=\(outputPath)", "FAMMIG_REFERENCE_OUTPUT=\(referencePath)",
                                                                          "FAMMIG_STATUS=\(statusText)"],
                                              standardOutputPath: workDirectory + "/check.out", standardErrorPath: workDirectory + "/check.err")
            let result = try Spawn.waitForExit(processID)
            if result == .exited(0) { return nil }
            return "the check command \(result): \(firstLine(workDirectory + "/check.err"))"
        } catch {
            return "the check command could not run: \(error)"
        }
    }
}

/// A workload's unmigrated reference run, once per command and campaign: its stdout, exit status and
/// system call count.
final class WorkloadReferences: @unchecked Sendable {
    struct Reference {
        var output: [UInt8]
        var status: ExitStatus
        var syscallCount: Int
        /// A copy of the output the check command can read.
        var outputPath: String
    }

    private let lock = NSLock()
    private var references: [String: Reference] = [:]

    func reference(binary: String, arguments: [String], workDirectory: String, keepDirectory: String) throws -> Reference {
        let key = ([binary] + arguments).joined(separator: " ")
        if let cached = lock.withLock({ references[key] }) { return cached }
        let path = workDirectory + "/reference.out"
        let count: SyscallStops.Count
        do {
            count = try SyscallStops.countToEnd(path: binary, arguments: arguments, environment: Workload.environment,
                                                standardOutputPath: path, standardErrorPath: workDirectory + "/reference.err",
                                                personality: Workload.personality, limit: Workload.runLimit)
        } catch { throw TortureError.environment("the unmigrated reference run of \(key): \(error)") }
        guard count.syscallCount >= 2 else {
            throw TortureError.environment("the reference run of \(key) made \(count.syscallCount) system calls: nothing to freeze at")
        }
        let output = try ProcFS.readFile(path)
        // Kept outside the iteration's work directory, which goes with each iteration.
        try? FileManager.default.createDirectory(atPath: keepDirectory, withIntermediateDirectories: true)
        let kept = keepDirectory + "/reference-\(lock.withLock { references.count }).out"
        FileManager.default.createFile(atPath: kept, contents: Data(output))
        let reference = Reference(output: output, status: count.status, syscallCount: count.syscallCount, outputPath: kept)
        lock.withLock { references[key] = reference }
        return reference
    }
}
