// Why this file exists: torture's driver (DESIGN.md §4). One thread; at each step it asks every
// participant what it could do, lets the strategy pick one, takes it, and appends it to the trace. The
// engine's actors run unchanged; the target process, the transport's deliveries, the fabric's early
// write-backs and the nemesis are participants too. Time is virtual: a step costs a microsecond, and when
// everyone waits the clock jumps to the earliest retry, so timeouts fire without waiting for them.
import Engine
import Synchronization

/// The clock actors read under torture: virtual, advanced only by the driver.
public final class VirtualClock: EngineClock, @unchecked Sendable {
    private let elapsed = Mutex(Duration.zero)
    public init() {}
    public func now() -> Duration { elapsed.withLock { $0 } }
    func advance(by duration: Duration) { elapsed.withLock { $0 += duration } }
}

/// What a participant can do now.
enum Availability {
    case choices([String])
    /// An engine actor's one ready step.
    case engineStep(ActorStep)
    /// Nothing until another participant moves, or until this much virtual time passed (nil: never by itself).
    case waiting(Duration?, String)
    case finished
}

/// Anything the driver schedules.
protocol Participant: AnyObject {
    var actor: ActorName { get }
    /// Must end before a run counts as over (the engine's actors and the target process); the link,
    /// the fabric and the nemesis only serve them.
    var isEssential: Bool { get }
    func availability() -> Availability
    /// Asked only when nobody could move: may look at costlier facts (the real process's state).
    func availabilityWhenStuck() -> Availability
    /// Takes choice `index` of the last `availability()`; returns what happened, for the trace.
    func take(_ index: Int, rng: inout SeededGenerator) throws -> String?
    func abort(reason: String)
}

extension Participant {
    func availabilityWhenStuck() -> Availability { availability() }
}

/// An engine actor as a participant: its one ready step is its one choice.
final class EngineParticipant: Participant {
    let engineActor: any EngineActor
    let actor: ActorName
    let isEssential = true
    /// Set by the nemesis: a dead node's actors never step again, and nothing of theirs is cleaned up.
    var crashed = false
    private(set) var stepsTaken = 0
    /// Notes the observer collected during the current step (pages installed), for the trace.
    let notes: StepNotes

    init(_ engineActor: any EngineActor, actor: ActorName, notes: StepNotes) {
        self.engineActor = engineActor
        self.actor = actor
        self.notes = notes
    }

    func availability() -> Availability {
        if crashed { return .finished }
        switch engineActor.nextAction() {
        case .ready(let step): return .engineStep(step)
        case .finished: return .finished
        case .waiting(.retryAfter(let duration)): return .waiting(duration, "retry after \(duration)")
        case .waiting(.readable(_, let timeout)): return .waiting(timeout, "a descriptor")
        case .waiting(.peer(let peer)): return .waiting(nil, "peer \(peer)")
        }
    }

    func take(_ index: Int, rng: inout SeededGenerator) throws -> String? {
        stepsTaken += 1
        try engineActor.perform()
        return notes.take()
    }

    func abort(reason: String) {
        if !crashed { engineActor.abort(reason: reason) }
    }
}

/// What the observer saw during one step (addresses installed), so the trace shows faults and pushes.
public final class StepNotes: @unchecked Sendable {
    private var installed: [UInt64] = []
    func noteInstalled(_ address: UInt64) { installed.append(address) }
    func take() -> String? {
        defer { installed.removeAll() }
        switch installed.count {
        case 0: return nil
        case 1: return "installed \(hex(installed[0]))"
        default: return "installed \(installed.count) pages from \(hex(installed[0]))"
        }
    }
}


/// How a scheduled run ended.
public enum DriverOutcome: Sendable {
    /// Every essential participant finished without an error.
    case completed
    /// An engine actor threw: every participant was aborted.
    case failed(step: Int, actor: ActorName, error: String)
    /// Nobody could move and nothing waits on time, or the step limit was reached.
    case stuck(String)
}

final class DeterministicDriver {
    private let participants: [Participant]
    private let clock: VirtualClock
    private var scheduler: Scheduler
    private let stepLimit: Int
    /// After this many steps the strategy stops: the rest runs in a fixed, fair order (shrinking cuts
    /// the adversarial part of a schedule short with it).
    private let adversarialSteps: Int
    /// Identical steps in a row that end the run as no progress.
    private let repeatLimit: Int
    private let traceSink: ((String) -> Void)?
    private(set) var trace: [String] = []
    private(set) var hash = TraceHash()
    private(set) var stepCount = 0
    private let keepTrace: Bool
    /// Called with each step's number before it is taken (the model FAM logs stores by step).
    var onStep: ((Int) -> Void)?
    /// A written schedule to follow instead of the strategy (shrinking): each step takes the next
    /// scripted pick when its actor can take it; while its actor waits, the fixed fair order moves
    /// someone else and the pick stays next; a pick whose actor is done (or not in this run) is dropped.
    /// Once the script is used up, the fair order. The strategy is still asked during the adversarial steps
    /// (and its answer ignored), so that the generator's draws (which the fabric, racer and nemesis use
    /// too) are those of the run the script was recorded from: the whole script replays that run exactly.
    private let script: [SchedulePick]?
    private var scriptPosition = 0
    /// What was picked at each step, in the script's terms.
    private(set) var picks: [SchedulePick] = []

