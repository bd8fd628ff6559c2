// Paths the torture tests need: the built test programs and an executable for the restorer's stub.
import Foundation
import Sys
@testable import Torture

enum TorturePaths {
    /// The package root: this file is Tests/TortureTests/TortureSupport.swift.
    static let packageRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    static let programDirectory = packageRoot + "/TestPrograms/build"

    /// The products directory holds the test bundle and the `torture` executable `swift build --build-tests` built.
    static func torture() throws -> String {
        let executable = URL(fileURLWithPath: (try? ProcFS.readLink("/proc/self/exe")) ?? "/")
        for directory in [Bundle.main.bundlePath, executable.deletingLastPathComponent().path]
        where access(directory + "/torture", X_OK) == 0 {
            return URL(fileURLWithPath: directory + "/torture").resolvingSymlinksInPath().path
        }
        throw TortureTestError.missing("the torture executable next to the test bundle; run swift build --build-tests")
    }

    /// Builds the test programs once per test process.
    static let programsBuilt: Bool = {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/make")
        process.arguments = ["-s", "-C", packageRoot + "/TestPrograms", "-j2"]
        process.standardOutput = FileHandle.nullDevice
        do {
            try process.run()
            process.waitUntilExit()
            return process.terminationStatus == 0
        } catch { return false }
    }()

    static func campaignOptions(seed: UInt64, iterations: Int, filter: ScenarioFilter) throws -> CampaignOptions {
        guard programsBuilt else { throw TortureTestError.missing("built test programs (make -C TestPrograms failed)") }
        var options = CampaignOptions(seed: seed, iterations: iterations, filter: filter, programDirectory: programDirectory,
                                      stubPath: try torture(), workDirectory: "/tmp/torture-tests-\(getpid())-\(seed)")
        options.jobs = 2
        return options
    }
}

enum TortureTestError: Error, CustomStringConvertible {
    case missing(String)
    var description: String {
        switch self {
        case .missing(let what): "missing \(what)"
        }
    }
}
