// Issue 12: the migration key handed as a descriptor (`--key-fd N`) to the commands that read it
// (restore, inspect, target), so an orchestrator need not write it to a file at all. The descriptor is
// read to its end and closed (never inherited by a process fammig starts later).
import Foundation
import Testing
@testable import Engine
import Sys

extension ProcessTests {
    @Suite(.serialized) struct KeyDescriptorTests {
        /// fammig with fd 3 read from `keyPath` (through sh, which opens it).
        func fammigWithKeyOnDescriptor(_ arguments: [String], keyPath: String) throws -> CommandOutcome {
            let quoted = ([try TestPaths.fammig()] + arguments).map { "'\($0)'" }.joined(separator: " ")
            return try runCommand("/bin/sh", ["-c", "exec \(quoted) 3< '\(keyPath)'"])
        }

        @Test func inspectTakesTheKeyFromADescriptor() throws {
            let files = ScratchFiles()
            defer { files.removeAll() }
            let source = try SourceMemory(path: files.path("source"))
            let imagePath = files.path("image")
            try writeAuthenticatedImage(path: imagePath, state: plausibleState(processID: ProcessID(4242), dataRange: dataRange(of: source)),
                                        source: source, creator: .current())
            let keyPath = files.path("key"), otherKeyPath = files.path("other"), garbagePath = files.path("garbage")
            try writeKeyFile(testKey, to: keyPath)
            try writeKeyFile(otherTestKey, to: otherKeyPath)
            try #require(FileManager.default.createFile(atPath: garbagePath, contents: Data("not a key\n".utf8)))

            let inspect = try fammigWithKeyOnDescriptor(["inspect", "--fam", imagePath, "--key-fd", "3"], keyPath: keyPath)
            #expect(inspect.exitStatus == 0, "inspect --key-fd: \(inspect.standardError)\(inspect.standardOutput)")
            #expect(inspect.standardOutput.contains("HMAC-SHA256 OK"), "\(inspect.standardOutput)")

            let other = try fammigWithKeyOnDescriptor(["inspect", "--fam", imagePath, "--key-fd", "3"], keyPath: otherKeyPath)
            #expect(other.exitStatus == 2 && other.standardError.contains("wrong key"), "\(other.standardError)")
            let garbage = try fammigWithKeyOnDescriptor(["inspect", "--fam", imagePath, "--key-fd", "3"], keyPath: garbagePath)
            #expect(garbage.exitStatus == 2 && garbage.standardError.contains("--key-fd 3 is not a fammig migration key"), "\(garbage.standardError)")
            let closed = try runCommand(try TestPaths.fammig(), ["inspect", "--fam", imagePath, "--key-fd", "9"])
            #expect(closed.exitStatus == 2 && closed.standardError.contains("cannot read the key from --key-fd 9"), "\(closed.standardError)")
            for arguments in [["inspect", "--fam", imagePath], ["inspect", "--fam", imagePath, "--key-file", keyPath, "--key-fd", "3"]] {
                let outcome = try fammigWithKeyOnDescriptor(arguments, keyPath: keyPath)
                #expect(outcome.exitStatus == 2 && outcome.standardError.contains("--key-file PATH or --key-fd N"), "\(outcome.standardError)")
            }
        }
    }
}
