// Why this file exists: a campaign is many iterations, each with a seed derived from the campaign's
// seed and its index, spread over worker threads (each iteration stays on one thread: ptrace and the
// deterministic driver need that) and, with shards, over CI machines.
import Engine
import Foundation
import Synchronization
import Sys

public struct CampaignOptions: Sendable {
    public var seed: UInt64
    public var iterations: Int
    public var filter: ScenarioFilter
    /// This machine runs indices with index % count == part - 1.
    public var shard: (part: Int, count: Int) = (1, 1)
    public var jobs: Int = 1
    /// Stop taking new iterations after the first failure (finding iterations-to-first-failure).
    public var failFast = false
    /// Run every iteration twice and fail it when the two schedules differ (uncontrolled nondeterminism).
    public var checkDeterminism = false
    /// See `TortureEnvironment.sourceFAMWrapper`.
    public var sourceFAMWrapper: (@Sendable (any FAMBackend) -> any FAMBackend)?
    public var programDirectory: String
    public var stubPath: String
    public var workDirectory: String

    public init(seed: UInt64, iterations: Int, filter: ScenarioFilter, programDirectory: String, stubPath: String, workDirectory: String) {
        self.seed = seed
        self.iterations = iterations
        self.filter = filter
        self.programDirectory = programDirectory
        self.stubPath = stubPath
        self.workDirectory = workDirectory
    }

    /// The iteration indices this shard runs.
    public var indices: [Int] { (0..<iterations).filter { $0 % shard.count == shard.part - 1 } }
}

public final class Campaign: Sendable {
    public let options: CampaignOptions
    private let references = ReferenceCache()
    public let ledger = ModelFAMLedger()

    public init(options: CampaignOptions) {
        self.options = options
    }

    /// Runs one iteration on the calling thread (twice with `checkDeterminism`).
    public func runOne(seed: UInt64, filter: ScenarioFilter, worker: Int = 0, keepTrace: Bool,
                       traceSink: ((String) -> Void)? = nil, checkDeterminism: Bool? = nil) -> IterationResult {
        var filter = filter
        if filter.chaos {
            // Chaos has no nemesis and no model FAM to tamper with: its adversary is time itself.
            filter.noKill = true
            filter.tamper = false
            filter.racer = false
            filter.bystander = false
            filter.killTarget = false
            filter.attacker = false
        }
        let scenario = Scenario.make(seed: seed, filter: filter)
        var environment = TortureEnvironment(programDirectory: options.programDirectory, stubPath: options.stubPath,
                                             workDirectory: workDirectory(worker: worker))
        environment.sourceFAMWrapper = options.sourceFAMWrapper
        if filter.chaos { return ChaosIteration(scenario: scenario, environment: environment, references: references).run() }
        let iteration = Iteration(scenario: scenario, environment: environment, references: references, ledger: ledger)
        guard checkDeterminism ?? options.checkDeterminism else { return iteration.run(keepTrace: keepTrace, traceSink: traceSink) }
        var first = iteration.run(keepTrace: true, traceSink: traceSink)
        let second = iteration.run(keepTrace: true)
        if let difference = Self.firstDifference(first.trace ?? [], second.trace ?? []), first.environmentError == nil,
           second.environmentError == nil {
            first.failures.append("determinism: the same seed gave two schedules (trace \(first.traceHash), then \(second.traceHash)); "
                                  + "they part at step \(difference.step): \(difference.first) | \(difference.second)")
            first.passed = false
        }
        if !keepTrace { first.trace = nil }
        return first
    }

    /// The directory worker `worker`'s iterations run in (each empties it; it stays for the next).
    func workDirectory(worker: Int) -> String { options.workDirectory + "/w" + String(worker + 100).dropFirst() }

    /// Removes worker `worker`'s directory, once it runs no more iterations.
    public func removeWorkDirectory(worker: Int) { try? FileManager.default.removeItem(atPath: workDirectory(worker: worker)) }

    /// Where two traces part: the first step whose lines differ, or where one ends.
    static func firstDifference(_ first: [String], _ second: [String]) -> (step: Int, first: String, second: String)? {
        for index in 0..<max(first.count, second.count) {
            let one = index < first.count ? first[index] : "(ended)"
            let other = index < second.count ? second[index] : "(ended)"
            if one != other { return (index + 1, one, other) }
        }
        return nil
    }

