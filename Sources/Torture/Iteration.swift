// Why this file exists: one torture iteration, start to end. The victim runs to its rendezvous (a fixed
// point, no address randomisation), the engine's actors migrate it under the deterministic driver with
// the model FAM and the in-memory transport, the restored program runs to its end, and every oracle
// judges the result: state and registers, every page, the program's whole output against a reference
// run, the FAM checker, the nemesis' expected ending, and that nothing is left behind.
import Engine
import Foundation
import Logging
import Oracles
import Sys

public struct Iteration {
    public let scenario: Scenario
    public let environment: TortureEnvironment
    public let references: ReferenceCache
    public let ledger: ModelFAMLedger

    public init(scenario: Scenario, environment: TortureEnvironment, references: ReferenceCache, ledger: ModelFAMLedger) {
        self.scenario = scenario
        self.environment = environment
        self.references = references
        self.ledger = ledger
    }

    /// Runs the iteration; `traceSink` sees each step as it is taken.
    public func run(keepTrace: Bool, traceSink: ((String) -> Void)? = nil) -> IterationResult {
        let clock = ContinuousClock()
        let start = clock.now
        var result = IterationResult(scenario: scenario, passed: false, failures: [], traceHash: "", stepCount: 0,
                                     outcome: "not started", milliseconds: 0)
        let work = environment.workDirectory
        do {
            try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        } catch {
            result.environmentError = "cannot create \(work): \(error)"
            return result
        }
        // What the iteration made goes with it; the directory stays for the worker's next iteration (its
        // campaign removes it): on an ext4 /tmp an rmdir per iteration waited for the journal behind other
        // writers' commits, up to half a second each on a loaded machine, a quarter of a campaign's time.
        Self.removeEntries(of: work)
        defer { Self.removeEntries(of: work) }
        do {
            try migrate(into: &result, keepTrace: keepTrace, traceSink: traceSink)
        } catch {
            result.environmentError = "\(error)"
        }
        result.passed = result.failures.isEmpty && result.environmentError == nil
        result.milliseconds = Double((clock.now - start).components.attoseconds) / 1e15 + Double((clock.now - start).components.seconds) * 1000
        return result
    }

