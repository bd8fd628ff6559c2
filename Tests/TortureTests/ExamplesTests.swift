// The worked examples (examples/) are checked against their schemas by scripts/validate-examples, with
// validators from PyPI; a broken copy of each must be refused, or the check would prove nothing.
import Foundation
import Testing

@Suite struct ExamplesTests {
    func validate(_ arguments: [String]) throws -> (status: Int32, output: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: TorturePaths.packageRoot + "/scripts/validate-examples")
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    @Test func theWorkflowAndTheIndexedJobValidateAgainstTheirSchemas() throws {
        let result = try validate([])
        #expect(result.status == 0, "\(result.output)")
        #expect(result.output.contains("job/torture-shards"))
        #expect(result.output.contains("job/torture-merge"))
    }

    @Test func brokenCopiesAreRefused() throws {
        let directory = "/tmp/torture-examples-\(getpid())"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let root = TorturePaths.packageRoot + "/examples/"
        let workflow = try String(contentsOfFile: root + "github-actions/torture.yml", encoding: .utf8)
        let job = try String(contentsOfFile: root + "kubernetes/torture-shards.yaml", encoding: .utf8)
        let broken: [(option: String, name: String, text: String)] = [
            ("--workflow", "no-runs-on.yml", workflow.replacingOccurrences(of: "runs-on:", with: "runs_on:")),
            ("--kubernetes", "unknown-field.yaml", job.replacingOccurrences(of: "seccompProfile:", with: "seccompProfiles:")),
            ("--kubernetes", "wrong-type.yaml", job.replacingOccurrences(of: "parallelism: 4", with: "parallelism: four")),
        ]
        for (option, name, text) in broken {
            #expect(text.contains("runs_on") || text.contains("seccompProfiles") || text.contains("four"), "the test's edit of \(name) took")
            try text.write(toFile: directory + "/" + name, atomically: true, encoding: .utf8)
            let result = try validate([option, directory + "/" + name])
            #expect(result.status == 1, "\(name) was accepted: \(result.output)")
        }
    }
}