    init(participants: [Participant], clock: VirtualClock, scheduler: Scheduler, stepLimit: Int, adversarialSteps: Int,
         repeatLimit: Int = DeterministicDriver.repeatLimit, script: [SchedulePick]? = nil, keepTrace: Bool, traceSink: ((String) -> Void)?) {
        self.script = script
        self.repeatLimit = repeatLimit
        self.participants = participants
        self.clock = clock
        self.scheduler = scheduler
        self.stepLimit = stepLimit
        self.adversarialSteps = adversarialSteps
        self.keepTrace = keepTrace
        self.traceSink = traceSink
    }

    /// The same step, with the same outcome, this many times in a row and nothing else between: a
    /// participant that reports itself ready makes no progress (a busy wait that a priority scheduler
    /// turns into a livelock). Judged here rather than after the whole step budget. High, since a step
    /// that progresses may repeat its label (a link delivering one more frame of the same kind); the
    /// shrinker then tries a low one, so that a shrunk liveness failure is a short schedule.
    static let repeatLimit = 10_000

    func run(rng: inout SeededGenerator) -> DriverOutcome {
        var idleRounds = 0
        var stuck = false
        var lastStep = ""
        var repeats = 0
        while stepCount < stepLimit {
            var choices: [Choice] = []
            var owners: [(Participant, Int)] = []
            var earliestRetry: Duration?
            var essentialLeft = false
            var waitingOn: [String] = []
            var waitingActors = Set<ActorName>()
            for participant in participants {
                let availability = stuck ? participant.availabilityWhenStuck() : participant.availability()
                switch availability {
                case .choices(let labels):
                    if participant.isEssential { essentialLeft = true }
                    for (index, label) in labels.enumerated() {
                        choices.append(Choice(actor: participant.actor, label: label, step: nil))
                        owners.append((participant, index))
                    }
                case .engineStep(let step):
                    if participant.isEssential { essentialLeft = true }
                    choices.append(Choice(actor: participant.actor, label: step.description, step: step))
                    owners.append((participant, 0))
                case .waiting(let retry, let reason):
                    waitingActors.insert(participant.actor)
                    if participant.isEssential {
                        essentialLeft = true
                        waitingOn.append("\(participant.actor.rawValue): \(reason)")
                    }
                    if let retry { earliestRetry = min(earliestRetry ?? retry, retry) }
                case .finished:
                    break
                }
            }
            if !essentialLeft { return .completed }
            guard !choices.isEmpty else {
                if earliestRetry == nil && !stuck {
                    stuck = true
                    continue
                }
                guard let retry = earliestRetry, idleRounds < 100_000 else {
                    abortAll(reason: "deadlock")
                    return .stuck("no participant can move: " + waitingOn.joined(separator: "; "))
                }
                idleRounds += 1
                clock.advance(by: max(retry, .microseconds(1)))
                continue
            }
            idleRounds = 0
            stuck = false
            // Fair and fixed: the engine's actors in list order, the fabric last.
            let fair = choices.firstIndex { $0.actor != .fabric } ?? 0
            let index: Int
            if let script {
                if stepCount < adversarialSteps { _ = scheduler.pick(choices, step: stepCount, rng: &rng) }
                index = nextScripted(script, owners: owners, waiting: waitingActors) ?? fair
            } else if stepCount < adversarialSteps {
                index = scheduler.pick(choices, step: stepCount, rng: &rng)
            } else {
                index = fair
            }
            let choice = choices[index]
            let (participant, ownIndex) = owners[index]
            picks.append(SchedulePick(actor: choice.actor, index: ownIndex))
            stepCount += 1
            clock.advance(by: .microseconds(1))
            onStep?(stepCount)
            do {
                let outcome = try participant.take(ownIndex, rng: &rng)
                let step = "\(choice.actor.rawValue): \(choice.label)" + (outcome.map { " → \($0)" } ?? "")
                record("\(stepCount) " + step)
                repeats = step == lastStep ? repeats + 1 : 1
                lastStep = step
                if repeats >= repeatLimit {
                    abortAll(reason: "no progress")
                    return .stuck("no progress: \(step) was taken \(repeats) times in a row and nothing else moved")
                }
            } catch {
                // The error text may name this machine's PIDs: the hash takes only that it failed here.
                record("\(stepCount) \(choice.actor.rawValue): \(choice.label) → error", detail: ": \(error)")
                abortAll(reason: "\(error)")
                return .failed(step: stepCount, actor: choice.actor, error: "\(error)")
            }
        }
        abortAll(reason: "step limit")
        return .stuck("the schedule did not finish within \(stepLimit) steps")
    }

    /// The choice the script names next; nil when its actor cannot take it now (the pick stays next) or
    /// the script is used up. Picks of actors that are done are dropped on the way.
    private func nextScripted(_ script: [SchedulePick], owners: [(Participant, Int)], waiting: Set<ActorName>) -> Int? {
        while scriptPosition < script.count {
            let pick = script[scriptPosition]
            if let index = owners.firstIndex(where: { $0.0.actor == pick.actor && $0.1 == pick.index }) {
                scriptPosition += 1
                return index
            }
            if waiting.contains(pick.actor) || owners.contains(where: { $0.0.actor == pick.actor }) { return nil }
            scriptPosition += 1
        }
        return nil
    }

    /// The trace keeps exactly the hashed lines: a detail (an error's text, which may name this machine's
    /// PIDs) goes only to the sink, so two traces compare equal exactly when their hashes do.
    private func record(_ line: String, detail: String = "") {
        hash.add(line)
        if keepTrace { trace.append(line) }
        traceSink?(line + detail)
    }

    private func abortAll(reason: String) {
        for participant in participants { participant.abort(reason: reason) }
    }
}
