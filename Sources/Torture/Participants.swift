// The participants that are not engine actors: the link's deliveries, the fabric's early write-backs,
// and the nemesis that kills the source node.
import Engine
import Sys

/// Delivers the oldest in-flight frame of one direction per step.
final class LinkParticipant: Participant {
    let actor = ActorName.link
    let isEssential = false
    private let link: MemoryLink
    private var directions: [MemoryLink.Direction] = []

    init(link: MemoryLink) { self.link = link }

    func availability() -> Availability {
        directions = link.deliverable
        guard !directions.isEmpty else { return .waiting(nil, "nothing in flight") }
        return .choices(directions.map { "deliver \($0.rawValue) \(link.nextFrameDescription($0) ?? "")" })
    }

    func take(_ index: Int, rng: inout SeededGenerator) throws -> String? {
        link.deliver(directions[index])
        return nil
    }

    func abort(reason: String) {}
}

/// Writes one pending line of the source's cache back to the fabric before any fence asks for it.
final class FabricParticipant: Participant {
    let actor = ActorName.fabric
    let isEssential = false
    private let model: () -> ModelFAM?

    init(model: @escaping () -> ModelFAM?) { self.model = model }

    func availability() -> Availability {
        guard let model = model(), !model.isCrashed, !model.isReleased, model.pendingLineCount > 0 else {
            return .waiting(nil, "no pending line")
        }
        return .choices(["write back a pending line"])
    }

    func take(_ index: Int, rng: inout SeededGenerator) throws -> String? {
        guard let model = model() else { return nil }
        let lines = model.pendingLines
        let line = lines[rng.below(lines.count)]
        model.writeBack(line: line)
        return "line \(line)"
    }

    func abort(reason: String) {}
}

/// Kills the source node once the dumper has taken the planned number of steps: the dumper never steps
/// again (no cleanup runs), the victim is left as a dead tracer leaves it (running on before the commit
/// record, killed after it: Dumper.loseTracer), pending FAM lines reach the fabric or not, and the link
/// loses or delivers what the source had sent, then shows the close.
final class NemesisParticipant: Participant {
    let actor = ActorName.nemesis
    let isEssential = false
    private let plan: KillPlan
    private let dumper: EngineParticipant
    private let sourceDumper: Dumper
    private let victim: ProcessID
    private let model: () -> ModelFAM?
    private let link: MemoryLink?
    private(set) var fired = false
    /// The image state the target could see right after the kill (nil: no image, socket mode).
    private(set) var imageStateAtKill: ImageState?
    /// Whether the victim was alive right after the kill (its guard had let it go, or not).
    private(set) var victimAliveAfterKill = false
    /// ...and would have run on (not left stopped because a hand-over was in doubt).
    private(set) var victimRunsOnAfterKill = false

    init(plan: KillPlan, dumper: EngineParticipant, sourceDumper: Dumper, victim: ProcessID, model: @escaping () -> ModelFAM?, link: MemoryLink?) {
        self.plan = plan
        self.dumper = dumper
        self.sourceDumper = sourceDumper
        self.victim = victim
        self.model = model
        self.link = link
    }

    func availability() -> Availability {
        if fired { return .finished }
        let next = dumper.availability()
        if case .finished = next { return .finished }
        let due: Bool
        if let point = plan.beforeDumperStep {
            if case .engineStep(.dumper(let step)) = next { due = point.isNext(step) } else { due = false }
        } else {
            due = dumper.stepsTaken >= plan.afterDumperSteps
        }
        return due ? .choices(["kill the source node"]) : .waiting(nil, "dumper progress")
    }

