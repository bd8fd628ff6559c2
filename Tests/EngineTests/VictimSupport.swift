// What the tests that migrate a timed victim share: the check that the victim still runs right before the
// command under test (a victim that ended by itself under load made CI report "pid N: no such process",
// an engine error that hid the cause), a victim started by `fammig launch` with its unmigrated checksum,
// the two node commands' arguments, and a listener that a `fammig target` connects to.
import Engine
import Foundation
import Sys
import Testing

/// Stops the test, saying why, when the victim ended by itself before the command under test: its work
/// was too short for this machine's load, which the engine would only report as a missing process.
func requireVictimAlive(_ processID: ProcessID, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let life = processLife(processID)
    try #require(life == .running, "the victim ended before the test's command: give it more work (pid \(processID): \(life))",
                 sourceLocation: sourceLocation)
}

func requireVictimAlive(_ processID: Int32, sourceLocation: SourceLocation = #_sourceLocation) throws {
    try requireVictimAlive(ProcessID(processID), sourceLocation: sourceLocation)
}

/// A victim that `fammig launch` started as pid 1 of its own PID namespace, its stdout in `outputPath`,
/// and its unmigrated run's output and the checksum line that ends it.
struct LaunchedVictim {
    let processID: ProcessID
    let outputPath: String
    let referenceOutput: String
    let referenceChecksum: String

    /// Runs `program` once unmigrated (for its checksum), then launches it; `leftovers` expects it.
    static func launch(_ program: String, _ arguments: [String], directory: ScratchDirectory,
                       leftovers: LeftoverCheck) throws -> LaunchedVictim {
        leftovers.expectProgram([program] + arguments)
        let reference = try runCommand(program, arguments, timeout: .seconds(60))
        let referenceChecksum = try #require(reference.standardOutput.split(separator: "\n").last.map(String.init))
        let outputPath = directory.path("victim.out")
        let launched = try leftovers.fammig(["launch", "--output", outputPath, "--", program] + arguments)
        let victim = try #require(Int32(launched.standardOutput.trimmingCharacters(in: .whitespacesAndNewlines)))
        return LaunchedVictim(processID: ProcessID(victim), outputPath: outputPath, referenceOutput: reference.standardOutput,
                              referenceChecksum: referenceChecksum)
    }

    /// Whether the restored process printed its checksum line within `timeout`.
    func restoredProcessFinished(timeout: Duration = .seconds(30)) -> Bool {
        pollUntil(timeout: timeout) { (try? String(contentsOfFile: outputPath, encoding: .utf8))?.contains("checksum=") == true }
    }
}

/// `fammig source` and `fammig target` arguments for migrating `victim` in `mode` over loopback `port`,
/// a fresh PID namespace on the target, the key file the source writes, and (postcopy-fam) `famPath`.
func twoNodeArguments(mode: String, victim: ProcessID, port: Int, keyPath: String, famPath: String) -> (source: [String], target: [String]) {
    var source = ["source", "--pid", "\(victim)", "--mode", mode, "--listen", "127.0.0.1:\(port)", "--key-file", keyPath]
    var target = ["target", "--mode", mode, "--connect", "127.0.0.1:\(port)", "--pid-namespace", "fresh", "--key-file", keyPath]
    if mode == "postcopy-fam" {
        source += ["--fam", famPath]
        target += ["--fam", famPath]
    }
    return (source, target)
}

/// `fammig source` started with `arguments`, its output in `directory` (source.out, source.err).
func startSource(_ arguments: [String], directory: ScratchDirectory, leftovers: LeftoverCheck) throws -> StartedProcess {
    leftovers.own(try StartedProcess(try TestPaths.fammig(), arguments, standardOutputPath: directory.path("source.out"),
                                     standardErrorPath: directory.path("source.err")))
}

/// A listener on loopback `port` and the postcopy-socket `fammig target` (fresh PID namespace, a 3 s
/// --connect-timeout) that connected to it: the test plays the source, or a rogue in its place.
struct ListenerWithTarget {
    let listener: TCPListener
    let target: StartedProcess
    let accepted: TCPTransport

    static func start(port: Int, keyPath: String, directory: ScratchDirectory, leftovers: LeftoverCheck) throws -> ListenerWithTarget {
        let listener = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: UInt16(port)))
        let target: StartedProcess
        let accepted: TCPTransport
        do {
            target = leftovers.own(try StartedProcess(try TestPaths.fammig(),
                                                      ["target", "--mode", "postcopy-socket", "--key-file", keyPath, "--connect", "127.0.0.1:\(port)",
                                                       "--pid-namespace", "fresh", "--connect-timeout", "3"],
                                                      standardOutputPath: directory.path("target.out"),
                                                      standardErrorPath: directory.path("target.err")))
            accepted = try #require(try TCPTransport.accept(on: listener, timeoutMilliseconds: 20_000), "the target never connected")
        } catch {
            listener.close()
            throw error
        }
        return ListenerWithTarget(listener: listener, target: target, accepted: accepted)
    }

    func close() {
        accepted.close()
        listener.close()
    }
}
