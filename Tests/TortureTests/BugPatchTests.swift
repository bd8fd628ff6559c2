// The deliberate engine bugs of Tests/bugs/ prove that torture catches what a developer would really get
// wrong (scripts/bug-hunt, Tests/bugs/README.md). A refactor that moves the lines a patch changes makes
// it stop applying, and the proof silently shrinks: six patches had rotted so before this check. Every
// patch must apply to today's tree; when one does not, rewrite it against the new lines.
import Foundation
import Testing

@Suite struct BugPatchTests {
    @Test func everyDeliberateBugAppliesToTodaysTree() throws {
        let directory = TorturePaths.packageRoot + "/Tests/bugs"
        let patches = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".patch") }.sorted()
        #expect(patches.count >= 32, "the deliberate bugs are gone: \(patches)")
        for patch in patches {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/git")
            process.arguments = ["-C", TorturePaths.packageRoot, "apply", "--check", directory + "/" + patch]
            let pipe = Pipe()
            process.standardOutput = pipe
            process.standardError = pipe
            try process.run()
            let output = pipe.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            #expect(process.terminationStatus == 0, "\(patch) no longer applies: \(String(decoding: output, as: UTF8.self))")
        }
    }
}
