// Why this file exists: a failing schedule is easier to read small. The shrinker replays the failing seed
// with overrides (no nemesis, the smallest program, a shorter adversarial prefix after which the schedule
// is fixed and fair) and keeps each override under which the iteration still fails. Then it writes the
// schedule down (which actor moved at each step) and cuts that script by delta debugging: whole actors'
// turns first, then ever smaller runs of picks, keeping each cut under which the same oracle still fires
// no later. The shrunk replay command carries the script (`--schedule`).

public struct Shrunk: Sendable {
    public var filter: ScenarioFilter
    public var result: IterationResult
    public var scenario: Scenario { result.scenario }
}

public struct Shrinker {
    let campaign: Campaign
    let filter: ScenarioFilter

    public init(campaign: Campaign, filter: ScenarioFilter) {
        self.campaign = campaign
        self.filter = filter
    }

    public func shrink(_ failing: IterationResult) -> Shrunk {
        let seed = failing.scenario.seed
        var best = Shrunk(filter: filter, result: failing)
        func attempt(_ candidate: ScenarioFilter) -> Bool {
            let result = campaign.runOne(seed: seed, filter: candidate, keepTrace: false)
            // The same oracle must fire: a shrink that turns one failure into another explains neither.
            guard !result.passed, result.environmentError == nil, result.oracleName == failing.oracleName else { return false }
            best = Shrunk(filter: candidate, result: result)
            return true
        }
        if failing.scenario.kill != nil {
            var candidate = best.filter
            candidate.noKill = true
            _ = attempt(candidate)
        }
        if best.scenario.size > 0 {
            var candidate = best.filter
            candidate.size = 0
            _ = attempt(candidate)
        }
        // Fewer, larger dump batches: fewer dumper steps before the page the failure needs is dumped.
        if best.scenario.batchPageCount < Self.largestBatchPageCount {
            var candidate = best.filter
            candidate.batchPageCount = Self.largestBatchPageCount
            _ = attempt(candidate)
        }
        // The nemeses and helpers the failure may not need, each left out in turn.
        for leaveOut in [\ScenarioFilter.racer, \.tamper, \.bystander, \.attacker, \.killTarget] where best.filter[keyPath: leaveOut] != false {
            var candidate = best.filter
            candidate[keyPath: leaveOut] = false
            if Self.differs(best.scenario, Scenario.make(seed: seed, filter: candidate)) { _ = attempt(candidate) }
        }
        // A liveness failure (the same step taken again and again, nothing else moving) is judged after
        // DeterministicDriver.repeatLimit repeats in a campaign, where a step that progresses may repeat
        // its label; in a replay of a seed known to livelock, a few repeats are enough to show it.
        if Self.isNoProgress(best.result) {
            for limit in [4, 64] where best.scenario.repeatLimit.map({ $0 > limit }) ?? true {
                var candidate = best.filter
                candidate.repeatLimit = limit
                if attempt(candidate), Self.isNoProgress(best.result) { break }
            }
        }
        // The shortest adversarial prefix that still fails (binary search; failing is not monotonic in
        // general, so this finds a short one, not always the shortest).
        var low = 0
        var high = best.result.stepCount
        while low < high {
            let middle = (low + high) / 2
            var candidate = best.filter
            candidate.adversarialSteps = middle
            if attempt(candidate) { high = middle } else { low = middle + 1 }
        }
        return cutSchedule(best, seed: seed, oracle: failing.oracleName)
    }

    /// Replays spent on cutting the script at most (each is one iteration: about half a second here).
    static let scheduleAttemptLimit = 160

    /// Delta debugging over the schedule's picks (Zeller's ddmin, complements only): the script of the
    /// steps up to the one where the oracle fired, cut while the same oracle still fires at a step no
    /// later than before. Keeps `start` when the written script does not fail as the seed did.
    func cutSchedule(_ start: Shrunk, seed: UInt64, oracle: String?) -> Shrunk {
        var best = start
        let traced = campaign.runOne(seed: seed, filter: best.filter, keepTrace: true)
        guard !traced.passed, traced.environmentError == nil, let recorded = traced.picks else { return best }
        // Every pick up to the oracle's step, the fair order's too: cutting those lets the steps the
        // failure needs come before the ones it does not (the fair order would run the dumper to its end first).
        var script = Array(recorded.prefix(traced.oracleStep ?? recorded.count))
        var attempts = 0
        /// `strictly`: only a cut under which the oracle fires earlier counts (else no later).
        func attempt(_ picks: [SchedulePick], strictly: Bool) -> Bool {
            guard attempts < Self.scheduleAttemptLimit else { return false }
            attempts += 1
            // The adversarial steps stay: the strategy is still asked for them, so the generator's draws stay.
            var candidate = best.filter
            candidate.schedule = picks
            let result = campaign.runOne(seed: seed, filter: candidate, keepTrace: false)
            let step = result.oracleStep ?? Int.max
            let bestStep = best.result.oracleStep ?? Int.max
            guard !result.passed, result.environmentError == nil, result.oracleName == oracle,
                  strictly ? step < bestStep : step <= bestStep else { return false }
            best = Shrunk(filter: candidate, result: result)
            return true
        }
        // The whole script first: it replays the run it was taken from (the same picks, the same draws).
        guard attempt(script, strictly: false) else { return start }
        func deltaDebug(strictly: Bool) {
            // Whole actors' turns: an actor whose every pick can go (the fabric's early write-backs, the
            // link's deliveries) goes in one replay.
            for actor in ActorName.allCases where script.contains(where: { $0.actor == actor }) {
                let without = script.filter { $0.actor != actor }
                if attempt(without, strictly: strictly) { script = without }
            }
            var granularity = 2
            while !script.isEmpty && attempts < Self.scheduleAttemptLimit {
                let chunk = (script.count + granularity - 1) / granularity
                var cut = false
                for start in stride(from: 0, to: script.count, by: chunk) {
                    let complement = Array(script[..<start]) + Array(script[min(start + chunk, script.count)...])
                    if attempt(complement, strictly: strictly) {
                        script = complement
                        granularity = max(granularity - 1, 2)
                        cut = true
                        break
                    }
                }
                if !cut {
                    if granularity >= script.count { break }
                    granularity = min(granularity * 2, script.count)
                }
            }
        }
        // First only cuts that bring the failure earlier (a cut of the picks after the steps the failure
        // needs changes nothing and would stop the cuts that let those steps come first); then any cut
        // that keeps it as early, for a shorter script.
        deltaDebug(strictly: true)
        deltaDebug(strictly: false)
        return best
    }

    /// The largest batch the campaign draws.
    static let largestBatchPageCount = 512

    /// Whether leaving a helper out changed the scenario at all (else a replay would only repeat).
    static func differs(_ scenario: Scenario, _ other: Scenario) -> Bool { scenario.summary != other.summary }

    static func isNoProgress(_ result: IterationResult) -> Bool {
        ([result.outcome] + result.failures).contains { $0.contains("no progress:") }
    }
}