    /// What the campaign left behind, checked once every worker is done: descriptors of this process
    /// that were not open before, children (victims, targets, stubs) not reaped, model FAMs still mapped.
    /// Empty when nothing leaked.
    public var leaks: [String] { leakList.withLock { $0 } }
    private let leakList = Mutex<[String]>([])

    /// This process's descriptors, except those the runtime opens for itself on first use (Dispatch's
    /// event loop: eventfd, epoll, timerfd).
    static func ownDescriptors() -> Set<Int32> {
        let all = (try? ProcFS.descriptors(ProcessID(rawValue: getpid()))) ?? []
        return Set(all.filter { descriptor in
            let target = (try? ProcFS.readLink("/proc/self/fd/\(descriptor)")) ?? ""
            return !["anon_inode:[eventfd]", "anon_inode:[eventpoll]", "anon_inode:[timerfd]"].contains(target)
        })
    }

    static func ownChildren() -> [String] {
        let tasks = (try? ProcFS.directoryEntries("/proc/self/task")) ?? []
        return tasks.flatMap { task in
            ((try? ProcFS.readText("/proc/self/task/\(task)/children")) ?? "").split(separator: " ").map(String.init)
        }
    }

    /// Runs the shard's iterations on `jobs` threads; `report` is called (serialised) after each.
    public func run(report: @escaping @Sendable (IterationResult, Int) -> Void) -> [IterationResult] {
        let descriptorsBefore = Self.ownDescriptors()
        let childrenBefore = Set(Self.ownChildren())
        defer {
            var found: [String] = []
            let leakedDescriptors = Self.ownDescriptors().subtracting(descriptorsBefore)
            if !leakedDescriptors.isEmpty {
                found.append("descriptors left open: \(leakedDescriptors.sorted().map { "\($0) → \((try? ProcFS.readLink("/proc/self/fd/\($0)")) ?? "?")" })")
            }
            let children = Set(Self.ownChildren()).subtracting(childrenBefore)
            if !children.isEmpty {
                // Who they are, so the leak can be traced to the part that started them.
                found.append("processes left behind: " + children.sorted().map { child in
                    let commandLine = ((try? ProcFS.readFile("/proc/\(child)/cmdline")) ?? []).split(separator: 0)
                        .map { String(decoding: $0, as: UTF8.self) }.joined(separator: " ")
                    let state = (try? ProcFS.statFields(ProcessID(rawValue: Int32(child) ?? 0)))?[3] ?? "?"
                    return "\(child) (\(commandLine.isEmpty ? "?" : commandLine), state \(state))"
                }.joined(separator: ", "))
            }
            if ledger.liveModelCount > 0 { found.append("\(ledger.liveModelCount) model FAMs still mapped") }
            leakList.withLock { $0 = found }
        }
        let indices = options.indices
        let next = Mutex(0)
        let results = Mutex<[Int: IterationResult]>([:])
        let reportLock = Mutex(0)
        let failureSeen = Mutex(false)
        let group = DispatchGroup()
        for worker in 0..<max(1, options.jobs) {
            group.enter()
            let thread = Thread { [self] in
                defer {
                    removeWorkDirectory(worker: worker)
                    group.leave()
                }
                while !(options.failFast && failureSeen.withLock { $0 }) {
                    let position = next.withLock { value -> Int in
                        defer { value += 1 }
                        return value
                    }
                    guard position < indices.count else { return }
                    let index = indices[position]
                    let seed = Scenario.iterationSeed(campaignSeed: options.seed, index: index)
                    // Every iteration keeps its schedule until it passes: a failure that does not replay
                    // (uncontrolled nondeterminism) still shows the steps it took, in the reports.
                    var result = runOne(seed: seed, filter: options.filter, worker: worker, keepTrace: true)
                    if result.passed { result.trace = nil }
                    results.withLock { $0[index] = result }
                    if !result.passed { failureSeen.withLock { $0 = true } }
                    reportLock.withLock { done in
                        done += 1
                        report(result, done)
                    }
                }
            }
            thread.stackSize = 16 << 20
            thread.start()
        }
        group.wait()
        let collected = results.withLock { $0 }
        return indices.compactMap { collected[$0] }
    }

    /// The position (1-based, in the shard's order) of the first failing iteration among `results`.
    public static func firstFailurePosition(_ results: [IterationResult], options: CampaignOptions) -> Int? {
        let indices = options.indices
        for (position, index) in indices.enumerated() {
            let seed = Scenario.iterationSeed(campaignSeed: options.seed, index: index)
            if let result = results.first(where: { $0.scenario.seed == seed }), !result.passed { return position + 1 }
        }
        return nil
    }
}
