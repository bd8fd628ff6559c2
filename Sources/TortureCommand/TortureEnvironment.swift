// The torture command's environment (test programs, stub, work directory), its regression seeds and its
// failure pages (TortureCommand.swift runs the campaign).
import ArgumentParser
import Engine
import Foundation
import Sys
import Torture

extension TortureCommand {
    /// Where the HTML pages of failing seeds go: --html-report, or beside the JSON report.
    var htmlDirectory: String? {
        htmlReport ?? json.map { URL(fileURLWithPath: $0).deletingLastPathComponent().path }
    }

    /// One page per failing seed, its schedule replayed with the trace kept (the same seed gives the same
    /// schedule), and the shrunk schedule beside the first.
    func writeHTMLReports(_ campaign: Campaign, failing: [IterationResult], shrunk: Shrunk?) throws {
        guard let directory = htmlDirectory, !failing.isEmpty else { return }
        do { try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true) } catch {
            throw ValidationError("cannot create \(directory) for --html-report: \(error)")
        }
        for (position, result) in failing.enumerated() {
            let seed = result.scenario.seed
            var traced = result.trace != nil ? result : campaign.runOne(seed: seed, filter: filter, keepTrace: true)
            var title = "Schedule (\(traced.stepCount) steps, trace \(traced.traceHash))"
            if traced.traceHash != result.traceHash {
                // The seed took another schedule this time: the page shows the replay's steps, says so, and
                // keeps the failure's own verdicts (the replay's oracle step belongs to the other schedule).
                title = "Replayed schedule (\(traced.stepCount) steps, trace \(traced.traceHash)), not the failing one "
                    + "(\(result.stepCount) steps, trace \(result.traceHash)): the seed did not replay, which is uncontrolled nondeterminism"
                print("torture: seed \(Report.hexSeed(seed)) did not replay: the failure took \(result.stepCount) steps (trace "
                      + "\(result.traceHash)), the replay \(traced.stepCount) (trace \(traced.traceHash), \(traced.passed ? "passed" : "failed"))")
                traced.failures = result.failures
                traced.passed = false
            }
            let schedule = HTMLReport.Schedule(title: title, replay: Report.replayCommand(seed: seed, filter: filter), result: traced,
                                               trace: traced.trace ?? [])
            var shrunkSchedule: HTMLReport.Schedule?
            if position == 0, let shrunk {
                let replayed = campaign.runOne(seed: seed, filter: shrunk.filter, keepTrace: true)
                shrunkSchedule = HTMLReport.Schedule(title: "Shrunk schedule (\(replayed.stepCount) steps, trace \(replayed.traceHash))",
                                                     replay: Report.replayCommand(seed: seed, filter: shrunk.filter), result: replayed,
                                                     trace: replayed.trace ?? [])
            }
            let path = directory + "/torture-\(Report.hexSeed(seed)).html"
            do { try HTMLReport.page(failing: schedule, shrunk: shrunkSchedule).write(toFile: path, atomically: true, encoding: .utf8) } catch {
                throw ReportError.cannotWrite(path, "\(error)")
            }
            print("failure report: \(path)")
        }
    }

    /// Replays the regression file's seeds (each with its own filters), printing a line for each.
    func runRegressions(_ campaign: Campaign, environment: (programs: String, stub: String, work: String)) throws -> [IterationResult] {
        if noRegressions { return [] }
        let defaultPath = URL(fileURLWithPath: environment.programs + "/../../Tests/torture/regressions.txt").standardized.path
        let path = regressions ?? defaultPath
        guard ProcFS.exists(path) else {
            if regressions != nil { throw ValidationError("no regression file at \(path); pass --regressions FILE or --no-regressions.") }
            return []
        }
        let seeds: [RegressionSeed]
        do { seeds = try Regressions.parse(try ProcFS.readText(path), path: path) } catch {
            throw ValidationError("\(error)")
        }
        let results = campaign.runRegressions(seeds, path: path) { result, _ in
            if !result.passed { print("regression " + Report.line(result)) }
        }
        print("\(results.filter(\.passed).count) of \(seeds.count) regression seeds passed (\(path))")
        return results
    }

    func locateEnvironment() throws -> (programs: String, stub: String, work: String) {
        let executable = (try? ProcFS.readLink("/proc/self/exe")) ?? CommandLine.arguments[0]
        let candidates: [String?] = programs != nil ? [programs] : [ProcessInfo.processInfo.environment["FAMMIG_TEST_PROGRAMS"], "TestPrograms/build",
                          URL(fileURLWithPath: executable).deletingLastPathComponent().appendingPathComponent("../../TestPrograms/build").standardized.path]
        guard let directory = candidates.compactMap({ $0 }).first(where: { ProcFS.exists($0 + "/memwalk-static") }) else {
            throw ValidationError("no built test programs found (looked for memwalk-static in \(programs ?? "TestPrograms/build")); run scripts/setup or pass --programs DIR.")
        }
        let absolute = directory.hasPrefix("/") ? directory : FileManager.default.currentDirectoryPath + "/" + directory
        for spec in ProgramSpec.catalog where !ProcFS.exists(absolute + "/" + spec.binary) {
            throw ValidationError("\(absolute)/\(spec.binary) is missing; run make -C TestPrograms.")
        }
        // One length for every run's name (pids have up to 7 digits): a program's arguments name it.
        // The stub is this very executable, named by /proc/self/exe in the child that execs it: a binary
        // rebuilt (replaced) while a campaign runs would otherwise start half-written or another torture.
        return (absolute, "/proc/self/exe", "/tmp/torture-" + String(getpid() + 10_000_000).dropFirst())
    }
}
