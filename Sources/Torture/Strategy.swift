// Why this file exists: the adversary. At every step the deterministic driver lists what every actor could
// do next; a strategy, from the iteration's seeded generator, picks one. Each strategy is named, so a
// campaign can run one alone or a seeded mix, and each aims at one kind of bug (DESIGN.md §4).
import Engine

/// Who can take a step.
public enum ActorName: String, Sendable, CaseIterable, Codable {
    case dumper, restorer
    case faultHandler = "fault-handler"
    case pusher
    /// The restored process itself: its step lets it run until its next fault or its exit.
    case target
    /// The in-memory transport: a step delivers the oldest frame of one direction.
    case link
    /// The model FAM's caches: a step writes one pending line back to the fabric early.
    case fabric
    /// Kills the source node.
    case nemesis
    /// Changes a sealed page or mark in the FAM the target sees.
    case tamperer
    /// Installs sealed pages behind the engine's back (a second installer meeting the engine's).
    case racer
    /// Kills the target node after the restored process ran (its fault handler and pusher die with it).
    case targetNemesis = "target-nemesis"
    /// A rogue peer on the link or a FAM writer without the key (Attacker.swift).
    case attacker
    /// Reads the target's command line while the restorer builds it (as ps does): Bystander.swift.
    case bystander
}

/// One step some actor could take now.
public struct Choice: Sendable, Equatable {
    public var actor: ActorName
    /// What the trace prints (and hashes).
    public var label: String
    /// The engine actor's typed step (nil for the participants that are not engine actors).
    public var step: ActorStep?
}

/// The named strategies.
public enum StrategyName: String, Sendable, CaseIterable, Codable {
    /// Uniform over every enabled step.
    case random
    /// Probabilistic concurrency testing: random actor priorities, the highest enabled runs, and at a
    /// few seeded change points the running actor drops to the lowest priority.
    case pct
    /// The dumper starved for long stretches: the target runs ahead on pages not dumped yet.
    case delayedDump = "delayed-dump"
    /// Right after the dumper copied a batch into FAM (unmarked, not yet durable), the target, its fault
    /// handler and pusher run first: faults land on exactly the pages being written.
    case racingFaults = "racing-faults"
    /// The fabric writes lines back early and often: partial persistence, marks seen before fences.
    case famReorder = "fam-reorder"
    /// Deliveries starved for long stretches: requests and answers wait while FAM moves on.
    case transportDelay = "transport-delay"
    /// Random scheduling, and the source node is killed at a seeded point of its dump.
    case killedSource = "killed-source"
}

/// Picks the next step. Deterministic given the generator's state.
struct Scheduler {
    let strategy: StrategyName
    private var priorities: [ActorName: Int] = [:]
    private var changePoints: [Int] = []
    /// delayed-dump / transport-delay: steps left in the current starving window, and until the next.
    private var starveLeft = 0
    private var calmLeft = 0

    init(strategy: StrategyName, rng: inout SeededGenerator) {
        self.strategy = strategy
        if strategy == .pct {
            // The tamperer is left out (lowest): adding it must not reorder the other actors of old seeds.
            var order = ActorName.allCases.filter { $0 != .tamperer && $0 != .racer && $0 != .targetNemesis && $0 != .attacker && $0 != .bystander }
            order.shuffle(using: &rng)
            for (index, actor) in order.enumerated() { priorities[actor] = index + 10 }
            // Depth 3: two change points within the first few thousand steps.
            changePoints = [rng.below(400), rng.below(3000)].sorted()
        }
        calmLeft = rng.below(40)
    }

    mutating func pick(_ choices: [Choice], step: Int, rng: inout SeededGenerator) -> Int {
        precondition(!choices.isEmpty, "pick from no choices")
        // A planned kill goes first: when it fires is the plan's business, not the scheduler's.
        // So does the attacker's move (it is only offered at its planned moment).
        if let nemesis = choices.firstIndex(where: { $0.actor == .nemesis || $0.actor == .targetNemesis || $0.actor == .attacker }) { return nemesis }
        // So does the bystander: it aims at one window (between the restorer's layout and its next step).
        if let bystander = choices.firstIndex(where: { $0.actor == .bystander }) { return bystander }
        switch strategy {
        case .random, .killedSource:
            return weighted(choices, rng: &rng) { $0.actor == .fabric ? 1 : 4 }
        case .pct:
            return pickByPriority(choices, step: step, rng: &rng)
        case .delayedDump:
            let starving = advanceWindow(rng: &rng)
            return weighted(choices, rng: &rng) { choice in
                if choice.actor == .dumper { return starving ? 0 : 4 }
                return choice.actor == .fabric ? 1 : 4
            }
        case .transportDelay:
            let starving = advanceWindow(rng: &rng)
            return weighted(choices, rng: &rng) { choice in
                if choice.actor == .link { return starving ? 0 : 4 }
                return choice.actor == .fabric ? 1 : 4
            }
        case .racingFaults:
            // A batch sits copied but unmarked while the dumper's next step is its seal.
            let batchOpen = choices.contains { if case .dumper(.seal) = $0.step { true } else { false } }
            return weighted(choices, rng: &rng) { choice in
                switch choice.actor {
                case .target, .faultHandler, .pusher, .link: return batchOpen ? 40 : 4
                case .dumper: return batchOpen ? 1 : 4
                case .fabric: return batchOpen ? 8 : 1
                default: return 4
                }
            }
        case .famReorder:
            return weighted(choices, rng: &rng) { $0.actor == .fabric ? 30 : 4 }
        }
    }

    /// Weighted choice; a weight of 0 excludes a choice unless every weight is 0.
    private func weighted(_ choices: [Choice], rng: inout SeededGenerator, weight: (Choice) -> Int) -> Int {
        let weights = choices.map(weight)
        let total = weights.reduce(0, +)
        guard total > 0 else { return rng.below(choices.count) }
        var point = rng.below(total)
        for (index, value) in weights.enumerated() {
            if point < value { return index }
            point -= value
        }
        return choices.count - 1
    }

    /// Starving windows of 20 to 400 steps, separated by calm stretches of up to 40 steps.
    private mutating func advanceWindow(rng: inout SeededGenerator) -> Bool {
        if starveLeft > 0 {
            starveLeft -= 1
            if starveLeft == 0 { calmLeft = rng.below(40) }
            return true
        }
        if calmLeft > 0 {
            calmLeft -= 1
            return false
        }
        starveLeft = 20 + rng.below(380)
        return true
    }

    private mutating func pickByPriority(_ choices: [Choice], step: Int, rng: inout SeededGenerator) -> Int {
        // The fabric is not a thread: it writes a line back now and then, outside the priority order.
        let fabric = choices.firstIndex { $0.actor == .fabric }
        if let fabric, choices.count == 1 || rng.chance(1, in: 8) { return fabric }
        var best = choices.firstIndex { $0.actor != .fabric }!
        for index in choices.indices where choices[index].actor != .fabric && priorities[choices[index].actor, default: 0] > priorities[choices[best].actor, default: 0] {
            best = index
        }
        if let next = changePoints.first, step >= next {
            changePoints.removeFirst()
            // The running actor drops below everyone.
            priorities[choices[best].actor] = (priorities.values.min() ?? 0) - 1
        }
        // Among one actor's own choices (the link's two directions), pick at random.
        let actor = choices[best].actor
        let own = choices.indices.filter { choices[$0].actor == actor }
        return own[rng.below(own.count)]
    }
}
