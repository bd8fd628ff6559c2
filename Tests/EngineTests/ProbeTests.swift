// Issue 12's probes that had no test of their own yet, on real processes: a rogue listener where a root
// `fammig target --connect` looks (silent, forging the source's proof, or sending state before any
// proof) gets nothing and hands nothing over: the target exits 2 naming why and creates no process; and
// `run --json` writes its report 0644 even under umask 0.
import Foundation
import Glibc
import Testing
@testable import Engine
import Sys

extension ProcessTests {
    @Suite(.serialized) struct ProbeTests {
        enum RogueListener: String, CaseIterable { case silent, forgedProof, stateBeforeProof }

        @Test(arguments: RogueListener.allCases) func aRogueListenerIsRefusedByTheTarget(_ rogue: RogueListener) throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let keyPath = directory.path("migration.key")
            try writeKeyFile(MigrationKey.generate(), to: keyPath)
            let port = 29000 + Int(getpid() % 1000) + 1000 * (RogueListener.allCases.firstIndex(of: rogue) ?? 0)
            let connected = try ListenerWithTarget.start(port: port, keyPath: keyPath, directory: directory, leftovers: leftovers)
            defer { connected.close() }
            let (target, accepted) = (connected.target, connected.accepted)
            let agreement = ChannelAgreement(mode: .postcopySocket, generation: MigrationPlan.singleGeneration)
            let nonce = SecureChannel.randomNonce()
            let expected: String
            switch rogue {
            case .silent:
                expected = "did not complete the handshake within 3 s"
            case .forgedProof:
                try accepted.send(.hello(mode: agreement.modeCode, generation: agreement.generation, nonce: nonce, proof: []))
                // The target proves itself first; the rogue cannot answer with a proof of its own.
                var answer: Message?
                _ = pollUntil(timeout: .seconds(10)) {
                    answer = try? accepted.receive()
                    return answer != nil
                }
                guard case .hello(_, _, _, let proof)? = answer else { Issue.record("the target sent no hello: \(String(describing: answer))"); return }
                #expect(!proof.isEmpty)
                try accepted.send(.hello(mode: agreement.modeCode, generation: agreement.generation, nonce: nonce,
                                         proof: proof.map { $0 ^ 0x5A }))
                expected = "did not prove that it holds this migration's key"
            case .stateBeforeProof:
                try accepted.send(.metadata(state: plausibleState(processID: ProcessID(4244), dataRange: 0x7f00_0000_0000..<0x7f00_0000_8000).encoded(),
                                            pageAddresses: []))
                expected = "before proving that it holds the migration key"
            }
            let outcome = try target.waitForExit(timeout: .seconds(30))
            #expect(outcome.exitStatus == 2 && !outcome.killedBySignal, "\(rogue): exit \(outcome.exitStatus): \(outcome.standardError)")
            #expect(outcome.standardError.contains(expected), "\(rogue): \(outcome.standardError)")
            #expect(!outcome.standardOutput.contains("restored pid"), "\(rogue): \(outcome.standardOutput)")
            #expect(processLife(ProcessID(4244)) == .gone)
        }

        /// Timeouts on every wait of the target, with the figure in --help: a source that holds the key,
        /// completes the handshake and then says nothing is given up on after --connect-timeout (the
        /// probe: a target connected to a silent source waited 75 s), exit 1 naming the wait, and no
        /// process is created.
        @Test func aSourceThatFallsSilentAfterTheHandshakeIsGivenUpOn() throws {
            let help = try runCommand(try TestPaths.fammig(), ["target", "--help"])
            let helpText = help.standardOutput.split(whereSeparator: \.isWhitespace).joined(separator: " ")
            #expect(helpText.contains("--connect-timeout") && helpText.contains("(default: 30)"), "\(helpText)")
            #expect(helpText.contains("and then for the process state"), "the help does not say what --connect-timeout bounds: \(helpText)")
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let key = MigrationKey.generate()
            let keyPath = directory.path("migration.key")
            try writeKeyFile(key, to: keyPath)
            let port = 33000 + Int(getpid() % 1000)
            let connected = try ListenerWithTarget.start(port: port, keyPath: keyPath, directory: directory, leftovers: leftovers)
            defer { connected.close() }
            let (target, accepted) = (connected.target, connected.accepted)
            let channel = try SecureChannel.establish(over: accepted, role: .source, key: key,
                                                      agreement: ChannelAgreement(mode: .postcopySocket, generation: MigrationPlan.singleGeneration),
                                                      nonce: SecureChannel.randomNonce())
            defer { channel.close() }
            let outcome = try target.waitForExit(timeout: .seconds(60))
            #expect(outcome.exitStatus != 0 && !outcome.killedBySignal, "exit \(outcome.exitStatus): \(outcome.standardError)")
            #expect(outcome.standardError.contains("within"), "the target does not name the wait: \(outcome.standardError)")
            #expect(!outcome.standardOutput.contains("restored pid"), "\(outcome.standardOutput)")
        }

        @Test func runReportsAreNotWritableByOthersWhateverTheUmask() throws {
            let directory = try ScratchDirectory(under: "/tmp")
            defer { directory.remove() }
            let leftovers = LeftoverCheck()
            defer { leftovers.finish() }
            let program = try TestPaths.testProgram("memwalk-static")
            let arguments = ["--mib", "4", "--steps", "20000", "--pause-us", "2000"]
            leftovers.expectProgram([program] + arguments)
            let jsonPath = directory.path("report.json")
            let quoted = ([try TestPaths.fammig(), "run", "--after-ms", "30", "--no-reference", "--json", jsonPath, "--", program] + arguments)
                .map { "'\($0)'" }.joined(separator: " ")
            let outcome = try runCommand("/bin/sh", ["-c", "umask 0; exec \(quoted)"], timeout: .seconds(120))
            #expect(outcome.exitStatus == 0, "\(outcome.standardError)")
            let mode = try #require(try FileManager.default.attributesOfItem(atPath: jsonPath)[.posixPermissions] as? Int)
            #expect(mode == 0o644, "report mode \(String(mode, radix: 8))")
        }
    }
}
