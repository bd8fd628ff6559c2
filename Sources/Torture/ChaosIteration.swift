// Why this file exists: one chaos iteration (see Chaos.swift). The seed's scenario gives the mode, the
// program and its rendezvous as for torture; the migration runs under the threaded driver with a real FAM
// file, real TCP on loopback and the seeded perturbations; the oracles judge it (state and registers,
// every page as copied, the program's exit and whole output against the reference run, no target left).
import Engine
import Foundation
import Logging
import Oracles
import Sys

public struct ChaosIteration {
    public let scenario: Scenario
    public let environment: TortureEnvironment
    public let references: ReferenceCache

    public init(scenario: Scenario, environment: TortureEnvironment, references: ReferenceCache) {
        self.scenario = scenario
        self.environment = environment
        self.references = references
    }

    public func run() -> IterationResult {
        let clock = ContinuousClock()
        let start = clock.now
        var result = IterationResult(scenario: scenario, passed: false, failures: [], traceHash: "chaos", stepCount: 0,
                                     outcome: "not started", milliseconds: 0)
        let work = environment.workDirectory
        do {
            try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(atPath: work) }
            try migrate(into: &result)
        } catch {
            result.environmentError = "\(error)"
        }
        result.passed = result.failures.isEmpty && result.environmentError == nil
        let elapsed = clock.now - start
        result.milliseconds = Double(elapsed.components.seconds) * 1000 + Double(elapsed.components.attoseconds) / 1e15
        return result
    }

    private func migrate(into result: inout IterationResult) throws {
        let binary = environment.programDirectory + "/" + scenario.binary
        let work = environment.workDirectory
        let arguments = scenario.arguments(workDirectory: work)
        let reference = try references.output(binary: binary, arguments: arguments, workDirectory: work)
        let outputPath = work + "/victim.out"
        // Randomised addresses (chaos needs no repeatable layout), and so no PDEATHSIG: restored with it, a
        // process dies when the restorer's actor thread ends (see the note on parent-death signals).
        let victim = try startAtRendezvous(binary: binary, arguments: arguments, outputPath: outputPath, errorPath: work + "/victim.err",
                                           repeatable: false)
        defer { Spawn.killAndReap(victim) }

        let perturbation = Perturbation(seed: scenario.seed)
        let famPath = "/dev/shm/fammig-chaos-\(getpid())-\(String(scenario.seed, radix: 16)).img"
        defer { unlink(famPath) }
        let oracles = MigrationOracles()
        let timeline = MigrationTimeline()
        let metrics = FaultMetrics()
        let monotonic = MonotonicClock()
        var logger = Logger(label: "torture-chaos")
        logger.logLevel = .critical
        let gate = ChaoticGate(perturbation: perturbation, releaseSignal: SIGUSR2)
        let makeBackend: (Int) throws(ImageError) -> any FAMBackend = { (byteCount) throws(ImageError) in
            unlink(famPath)  // a second call replaces the estimate's file
            return ChaoticFAM(try RealFAM.create(path: famPath, byteCount: byteCount, prefault: true), perturbation: perturbation)
        }
        let openBackend: () throws(ImageError) -> (any FAMBackend)? = { () throws(ImageError) in
            guard ProcFS.exists(famPath) else { return nil }
            return try RealFAM.open(path: famPath, writable: false)
        }

        var transports: [any Transport] = []
        defer { transports.forEach { $0.close() } }
        var source: (any Transport)?
        var target: (any Transport)?
        if scenario.mode.isPostcopy {
            let listener = try TCPTransport.listen(on: Endpoint(host: "127.0.0.1", port: 0))
            defer { listener.close() }
            let targetSide = try TCPTransport.connect(to: listener.endpoint, timeoutMilliseconds: 5000)
            transports.append(targetSide)
            guard let sourceSide = try TCPTransport.accept(on: listener, timeoutMilliseconds: 5000) else {
                throw TortureError.environment("the chaos target's connection never reached the source")
            }
            transports.append(sourceSide)
            let channel = try SecureChannel.establishBoth(source: sourceSide, target: targetSide, key: MigrationKey.forIteration(seed: scenario.seed),
                                                          agreement: ChannelAgreement(mode: scenario.mode, generation: scenario.seed | 1))
            source = ChaoticTransport(channel.source, perturbation: perturbation)
            target = ChaoticTransport(channel.target, perturbation: perturbation)
            oracles.expectLazyPages()
        }
        let key = MigrationKey.forIteration(seed: scenario.seed)
        let plan = MigrationPlan(mode: scenario.mode, push: scenario.push, generation: scenario.seed | 1, key: key,
                                 batchPageCount: scenario.batchPageCount)
        let sourceNode = try Migration.source(plan, victim: victim, ports: SourcePorts(
            makeBackend: makeBackend, transport: source, observer: oracles, clock: monotonic, timeline: timeline, logger: logger))
        let targetNode = try Migration.target(plan, ports: TargetPorts(
            openBackend: openBackend, transport: target, stubPath: environment.stubPath, observer: oracles, clock: monotonic,
            timeline: timeline, metrics: metrics, logger: logger, pidNamespace: .fresh, gate: gate, imageWait: .seconds(30)))
        let restorer = targetNode.restorer
        let actors = sourceNode.actors + targetNode.actors

        var failures: [String] = []
        do {
            try ThreadedDriver(logger: logger, deadline: .seconds(60)).run(actors.map { ChaoticActor($0, perturbation: perturbation) })
            result.outcome = "completed"
        } catch {
            result.outcome = "failed: \(error)"
            failures.append("migration: \(error)")
        }
        for verdict in oracles.verdicts where !verdict.passed { failures.append("\(verdict.name): \(verdict.detail)") }
        if let target = restorer.restoredProcessID {
            if Spawn.endsSoon(target, graceMilliseconds: 30_000) {
                let status = try? Spawn.waitForExit(target)
                if status != .exited(0) {
                    failures.append("program: the migrated program \(status.map { "\($0)" } ?? "never ended"): \(firstLine(work + "/victim.err"))")
                }
            } else {
                failures.append("liveness: the migrated program did not end within 30 s")
                Spawn.killAndReap(target)
            }
            let output = (try? ProcFS.readFile(outputPath)) ?? []
            if result.outcome == "completed" && output != reference {
                failures.append("end to end: stdout differs from the reference run")
            }
        } else if result.outcome == "completed" {
            failures.append("migration: completed without a restored process")
        }
        result.failures = failures
    }
}