    func take(_ index: Int, rng: inout SeededGenerator) throws -> String? {
        fired = true
        dumper.crashed = true
        // As a dead tracer leaves it, but stopped rather than running on: it must be whole, untraced
        // and not killed before the commit record (killed after it). Then it goes, as the iteration's
        // ending does not depend on a victim that runs in real time beside the target.
        let handingOver = sourceDumper.isHandingOver
        sourceDumper.loseTracer(resume: false)
        victimAliveAfterKill = Self.isLetGo(victim)
        victimRunsOnAfterKill = victimAliveAfterKill && !handingOver
        Spawn.kill(victim)
        if let link { link.crash(link.source, dropInFlight: plan.dropInFlight) }
        guard let model = model() else { return "killed before any FAM existed" }
        let reached = model.crash(using: &rng)
        imageStateAtKill = ImageReader.peekState(backend: model.targetNode)
        return "killed; \(reached.count) pending lines reached the fabric; image \(imageStateAtKill.map { "\($0)" } ?? "unreadable")"
    }

    func abort(reason: String) {}

    /// Alive and traced by nobody: what a dead source leaves before the commit (stopped, when it froze it).
    static func isLetGo(_ victim: ProcessID) -> Bool {
        guard !ProcFS.isKilledOrEnded(victim), let status = try? ProcFS.status(victim) else { return false }
        return status["TracerPid"] == "0"
    }
}

/// Kills the target node once the restored process ran and its fault handler took the planned number
/// of steps: the fault handler, the pusher and the restorer never step again, the node's userfaultfd
/// closes and its watchdog loses its owner (so the restored process dies unless the watchdog was already disarmed), and
/// the link loses or delivers what the target had sent, then shows the close. The step waits (real
/// time, bounded) for the watchdog's kill, so what follows does not depend on how fast it lands.
final class TargetNemesisParticipant: Participant {
    let actor = ActorName.targetNemesis
    let isEssential = false
    private let plan: TargetKillPlan
    private let node: [EngineParticipant]
    private let faultHandler: EngineParticipant
    private let memory: () -> LazyMemory?
    private let link: MemoryLink?
    private let runner: TargetRunner
    private(set) var fired = false
    /// The node died before it disarmed the watchdog (with pages missing, or every page in but not yet
    /// said): the watchdog kills the restored process. Otherwise it runs on to its end.
    private(set) var watchdogKilled = false

    init(plan: TargetKillPlan, node: [EngineParticipant], faultHandler: EngineParticipant, memory: @escaping () -> LazyMemory?,
         link: MemoryLink?, runner: TargetRunner) {
        self.runner = runner
        self.plan = plan
        self.node = node
        self.faultHandler = faultHandler
        self.memory = memory
        self.link = link
    }

    func availability() -> Availability {
        if fired { return .finished }
        if case .finished = faultHandler.availability() { return .finished }
        // Only once the runner let it go: before that the process is still traced by this node, whose death
        // (here, unlike a real one) would not detach it.
        guard let memory = memory(), memory.isRunning, runner.hasResumed else { return .waiting(nil, "the restored process has not run") }
        return faultHandler.stepsTaken >= plan.afterFaultHandlerSteps ? .choices(["kill the target node"]) : .waiting(nil, "fault handler progress")
    }

    func take(_ index: Int, rng: inout SeededGenerator) throws -> String? {
        fired = true
        for participant in node { participant.crashed = true }
        runner.nodeDied()
        if let link { link.crash(link.target, dropInFlight: plan.dropInFlight) }
        guard let memory = memory() else { return "killed before the target had memory" }
        let target = memory.targetProcessID
        // A process that already ended (it runs only in its own steps, so it cannot end meanwhile) is not
        // killed by anyone.
        let endedBefore = Spawn.hasEnded(target)
        watchdogKilled = memory.loseNode() && !endedBefore
        guard watchdogKilled else { return endedBefore ? "killed after the restored process ended" : "killed; every page was in and the watchdog disarmed: the restored process runs on" }
        // Waited for, so that what follows does not depend on how fast the kill lands.
        guard Spawn.endsSoon(target, graceMilliseconds: 10_000) else {
            throw TortureError.environment("the restored process outlived its node by 10 s: its watchdog did not kill it")
        }
        return "killed; \(memory.installedPageCount) of \(memory.pageCount) pages were in; the watchdog killed the restored process"
    }

    func abort(reason: String) {}
}
