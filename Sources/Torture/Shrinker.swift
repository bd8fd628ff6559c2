// Why this file exists: a failing schedule is easier to read small. The shrinker replays the failing seed
// with overrides (no nemesis, the smallest program, a shorter adversarial prefix after which the schedule
// is fixed and fair) and keeps each override under which the iteration still fails.

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
            guard !result.passed, result.environmentError == nil else { return false }
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
        return best
    }

    static func isNoProgress(_ result: IterationResult) -> Bool {
        ([result.outcome] + result.failures).contains { $0.contains("no progress:") }
    }
}