    private func migrate(into result: inout IterationResult, keepTrace: Bool, traceSink: ((String) -> Void)?) throws {
        let isWorkload = scenario.program == Workload.programName
        let binary = isWorkload ? scenario.binary : environment.programDirectory + "/" + scenario.binary
        let work = environment.workDirectory
        // The work directory's name has one length in every run (see TortureCommand), so the program's
        // stack, where its arguments lie, has one layout: the same seed gives the same pages.
        let arguments = scenario.arguments(workDirectory: work)
        let outputPath = work + "/victim.out"
        let wait = scenario.rendezvousWait ?? .sigwait
        let reference: [UInt8]
        let workloadReference: WorkloadReferences.Reference?
        let victim: ProcessID
        if isWorkload {
            let found = try references.workloads.reference(binary: binary, arguments: arguments, workDirectory: work,
                                                           keepDirectory: URL(fileURLWithPath: work).deletingLastPathComponent().path + "/references")
            let syscall = scenario.rendezvous > 0 ? scenario.rendezvous : Workload.freezeSyscall(seed: scenario.seed, count: found.syscallCount)
            result.scenario.rendezvous = syscall
            reference = found.output
            workloadReference = found
            victim = try Workload.startFrozen(binary: binary, arguments: arguments, syscall: syscall, outputPath: outputPath,
                                              errorPath: work + "/victim.err")
        } else {
            reference = try references.output(binary: binary, arguments: arguments, workDirectory: work, wait: wait)
            workloadReference = nil
            victim = try startAtRendezvous(binary: binary, arguments: arguments, outputPath: outputPath,
                                           errorPath: work + "/victim.err", wait: wait)
        }

        var rng = SeededGenerator(seed: scenario.seed)
        let virtualClock = VirtualClock()
        let timeline = MigrationTimeline()
        let metrics = FaultMetrics()
        let observer = TortureObserver()
        var logger = Logger(label: "torture")
        logger.logLevel = .critical
        let runner = TargetRunner(release: isWorkload ? nil : wait, runLimit: environment.targetRunLimit)
        let generation = scenario.seed | 1

        final class ModelBox: @unchecked Sendable { var model: ModelFAM? }
        let box = ModelBox()
        let ledger = self.ledger
        let sourceFAMWrapper = environment.sourceFAMWrapper
        let makeBackend: (Int) throws(ImageError) -> any FAMBackend = { (byteCount) throws(ImageError) in
            do throws(SyscallError) {
                let model = try ModelFAM(byteCount: byteCount, ledger: ledger)
                box.model?.release()  // the dumper's estimate was too small: this one replaces it
                box.model = model
                return sourceFAMWrapper.map { $0(model.sourceNode) } ?? model.sourceNode
            } catch { throw .cannotCreate(path: "model FAM", error) }
        }
        let openBackend: () throws(ImageError) -> (any FAMBackend)? = { box.model?.targetNode }

        let link: MemoryLink? = scenario.mode.isPostcopy ? MemoryLink() : nil
        link?.deliversAtOnce = scenario.instantLink == true
        if scenario.mode.isPostcopy { observer.oracles.expectLazyPages() }
        let key = MigrationKey.forIteration(seed: scenario.seed)
        let plan = MigrationPlan(mode: scenario.mode, push: scenario.push, generation: generation, key: key,
                                 batchPageCount: scenario.batchPageCount)
        // With an attacker on the wire, the link is sealed as between two nodes (nonces from the seed).
        let sealed = scenario.attack == nil ? nil : link.map { link in
            var nonces = SeededGenerator(seed: scenario.seed ^ 0x4E4F_4E43_4553_0000)
            let nonce = { (0..<Message.handshakeNonceByteCount).map { _ in UInt8(truncatingIfNeeded: nonces.below(256)) } }
            return SecureChannel.sealedPair(source: link.source, target: link.target, key: key, sourceNonce: nonce(), targetNonce: nonce())
        }
        let sourceTransport: (any Transport)? = sealed?.source ?? link?.source
        let targetTransport: (any Transport)? = sealed?.target ?? link?.target
        let dumper = try Migration.source(plan, victim: victim, ports: SourcePorts(
            makeBackend: makeBackend, transport: sourceTransport, observer: observer, clock: virtualClock, timeline: timeline,
            logger: logger)).dumper
        let target = try Migration.target(plan, ports: TargetPorts(
            openBackend: openBackend, transport: targetTransport, stubPath: environment.stubPath, observer: observer, clock: virtualClock,
            timeline: timeline, metrics: metrics, logger: logger, pidNamespace: .fresh, gate: runner,
            processIDWait: .milliseconds(50),
            // As short as a target may wait (virtual time): the dumper's retries and 50 ms beyond them.
            imageWait: TargetPorts.shortestImageWait))
        let restorer = target.restorer
        let dumperParticipant = EngineParticipant(dumper, actor: .dumper, notes: observer.notes)
        let restorerParticipant = EngineParticipant(restorer, actor: .restorer, notes: observer.notes)
        let faultHandlerParticipant = target.faultHandler.map { EngineParticipant($0, actor: .faultHandler, notes: observer.notes) }
        let pusherParticipant = target.pusher.map { EngineParticipant($0, actor: .pusher, notes: observer.notes) }
        var participants: [Participant] = [dumperParticipant, restorerParticipant]
        if let faultHandlerParticipant { participants.append(faultHandlerParticipant) }
        if let pusherParticipant { participants.append(pusherParticipant) }
        participants.append(runner)
        if let link { participants.append(LinkParticipant(link: link)) }
        if scenario.mode.usesFAM { participants.append(FabricParticipant(model: { box.model })) }
        let nemesis = scenario.kill.map {
            NemesisParticipant(plan: $0, dumper: dumperParticipant, sourceDumper: dumper, victim: victim, model: { box.model }, link: link)
        }
        if let nemesis { participants.append(nemesis) }
        let tamperer = scenario.tamper.map { TamperParticipant(plan: $0, model: { box.model }, key: key) }
        if let tamperer { participants.append(tamperer) }
        if scenario.racer {
            participants.append(RacingInstaller(memory: { restorer.lazyMemory }, model: { box.model }, observer: observer,
                                                budget: max(1, scenario.batchPageCount / 4), key: key))
        }

        if scenario.bystander == true { participants.append(Bystander(restorer: restorer)) }

        let targetNemesis = scenario.targetKill.flatMap { plan in
            faultHandlerParticipant.map { faultHandler in
                TargetNemesisParticipant(plan: plan, node: [restorerParticipant, faultHandler] + [pusherParticipant].compactMap { $0 },
                                         faultHandler: faultHandler, memory: { restorer.lazyMemory }, link: link, runner: runner)
            }
        }
        if let targetNemesis { participants.append(targetNemesis) }
        let attacker = scenario.attack.map { AttackerParticipant(plan: $0, link: link, model: { box.model }, generation: generation, key: key) }
        if let attacker { participants.append(attacker) }

        let driver = DeterministicDriver(participants: participants, clock: virtualClock,
                                         scheduler: Scheduler(strategy: scenario.strategy, rng: &rng),
                                         stepLimit: environment.stepLimit, adversarialSteps: scenario.adversarialSteps,
                                         repeatLimit: scenario.repeatLimit ?? DeterministicDriver.repeatLimit,
                                         script: scenario.schedule, keepTrace: keepTrace, traceSink: traceSink)
        // The victim may die only once the image is complete (the source then lets it go), or by the
        // nemesis: killed earlier, a failed migration would leave nothing to go back to. Looked at before
        // every step, by what the kernel recorded (a pending SIGKILL), so the verdict does not hang on
        // how fast the death follows.
        var victimKilledEarly: Int?
        let watchesVictim = scenario.mode != .postcopySocket
        let releaseWatch = ReleaseWatch()
        driver.onStep = { step in
            box.model?.currentStep = step
            observer.currentStep = step
            releaseWatch.observe(restorer.lazyMemory)
            guard watchesVictim, victimKilledEarly == nil, nemesis?.fired != true, ProcFS.isKilledOrEnded(victim) else { return }
            let complete = box.model.map { !$0.isReleased && ImageReader.peekState(backend: UncheckedFabricView(model: $0)) == .complete } ?? false
            if !complete { victimKilledEarly = step }
        }
        let outcome = driver.run(rng: &rng)
        // A refusal must leave the victim as it was: not killed (Iteration judges a workload's refusal by it).
        let victimUntouched = !ProcFS.isKilledOrEnded(victim)
        let imageCompleteAtEnd = box.model.map { !$0.isReleased && ImageReader.peekState(backend: UncheckedFabricView(model: $0)) == .complete } ?? false
        result.traceHash = driver.hash.hex
        result.stepCount = driver.stepCount
        if keepTrace {
            result.trace = driver.trace
            result.picks = driver.picks
        }

        // Whatever happened, nothing of this iteration may outlive it: reap the victim, and a target that
        // is still there (it must not be: a failed migration kills it) is a failure, then killed.
        Spawn.killAndReap(victim)
        var failures: [String] = []
        var targetStatus: ExitStatus?
        if let target = restorer.restoredProcessID {
            if case .completed = outcome {
                targetStatus = try? Spawn.waitForExit(target)
            } else {
                // A target whose node released it (every page in, and the process made its own) may run on;
                // any other must be gone, also one that holds every page (its victim may run on).
                if case .failed = outcome, restorer.lazyMemory?.isReleased != true, !Spawn.endsSoon(target, graceMilliseconds: 2000) {
                    failures.append("no harm: the target pid \(target) still runs after a failed migration")
                }
                targetStatus = Spawn.killAndReap(target)
            }
        }
        releaseWatch.close()
        link?.source.close()
        link?.target.close()

        if let nemesis, nemesis.fired {
            result.killedAt = scenario.mode == .postcopySocket ? "socket" : nemesis.imageStateAtKill.map { "\($0)" } ?? "no image"
        }
        // Oracles.
        let killedBeforeCommit: Bool
        if let nemesis, nemesis.fired { killedBeforeCommit = nemesis.imageStateAtKill != .complete } else { killedBeforeCommit = false }
        switch outcome {
        case .completed:
            result.outcome = "completed"
            for verdict in observer.oracles.verdicts where !verdict.passed { failures.append("\(verdict.name): \(verdict.detail)") }
            // Nonlive installs every page before the run; post-copy only those the program needed before
            // it ended. Each installed page must have been checked.
            // A shared-memory page found present through another mapping of its object was checked there.
            let installed = scenario.mode == .nonlive ? observer.oracles.frozenPageCount
                : (restorer.lazyMemory.map { $0.installedPageCount - $0.discardedPageCount - $0.aliasPageCount } ?? 0)
            let checked = observer.oracles.checkedPageCount
            if checked < installed { failures.append("pages: only \(checked) of \(installed) installed pages were checked in the target") }
            if !observer.oracles.verdicts.contains(where: { $0.name == "registers and state" }) {
                failures.append("state: the state oracle never ran")
            }
            let expectedStatus = workloadReference?.status ?? .exited(0)
            if let targetNemesis, targetNemesis.fired, targetNemesis.watchdogKilled {
                // Its node died before it disarmed the watchdog: it must have been killed, before it read a hole.
                if targetStatus != .killed(signal: SIGKILL) {
                    failures.append("target node death: the restored process lacked pages and \(targetStatus.map { "\($0)" } ?? "never ended"), "
                                    + "where its watchdog must kill it")
                }
            } else if targetStatus != expectedStatus && scenario.check == nil {
                failures.append("program: the migrated program \(targetStatus.map { "\($0)" } ?? "never ended"), "
                                + "the reference run \(expectedStatus): \(firstLine(work + "/victim.err"))")
            }
            // A program that ended well removed its own files; one killed by a failed migration cannot,
            // and the work directory that holds them goes with the iteration.
            let left = ((try? ProcFS.directoryEntries(work)) ?? []).filter { $0.hasPrefix("fammig-") }
            if targetStatus == .exited(0) && !left.isEmpty {
                failures.append("no harm: the migrated program left its files behind: \(left.sorted())")
            }
            let output = (try? ProcFS.readFile(outputPath)) ?? []
            let killedByTargetNemesis = targetNemesis?.fired == true && targetNemesis?.watchdogKilled == true
            if killedByTargetNemesis {
                // Killed for lack of pages: what it printed before is not a whole run.
            } else if let check = scenario.check {
                if let rejection = Workload.runCheck(check, outputPath: outputPath, referencePath: workloadReference?.outputPath ?? "",
                                                     status: targetStatus, workDirectory: work) {
                    failures.append("end to end: \(rejection)")
                }
            } else if output != reference {
                failures.append("end to end: stdout differs from the reference run (migrated checksum \(Self.checksum(output) ?? "none"), reference \(Self.checksum(reference) ?? "none"))")
            }
        case .failed(let step, let actor, let error):
            result.outcome = "failed at step \(step) (\(actor.rawValue)): \(error)"
            // Whatever ended the migration, what the oracles saw until then must have been right.
            for verdict in observer.oracles.verdicts where !verdict.passed { failures.append("\(verdict.name): \(verdict.detail)") }
            // A changed page or mark must stop the migration by a digest: the page's against its mark (at
            // that very page), or the marks' against the commit record (nonlive checks them all first).
            let caughtTamper = tamperer?.tamperedSlot.map { slot in
                error.contains("page slot \(slot) ") && error.contains("mark checksum")
                    || error.contains("the dumped marks do not match the commit record's checksum")
            } ?? false
            if tamperer?.fired == true && !caughtTamper && !(nemesis?.fired == true) && targetNemesis?.fired != true {
                failures.append("tamper: the migration failed, but not on the changed page slot \(tamperer!.tamperedSlot!): \(error)")
            }
            // An attack must be refused with its own cause, and before the commit record the victim must
            // come out of it alive: after it, the image in FAM is the process.
            let caughtAttack = attacker?.fired == true && scenario.attack?.isItsRefusal(error) == true
            if let attacker, attacker.fired {
                if !caughtAttack { failures.append("attack: the migration failed, but not with the attack's refusal: \(error)") }
                if !victimUntouched && !imageCompleteAtEnd {
                    failures.append("attack: the victim was lost to \(scenario.attack!.summary), with no complete image to restore it from")
                }
            }
            // A source that loses its target (the target node died) fails too: the victim goes on.
            let expected = caughtTamper || caughtAttack || nemesis?.fired == true && (killedBeforeCommit || scenario.mode == .postcopySocket)
                || targetNemesis?.fired == true
            // A workload may hold, at the drawn system call, what fammig refuses before the freeze (a directory
            // or a pipe open, a child): the right answer is that refusal, with the victim left untouched.
            let refusable = isWorkload
            let refused = refusable && actor == .dumper && error.hasSuffix("left running untouched.") && nemesis?.fired != true
            if refused {
                result.outcome = "refused before the freeze: \(error)"
                if !victimUntouched { failures.append("no harm: the workload was refused, but the victim did not survive: \(error)") }
            } else if !expected {
                failures.append("migration: \(result.outcome)")
            }
        case .stuck(let reason):
            result.outcome = "stuck: \(reason)"
            failures.append("liveness: \(reason)")
        }
        if let failure = releaseWatch.failure { failures.append(failure) }
        // A dead source leaves its victim running on before the commit record, and dead after it.
        if let nemesis, nemesis.fired {
            let committed = nemesis.imageStateAtKill == .complete
            if !committed && !nemesis.victimAliveAfterKill && scenario.mode != .postcopySocket {
                failures.append("source kill before the commit record: the victim must run on, but it did not survive")
            } else if committed && nemesis.victimAliveAfterKill {
                failures.append("source kill after the commit record: the victim must die with its source, but it runs on")
            }
            // Two live copies: the dead source let its victim go, and the target made the process its own
            // anyway (it held every page and disarmed its watchdog before any commit record or hand-over).
            // (A restored process that ended by itself before it heard of its source's death is no live copy.)
            if nemesis.victimRunsOnAfterKill && restorer.lazyMemory?.releasedWhileRunning == true {
                failures.append("source kill: the victim was let go and the restored process was released too: two live copies")
            }
        }
        if let nemesis, nemesis.fired, !killedBeforeCommit, scenario.mode != .postcopySocket, case .failed = outcome,
           tamperer?.fired != true, attacker?.fired != true {
            failures.append("source kill after the commit record: the migration must complete from FAM, but \(result.outcome)")
        }
        var famViolationStep: Int?
        if let model = box.model {
            famViolationStep = model.violations.map(\.step).min()
            for violation in model.violations.prefix(5) { failures.append("FAM: \(violation)") }
            model.release()
        }
        if let step = victimKilledEarly {
            failures.append("no harm: the victim was killed before step \(step), while the image was not complete")
        }
        result.failures = failures
        if let first = failures.first {
            if let fired = observer.firstFailure, fired.step <= famViolationStep ?? Int.max {
                (result.oracleStep, result.oracleName) = (fired.step, fired.oracle)
            } else if let step = famViolationStep {
                (result.oracleStep, result.oracleName) = (step, "FAM")
            } else if case .failed(let step, _, _) = outcome {
                (result.oracleStep, result.oracleName) = (step, String(first.prefix { $0 != ":" }))
            } else {
                (result.oracleStep, result.oracleName) = (result.stepCount, String(first.prefix { $0 != ":" }))
            }
        }
    }

    /// Removes everything in `directory`, not the directory itself.
    static func removeEntries(of directory: String) {
        for name in (try? ProcFS.directoryEntries(directory)) ?? [] {
            try? FileManager.default.removeItem(atPath: directory + "/" + name)
        }
    }

    static func checksum(_ output: [UInt8]) -> String? {
        String(decoding: output, as: UTF8.self).split(separator: "\n").last { $0.hasPrefix("checksum=") }.map { String($0.dropFirst(9)) }
    }
}
